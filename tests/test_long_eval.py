"""The long-context evaluation (``eval.long``): RULER through lm-eval at each length, the loss by
position in long disjoint windows, the report section, and the refusals before any scoring."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from linearize.config import RULER_OFFLINE, RULER_TASKS, validate
from linearize.evaluate.long import position_edges, ruler_dir
from linearize.stages.eval import run as run_eval
from linearize.stages.export import run as run_export
from linearize.stages.finetune import run as run_finetune
from linearize.stages.preflight import check_eval
from linearize.stages.prepare import prepare
from tests.conftest import build_config, compose_config, data_root

TINY = ("model=tiny-llama", "attention=lolcats", "attention.window=8", "data.max_examples=40", "data.seq_len=64",
        "train.grad_accum=1", "train.max_steps=1", "finetune.start=swap")  # fmt: skip
LONG = ("stage=eval", "eval.tasks=[]", "eval.ppl_tokens=0", "eval.long=[1024,2048]", "eval.long_tasks=[niah_single_1]",
        "eval.long_samples=2", "eval.long_ppl_tokens=4096")  # fmt: skip


def prepared(tmp_path, *overrides):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    return prepare(validate(dc), dc)


def test_ruler_names_are_the_installed_harness_tasks():
    """RULER_OFFLINE + RULER_ONLINE name every task of lm-eval's RULER folder (and of its group),
    each once."""
    files = {p.name: yaml.load(p.read_text(), Loader=yaml.BaseLoader) for p in ruler_dir().glob("*.yaml")}
    group = files.pop("ruler.yaml")
    assert sorted(f["task"] for f in files.values()) == sorted(RULER_TASKS)
    assert sorted(group["task"]) == sorted(RULER_TASKS) and len(set(RULER_TASKS)) == len(RULER_TASKS)


def test_position_edges():
    assert position_edges(1024) == [64, 256]
    assert position_edges(2048) == [64, 256, 1024]
    assert position_edges(8192) == [64, 256, 1024, 2048, 4096]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.long=[512]"], "at least 1024"),
        (["eval.long=[2048,1024]"], "increasing"),
        (["eval.long=[1024]", "eval.long_tasks=[niah_single_2]"], "Paul Graham"),
        (["eval.long=[1024]", "eval.long_tasks=[niah_single]"], "Did you mean"),
        (["eval.long=[2048]", "eval.long_ppl_tokens=1000"], "less than one 2048-token window"),
        (["eval.long=[1024]", "eval.long_ppl_len=8192", "eval.long_ppl_tokens=4096"], "8192-token window"),
        (["eval.long_samples=0"], "eval.long_samples=0 must be > 0"),
    ],
)
def test_bad_long_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        build_config("model=tiny-llama", *overrides)


def test_online_tasks_run_only_off_local():
    cfg = build_config("model=tiny-llama", "eval.long=[1024]", "eval.long_tasks=[niah_single_2]", "eval.local=false")
    assert list(cfg.eval.long_tasks) == ["niah_single_2"]
    assert list(build_config("model=tiny-llama").eval.long_tasks) == list(RULER_OFFLINE)
    assert list(build_config("model=tiny-llama").eval.long) == []  # off by default


def test_long_alone_passes_preflight():
    """eval.long with no short task and no short perplexity reads no task files: nothing to
    refuse (RULER builds its data; the loss by position reads WikiText-2, which is there)."""
    cfg = build_config("model=tiny-llama", f"data_dir={data_root()}", "stage=eval", "eval.tasks=[]", "eval.ppl_tokens=0",
                       "eval.long=[1024]")  # fmt: skip
    check_eval(cfg)
    check_eval(build_config("model=tiny-llama", f"data_dir={data_root()}", "stage=eval", "eval.tasks=[]",
                            "eval.ppl_tokens=0", "eval.long=[1024]", "eval.long_ppl_tokens=0"))  # fmt: skip
    with pytest.raises(FileNotFoundError, match="no evaluation data"):
        check_eval(build_config("model=tiny-llama", "data_dir=/nonexistent", "stage=eval", "eval.tasks=[]",
                                "eval.ppl_tokens=0", "eval.long=[1024]"))  # fmt: skip


def test_a_length_over_the_context_is_refused_before_scoring(tmp_path):
    prep = prepared(tmp_path, *LONG, "eval.long=[1024,4096]", "eval.long_ppl_tokens=16384")
    with pytest.raises(ValueError, match=r"\[4096\] tokens, over the model's context of 2048"):
        run_eval(prep)
    assert not (tmp_path / "eval").exists()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny lolcats model, swapped and LoRA-tuned one step, exported whole."""
    run_dir = tmp_path_factory.mktemp("long")
    run_finetune(prepared(run_dir, "stage=finetune"))
    run_export(prepared(run_dir, "stage=export", "export.merge=true"))  # a random teacher: whole weights
    return run_dir


def test_ruler_and_long_positions_end_to_end(exported):
    """stage=eval with eval.long on a tiny export: RULER at two lengths with 2 samples each for
    the teacher and the converted model, the loss by position in 2048-token windows, the report
    section and long.png. It checks the wiring, not the score (the model is random)."""
    out = run_eval(prepared(exported, *LONG))
    report = json.loads((out / "report.json").read_text())
    assert report["meta"]["converted"].endswith("export")
    long = report["long"]
    assert long["lengths"] == [1024, 2048] and long["window"] == 2048
    rows = {(r["task"], r["length"]): r for r in long["ruler"]}
    assert list(rows) == [("niah_single_1", 1024), ("niah_single_1", 2048), ("mean", 1024), ("mean", 2048)]
    for n in (1024, 2048):
        row = rows[("niah_single_1", n)]
        assert row["n"] == 2 and 0.0 <= row["teacher"] <= 1.0 and 0.0 <= row["converted"] <= 1.0
        assert rows[("mean", n)]["teacher"] == row["teacher"]
    by_position = long["by_position"]
    assert set(by_position) == {"teacher", "converted"}
    for buckets in by_position.values():
        assert [b["from"] for b in buckets] == [0, *position_edges(2048)]
        assert sum(b["tokens"] for b in buckets) == 4096 - 2  # two windows, each first token unscored
    text = (out / "report.md").read_text()
    assert "### Recall and long context" in text and "| niah_single_1 | 2048 | 2 |" in text
    assert "disjoint 2048-token windows" in text
    assert (out / "long.png").stat().st_size > 5_000


@pytest.mark.slow
def test_ruler_from_the_lm_eval_command_line(exported, tmp_path):
    """The README's command: lm-eval's own CLI scores a RULER task on an exported directory,
    loaded with trust_remote_code, its tokenizer taken from the directory."""
    export = exported / "export"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf",
           "--model_args", f"pretrained={export},trust_remote_code=True", "--tasks", "niah_single_1",
           "--metadata", '{"max_seq_lengths":[1024]}', "--limit", "2", "--output_path", str(tmp_path)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (results,) = tmp_path.rglob("results_*.json")
    found = json.loads(results.read_text())
    assert found["n-samples"]["niah_single_1"]["effective"] == 2
    assert 0.0 <= found["results"]["niah_single_1"]["1024,none"] <= 1.0
