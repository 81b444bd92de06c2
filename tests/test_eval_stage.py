"""stage=eval: the side-by-side report for a converted tiny-llama."""

from __future__ import annotations

import json

from linearize.config import validate
from linearize.evaluate.report import compare
from linearize.stages.eval import run as run_eval
from linearize.stages.finetune import run as run_finetune
from linearize.stages.prepare import prepare
from tests.conftest import compose_config, data_root

TINY = ("model=tiny-llama", "attention=hedgehog", "data.max_examples=40", "data.seq_len=64",
        "train.grad_accum=1", "train.max_steps=1", "finetune.start=swap")  # fmt: skip


def prepared(tmp_path, *overrides):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    return prepare(validate(dc), dc)


def test_report_for_tiny_llama(tmp_path):
    prep = prepared(tmp_path, "stage=finetune")
    run_finetune(prep)
    prep = prepared(tmp_path, "stage=eval", "eval.limit=2", "eval.tasks=[piqa,arc_challenge]",
                    "eval.ppl_tokens=600", "eval.ppl_seq_len=256", "eval.ppl_stride=128")  # fmt: skip
    out = run_eval(prep)
    report = json.loads((out / "report.json").read_text())
    rows = {r["task"]: r for r in report["rows"]}
    assert list(rows) == ["piqa", "arc_challenge", "wikitext2", "average"]
    assert rows["piqa"]["metric"] == "acc" and rows["arc_challenge"]["metric"] == "acc_norm"
    for task in ("piqa", "arc_challenge", "wikitext2"):
        assert {"teacher", "converted", "difference"} <= rows[task].keys()
    assert rows["wikitext2"]["teacher"] > 1000  # a random model
    avg = rows["average"]
    assert abs(avg["teacher"] - (rows["piqa"]["teacher"] + rows["arc_challenge"]["teacher"]) / 2) < 1e-12
    assert report["meta"]["converted"].endswith("finetune")
    assert "| piqa | acc |" in (out / "report.md").read_text()
    assert (out / "report.png").stat().st_size > 5_000


def test_compare_shares_and_skips():
    teacher = {"piqa": {"metric": "acc", "value": 0.8}, "mmlu": {"skipped": "local data missing: x"},
               "wikitext2": {"metric": "ppl", "value": 10.0}}  # fmt: skip
    converted = {"piqa": {"metric": "acc", "value": 0.6}, "mmlu": {"skipped": "local data missing: x"},
                 "wikitext2": {"metric": "ppl", "value": 20.0}}  # fmt: skip
    rows = {r["task"]: r for r in compare(teacher, converted)}
    assert abs(rows["piqa"]["share"] - 0.75) < 1e-12 and abs(rows["piqa"]["difference"] + 0.2) < 1e-12
    assert rows["wikitext2"]["share"] == 0.5  # perplexity: lower is better
    assert rows["mmlu"] == {"task": "mmlu", "skipped": "local data missing: x"}
    assert rows["average"]["teacher"] == 0.8 and abs(rows["average"]["share"] - 0.75) < 1e-12


def test_compare_with_one_side_only():
    converted = {"piqa": {"metric": "acc", "value": 0.6}, "wikitext2": {"metric": "ppl", "value": 20.0}}
    rows = {r["task"]: r for r in compare(None, converted)}
    assert rows["piqa"] == {"task": "piqa", "metric": "acc", "converted": 0.6}
    assert rows["average"] == {"task": "average", "metric": "mean score", "converted": 0.6}
    rows = {r["task"]: r for r in compare(converted, None)}
    assert rows["wikitext2"] == {"task": "wikitext2", "metric": "ppl", "teacher": 20.0}


def test_task_limits_score_each_task_with_its_own_limit(monkeypatch):
    from linearize.evaluate import score as eval_run

    calls = []

    def fake_evaluate(model, tokenizer, tasks, *, limit, **kwargs):
        calls.append((tasks, limit))
        return {task: {"metric": "acc", "value": 0.5, "n": limit} for task in tasks}

    monkeypatch.setattr(eval_run, "evaluate", fake_evaluate)
    cfg = validate(compose_config("stage=eval", "eval.tasks=[piqa,mmlu,arc_easy]", "eval.limit=100",
                                  "+eval.task_limits.mmlu=2", "eval.ppl_tokens=0"))  # fmt: skip
    results = eval_run.score(None, None, cfg)
    assert calls == [(["piqa", "arc_easy"], 100), (["mmlu"], 2)]
    assert list(results) == ["piqa", "mmlu", "arc_easy"] and results["mmlu"]["n"] == 2
