"""What each ``stage=`` value runs: one module per stage, each with one ``run(prepared)``.

Every stage starts from :func:`~linearize.stages.prepare.prepare` (the checked config, run dir,
teacher and data: :class:`~linearize.stages.prepare.Prepared`) after
:func:`~linearize.stages.preflight.preflight` has checked everything that needs no model;
``stage=all`` (:mod:`linearize.stages.pipeline`) chains the pipeline's stages;
:mod:`linearize.stages.dispatch` holds the table of what each stage runs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from linearize.config import PIPELINE_STAGES, Config
from linearize.fingerprint import stage_fingerprint
from linearize.log import get_logger
from linearize.rundir import RunDirError, lock_run_dir, stage_status
from linearize.stages import prepare
from linearize.stages.dispatch import RUNNERS, run_prepared
from linearize.stages.pipeline import run_all
from linearize.stages.preflight import checked_config

__all__ = ["RUNNERS", "checked_config", "run_prepared", "run_stage"]

log = get_logger(__name__)


def run_stage(config: Config, cfg: DictConfig, overrides: Optional[list[str]] = None) -> None:
    """Run ``config.stage`` holding the run dir's lock (``generate`` only reads: no lock)."""
    if config.stage == "all":
        run_all(config, cfg, list(overrides or []))
        return
    if config.stage != "generate":
        lock_run_dir(Path(config.run.dir))
    if config.stage in PIPELINE_STAGES:
        try:
            done, why = stage_status(Path(config.run.dir), config.stage, stage_fingerprint(config, config.stage))
        except (FileNotFoundError, RunDirError):
            done, why = False, "no whole output"
        if not done and why != "no output yet":
            log.info("stage %s: replacing the output in %s (%s)", config.stage, Path(config.run.dir) / config.stage, why)
    prepared = prepare.prepare(config, cfg)
    run_prepared(config.stage, prepared)
    log.info("stage %s done; outputs in %s", config.stage, prepared.run_dir)
