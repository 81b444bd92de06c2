"""Two CPU processes under torchrun (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, data_root

pytestmark = pytest.mark.slow

COMMON = [
    "stage=transfer", "model=tiny-llama", "attention=lolcats", "attention.window=8",
    "data.max_examples=80", "data.seq_len=64", "train.max_steps=3", "train.eval_every=1",
    "train.grad_accum=2",
]  # fmt: skip


def _run(prefix: list[str], *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*prefix, "-m", "linearize", *COMMON, f"data_dir={data_root()}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_two_ranks_equal_one_process_with_the_same_global_batch(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    _run(torchrun, "train.batch_size=1", f"run.dir={tmp_path / 'two'}")
    _run([sys.executable], "train.batch_size=2", f"run.dir={tmp_path / 'one'}")
    two = load_file(tmp_path / "two" / "transfer" / "attention.safetensors")
    one = load_file(tmp_path / "one" / "transfer" / "attention.safetensors")
    assert two.keys() == one.keys() and len(one) == 6
    for name in one:
        # Three AdamW steps at lr 1e-2 from the same start; gradients differ only by the order
        # of float additions (all-reduce vs one batch), so a few 1e-6 of drift is expected.
        diff = (two[name] - one[name]).abs().max().item()
        assert diff < 1e-5, (name, diff)
    # only rank 0 wrote: one checkpoint, one result
    ckpts = list((tmp_path / "two" / "transfer" / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-0000003"]
