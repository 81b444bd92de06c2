"""Crash-anywhere resume, short: scripts/chaos_resume.py's trials, 2 per mode (see its docstring).

Each trial kills a real `python -m linearize` run (at a random moment, or as a checkpoint, a
hidden-state cache shard or a stage's published output is being written), or makes its writes
fail as on a full disk, reruns it and compares the result with an uninterrupted run's: weights
bit for bit, and for the pipeline (`stage=all`) the export's logits (torch.equal).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.conftest import ROOT, data_root

pytestmark = pytest.mark.slow


def chaos_module():
    spec = importlib.util.spec_from_file_location("chaos_resume", ROOT / "scripts" / "chaos_resume.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up; chaos_pipeline imports it
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["transfer", "finetune", "blockwise"])
def test_killed_runs_resume_to_the_same_weights(tmp_path, stage):
    chaos = chaos_module()
    # Trial 0 kills at a random moment; trial 1 as a checkpoint (blockwise: a cache shard) is written.
    total, exact, lost = chaos.run_stage(stage, 2, seed=0, work=tmp_path, data_dir=data_root(), max_kills=1)
    assert (total, exact, lost) == (2, 2, 0), f"{stage}: {total} trials, {exact} exact, {lost} lost"


@pytest.mark.parametrize("mode", ["all", "disk"])
def test_killed_or_full_disk_pipeline_ends_with_the_same_export(tmp_path, mode):
    # all: trial 0 kills at a random moment, trial 1 as a stage's publish temp dir appears.
    # disk: trial 0 a merged export that does not fit, trial 1 a stage=all that runs out partway.
    chaos = chaos_module()
    total, exact, lost = chaos.run_stage(mode, 2, seed=0, work=tmp_path, data_dir=data_root(), max_kills=1)
    assert (total, exact, lost) == (2, 2, 0), f"{mode}: {total} trials, {exact} exact, {lost} lost"
