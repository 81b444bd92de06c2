"""Crash-anywhere resume, short: scripts/chaos_resume.py's trials, 2 per stage (see its docstring).

Each trial SIGKILLs a real `python -m linearize` run (at a random moment, or as a checkpoint or
a hidden-state cache shard is being written), resumes it with run.resume=true and compares the
final weights with an uninterrupted run's, bit for bit.
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
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("stage", ["transfer", "finetune", "blockwise"])
def test_killed_runs_resume_to_the_same_weights(tmp_path, stage):
    chaos = chaos_module()
    if stage == "finetune":
        chaos.reference_run("transfer", tmp_path, data_root())  # stage 2 starts from stage 1's output
    # Trial 0 kills at a random moment; trial 1 as a checkpoint (blockwise: a cache shard) is written.
    total, exact, lost = chaos.run_stage(stage, 2, seed=0, work=tmp_path, data_dir=data_root(), max_kills=1)
    assert (total, exact, lost) == (2, 2, 0), f"{stage}: {total} trials, {exact} exact, {lost} lost"
