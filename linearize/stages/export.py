"""``stage=export``: the final converted model of a run, as deltas over the teacher or merged in full.

``<run.dir>/export`` receives the latest stage's converted model (``finetune`` if it ran, else
``uptrain``, else ``transfer``). With ``export.merge=true`` the adapter is merged into the
projections and the whole model is written (``model.safetensors`` + ``config.json``, without
the stage-1 parameters, which stay in ``attention.safetensors``); its manifest then names the
export directory itself as the teacher, so it loads without the original teacher. A source
that was itself written whole (``stage=uptrain`` training more than the new parameters) is
always exported whole.
"""

from __future__ import annotations

from pathlib import Path

import peft

from linearize.config import AdapterConfig, AttentionConfig, ModelConfig
from linearize.fingerprint import check_chain, converted_source, stage_fingerprint
from linearize.log import get_logger
from linearize.models.convert import apply_converted, full_weight_files, save_converted, save_full
from linearize.rundir import publish
from linearize.stages.prepare import Prepared

log = get_logger(__name__)


def run(prepared: Prepared) -> Path:
    """Write the run's latest converted model to ``<run.dir>/export`` (one rename, manifest last).
    ``prepared.config`` holds the teacher and seed the source recorded (see ``adopt_source``)."""
    cfg = prepared.config
    run_dir = Path(cfg.run.dir)
    source = converted_source(run_dir, "export")
    manifest = check_chain(source)
    fingerprint = stage_fingerprint(cfg, "export")
    model = apply_converted(prepared.teacher, source, seed=cfg.run.seed)
    attention = AttentionConfig(**manifest["attention"])
    # A source written whole (uptrain of more than the new parameters) stays whole.
    whole = cfg.export.merge or bool(full_weight_files(source))
    extra = {"stage": "export", "source": str(source), "merged": whole}
    teacher = ModelConfig.from_record(manifest["teacher_origin"]) if manifest.get("teacher_origin") else cfg.model

    def write(tmp: Path) -> None:
        if not whole:
            save_converted(model, tmp, teacher=teacher, attention=attention,
                           softmax_layers=attention.softmax_layers,
                           adapter=AdapterConfig(**manifest["adapter"]) if manifest["adapter"] else None,
                           tokenizer=prepared.tokenizer, seed=cfg.run.seed, extra=extra, fingerprint=fingerprint)  # fmt: skip
        else:
            plain = model.merge_and_unload() if isinstance(model, peft.PeftModel) else model
            save_full(plain, tmp, home=run_dir / "export", teacher=teacher, attention=attention,
                      tokenizer=prepared.tokenizer, seed=cfg.run.seed, extra=extra, fingerprint=fingerprint)  # fmt: skip

    out_dir = publish(run_dir, "export", write)
    log.info("exported %s (%s) to %s", source, "whole" if whole else "deltas", out_dir)
    return out_dir
