"""``stage=uptrain`` (SUPRA): swap the attention in and train ``train.trainable`` (the new
parameters, the converted layers' attention, or the whole model) on ``finetune.objective``, with
no transfer stage and no adapter; :func:`linearize.stages.finetune.tune` does the work."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from torch import nn

from linearize.attention.hooks import set_mode
from linearize.config import AttentionConfig
from linearize.models.swap import swap_attention
from linearize.stages.finetune import tune
from linearize.stages.prepare import Prepared


def run(prepared: Prepared) -> Path:
    """Swap, train ``train.trainable``, write ``<run.dir>/uptrain``."""
    return tune(prepared, "uptrain", fresh_swap, prepared.config.train.trainable)


def fresh_swap(prepared: Prepared) -> tuple[nn.Module, AttentionConfig]:
    """The teacher with ``attention`` swapped in, in student mode."""
    cfg = prepared.config
    report = swap_attention(prepared.teacher, cfg.attention, seed=cfg.run.seed)
    set_mode(prepared.teacher, "student")
    return prepared.teacher, replace(cfg.attention, softmax_layers=report.softmax)

