"""Rank-zero logging and optional wandb tracking.

Library code logs through :func:`get_logger`; records from processes other than rank 0 are
dropped so a multi-process run prints each message once. wandb is imported only when enabled.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional


def process_rank() -> int:
    """Global rank of this process as set by torchrun / accelerate (0 when not distributed)."""
    return int(os.environ.get("RANK", "0"))


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0


def get_logger(name: str) -> logging.Logger:
    logger = logging.getLogger(name)
    if not any(isinstance(f, _RankZeroFilter) for f in logger.filters):
        logger.addFilter(_RankZeroFilter())
    return logger


class Tracker:
    """Metrics sink: wandb when ``mode`` is online/offline, otherwise the logger only."""

    def __init__(self, mode: str, project: str, run_dir: str, config: dict[str, Any]):
        self._run: Optional[Any] = None
        if mode != "disabled" and process_rank() == 0:
            import wandb

            self._run = wandb.init(
                project=project, dir=run_dir, config=config, mode=mode, resume="allow"
            )

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
