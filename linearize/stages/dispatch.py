"""The dispatch table: what each ``stage=`` value runs on a :class:`Prepared`, with the metrics
tracker open."""

from __future__ import annotations

from typing import Callable

from omegaconf import OmegaConf

from linearize.log import Tracker
from linearize.stages import eval as evaluation
from linearize.stages import export, finetune, generate, prepare, transfer, uptrain
from linearize.stages.prepare import Prepared

RUNNERS: dict[str, Callable[[Prepared], object]] = {
    "prepare": prepare.run,
    "transfer": transfer.run,
    "finetune": finetune.run,
    "uptrain": uptrain.run,
    "export": export.run,
    "eval": evaluation.run,
    "generate": generate.run,
}


def run_prepared(stage: str, prepared: Prepared) -> None:
    """Run ``stage`` on ``prepared`` with its metrics tracker open (``prepare``, a dry run, opens none)."""
    if stage != "prepare":
        c = prepared.config
        config = OmegaConf.to_container(OmegaConf.structured(c))
        prepared.tracker = Tracker(c.logging.wandb, c.logging.project, str(prepared.run_dir), config)
    try:
        RUNNERS[stage](prepared)
    finally:
        if prepared.tracker is not None:
            prepared.tracker.finish()
            prepared.tracker = None
