"""Export: the final converted model of a run, as deltas over the teacher or merged in full.

``<run.dir>/export`` receives the latest stage's converted model (``finetune`` if it ran, else
``uptrain``, else ``transfer``). With ``export.merge=true`` the adapter is merged into the
projections and the whole model is written (``model.safetensors`` + ``config.json``, without
the stage-1 parameters, which stay in ``attention.safetensors``); its manifest then names the
export directory itself as the teacher, so it loads without the original teacher. A source
that was itself written whole (``stage=uptrain`` training more than the new parameters) is
always exported whole.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import peft

from linearize.config import AdapterConfig, AttentionConfig, ModelConfig
from linearize.log import get_logger
from linearize.models.convert import MANIFEST, apply_converted, full_weight_files, read_manifest, save_converted

log = get_logger(__name__)


CONVERTED_STAGES = ("export", "finetune", "uptrain", "transfer")
"""Stages that write a converted model, latest in a pipeline first."""


def latest_stage_dir(run_dir: Path, stages: tuple[str, ...] = CONVERTED_STAGES) -> Path:
    """The directory of the latest of ``stages`` (latest first) that wrote a converted model."""
    for stage in stages:
        if (run_dir / stage / MANIFEST).is_file():
            return run_dir / stage
    raise FileNotFoundError(
        f"{run_dir} holds no converted model yet: run stage=transfer (and finetune), "
        "stage=uptrain or stage=all first"
    )


def save_full(model, out_dir: Path, *, teacher: ModelConfig, attention: AttentionConfig, tokenizer,
              seed: int, extra: dict) -> None:  # fmt: skip
    """Write ``model`` (a swapped teacher, no adapter) whole: ``model.safetensors`` holds every
    weight but the new attention parameters, and the manifest names ``out_dir`` as the teacher,
    so the directory loads without the original teacher."""
    weights = {n: p for n, p in model.state_dict().items() if ".mixer." not in n}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=weights)
    own = replace(teacher, path=str(out_dir.resolve()), init="pretrained", tokenizer=None)
    save_converted(model, out_dir, teacher=own, attention=attention, softmax_layers=attention.softmax_layers,
                   tokenizer=tokenizer, seed=seed, extra=extra)  # fmt: skip


def run_export(prepared, accelerator=None, tracker=None) -> Path:
    cfg = prepared.config
    run_dir = Path(cfg.run.dir)
    source = latest_stage_dir(run_dir, CONVERTED_STAGES[1:])
    manifest = read_manifest(source)
    out_dir = run_dir / "export"
    model = apply_converted(prepared.teacher, source, seed=cfg.run.seed)
    attention = AttentionConfig(**manifest["attention"])
    # A source written whole (uptrain of more than the new parameters) stays whole.
    whole = cfg.export.merge or bool(full_weight_files(source))
    extra = {"stage": "export", "source": str(source), "merged": whole}
    if not whole:
        save_converted(model, out_dir, teacher=cfg.model, attention=attention,
                       softmax_layers=attention.softmax_layers,
                       adapter=AdapterConfig(**manifest["adapter"]) if manifest["adapter"] else None,
                       tokenizer=prepared.tokenizer, seed=cfg.run.seed, extra=extra)  # fmt: skip
    else:
        plain = model.merge_and_unload() if isinstance(model, peft.PeftModel) else model
        save_full(plain, out_dir, teacher=cfg.model, attention=attention, tokenizer=prepared.tokenizer,
                  seed=cfg.run.seed, extra=extra)  # fmt: skip
    log.info("exported %s (%s) to %s", source, "whole" if whole else "deltas", out_dir)
    return out_dir
