"""``stage=eval``: score the run's converted model beside its teacher and write the report."""

from __future__ import annotations

from pathlib import Path

from linearize.evaluate.long import RulerSamples, check_lengths, long_score
from linearize.evaluate.report import compare, compare_long, write_report
from linearize.evaluate.score import score
from linearize.fingerprint import check_chain, converted_source, stage_fingerprint
from linearize.log import get_logger
from linearize.models.convert import apply_converted
from linearize.rundir import publish, read_manifest, write_manifest
from linearize.stages.prepare import Prepared

log = get_logger(__name__)


def run(prepared: Prepared) -> Path:
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
    with_teacher = cfg.eval.teacher or source is None
    if cfg.eval.long:
        check_lengths(prepared.teacher, cfg.eval)  # before any scoring
    samples = RulerSamples(prepared.tokenizer, list(cfg.eval.long_tasks)) if cfg.eval.long else None
    teacher_scores = teacher_long = converted_scores = converted_long = None
    if with_teacher:  # first: apply_converted swaps the teacher in place
        teacher_scores = score(prepared.teacher, prepared.tokenizer, cfg)
        if samples:
            teacher_long = long_score(prepared.teacher, prepared.tokenizer, cfg, samples)
    if source is not None:
        model = apply_converted(prepared.teacher, source, seed=cfg.run.seed)
        converted_scores = score(model, prepared.tokenizer, cfg)
        if samples:
            converted_long = long_score(model, prepared.tokenizer, cfg, samples)
    rows = compare(teacher_scores, converted_scores)
    long = compare_long(teacher_long, converted_long) if samples else None
    title = f"{cfg.model.name}: teacher vs {source.name if source else 'none'} ({cfg.attention.name})"
    meta = {"model": cfg.model.name, "converted": str(source) if source else None, "limit": cfg.eval.limit,
            "task_limits": dict(cfg.eval.task_limits), "tasks": list(cfg.eval.tasks),
            "ppl_tokens": cfg.eval.ppl_tokens, "long": list(cfg.eval.long), "long_samples": cfg.eval.long_samples,
            "layers": read_manifest(source).get("layers") if source else None}  # fmt: skip
    written = {}

    def write(tmp: Path) -> None:
        written["text"] = write_report(rows, tmp, title, meta, long)
        write_manifest(tmp, {"stage": "eval"}, fingerprint)

    out_dir = publish(run_dir, "eval", write)
    log.info("evaluation report (%s):\n%s", out_dir, written["text"])
    return out_dir
