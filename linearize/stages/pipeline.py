"""``stage=all``: the stages of ``pipeline`` in order, each composed and checked as if run alone,
skipping those already done with the settings asked for."""

from __future__ import annotations

import shutil
from pathlib import Path

from omegaconf import DictConfig

from linearize.config import Config
from linearize.fingerprint import adopt_source, stage_fingerprint
from linearize.log import get_logger
from linearize.rundir import (
    RunDirError,
    has_work,
    lock_run_dir,
    resume_differences,
    shown,
    stage_status,
    work_dir,
    work_fingerprint,
)
from linearize.stages.dispatch import run_prepared
from linearize.stages.preflight import check_values, preflight
from linearize.stages.prepare import prepare

log = get_logger(__name__)


def run_all(config: Config, cfg: DictConfig, overrides: list[str]) -> None:
    """The stages of ``pipeline`` in order (transfer -> finetune -> export, or a recipe's), each
    composed as if run alone with ``stage=<it>`` (so each gets its own stage defaults) and
    ``run.resume=true``; every stage's values are checked before the first one starts.

    A stage is skipped only when its output is whole and made with the fingerprint asked for
    now (which holds the upstream outputs' fingerprints, so a change upstream reruns every stage
    after it). Otherwise it runs: from its checkpoints when they were made with the same
    settings, else from the start, its old work discarded (the log says which keys differ).
    """
    from hydra import compose

    from linearize.config import validate

    overrides = [o for o in overrides if not o.startswith(("stage=", "run.resume="))]
    run_dir = Path(config.run.dir)
    planned = []
    for stage in config.pipeline:
        sub = compose(config_name="config", overrides=[*overrides, f"stage={stage}", "run.resume=true", f"run.dir={run_dir}"])
        try:
            sub_config = validate(sub)
            check_values(sub_config)
        except (ValueError, OSError) as err:
            err.bad_input = True  # as in prepare: __main__ shows the message only
            raise
        planned.append((stage, sub, sub_config))
    lock_run_dir(run_dir)
    for stage, sub, sub_config in planned:
        try:
            sub_config = adopt_source(sub_config, overrides)
            expected = stage_fingerprint(sub_config, stage)
        except (ValueError, OSError) as err:
            err.bad_input = True
            raise
        done, why = stage_status(run_dir, stage, expected)
        if done:
            log.info("stage=all: %s already done with these settings (%s), skipping", stage, run_dir / stage)
            continue
        log.info("stage=all: running %s (%s)", stage, why)
        work = work_dir(run_dir, stage)
        if has_work(work):
            try:
                diff = resume_differences(work_fingerprint(work), expected)
            except RunDirError as err:  # its fingerprint file is damaged
                diff = [str(err)]
            if diff:
                log.warning("stage=all: discarding %s, made with other settings: %s", work, shown(diff))
                shutil.rmtree(work)
        try:
            preflight(sub_config)
        except (ValueError, OSError) as err:
            err.bad_input = True
            raise
        prepared = prepare(sub_config, sub)
        run_prepared(stage, prepared)
