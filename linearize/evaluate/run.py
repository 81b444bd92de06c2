"""``stage=eval``: score the run's converted model beside its teacher and write the report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from linearize.evaluate.harness import evaluate
from linearize.evaluate.perplexity import perplexity, wikitext2_text
from linearize.evaluate.report import compare, write_report
from linearize.log import get_logger
from linearize.fingerprint import check_chain, converted_source, stage_fingerprint
from linearize.models.convert import apply_converted
from linearize.rundir import publish, read_manifest, write_manifest

log = get_logger(__name__)


def score(model, tokenizer, cfg) -> dict[str, Any]:
    """Task scores (lm-eval) and WikiText-2 perplexity of one model."""
    e = cfg.eval
    by_limit: dict[Any, list[str]] = {}  # one harness call per distinct limit
    for task in e.tasks:
        by_limit.setdefault(e.task_limits.get(task, e.limit), []).append(task)
    scored: dict[str, Any] = {}
    for limit, tasks in by_limit.items():
        scored.update(evaluate(model, tokenizer, tasks, data_dir=cfg.data_dir, limit=limit,
                               batch_size=e.batch_size, local=e.local))  # fmt: skip
    results = {task: scored[task] for task in e.tasks}
    if e.ppl_tokens != 0:
        try:
            text = wikitext2_text(cfg.data_dir)
        except FileNotFoundError as err:
            results["wikitext2"] = {"skipped": f"local data missing: {err}"}
        else:
            ppl = perplexity(model, tokenizer, text, seq_len=e.ppl_seq_len, stride=e.ppl_stride,
                             max_tokens=e.ppl_tokens, buckets=e.ppl_buckets)  # fmt: skip
            results["wikitext2"] = {"metric": "ppl", "value": ppl["ppl"], "n": ppl["tokens"],
                                    "by_position": ppl["by_position"]}  # fmt: skip
    return results


def run_eval(prepared, accelerator=None, tracker=None) -> Path:
    """Score the run's latest converted model (and the teacher); the report appears in
    ``<run.dir>/eval`` by one rename, its manifest last."""
    cfg = prepared.config
    run_dir = Path(cfg.run.dir)
    try:
        source = converted_source(run_dir, "eval")
    except FileNotFoundError:
        source = None
        log.warning("no converted model in %s: scoring the teacher alone", run_dir)
    else:
        check_chain(source)
    fingerprint = stage_fingerprint(cfg, "eval")
    teacher_scores = score(prepared.teacher, prepared.tokenizer, cfg) if cfg.eval.teacher or source is None else None
    converted_scores = None
    if source is not None:
        model = apply_converted(prepared.teacher, source, seed=cfg.run.seed)
        converted_scores = score(model, prepared.tokenizer, cfg)
    rows = compare(teacher_scores, converted_scores)
    title = f"{cfg.model.name}: teacher vs {source.name if source else 'none'} ({cfg.attention.name})"
    meta = {"model": cfg.model.name, "converted": str(source) if source else None, "limit": cfg.eval.limit,
            "task_limits": dict(cfg.eval.task_limits), "tasks": list(cfg.eval.tasks),
            "ppl_tokens": cfg.eval.ppl_tokens,
            "layers": read_manifest(source).get("layers") if source else None}  # fmt: skip
    written = {}

    def write(tmp: Path) -> None:
        written["text"] = write_report(rows, tmp, title, meta)
        write_manifest(tmp, {"stage": "eval"}, fingerprint)

    out_dir = publish(run_dir, "eval", write)
    log.info("evaluation report (%s):\n%s", out_dir, written["text"])
    return out_dir
