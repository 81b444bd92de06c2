"""scripts/layer_scale.py: stage-1 error per layer relative to the teacher's output there."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, data_root

pytestmark = pytest.mark.slow  # subprocesses

TINY = ["model=tiny-llama", "data.max_examples=120", "data.seq_len=64", "data.val_fraction=0.1"]


def test_relative_error_of_a_finished_transfer_run(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "linearize", "stage=transfer", "attention=hedgehog", *TINY,
                    "train.max_steps=2", f"data_dir={data_root()}", f"run.dir={run}"],
                   cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    out = tmp_path / "scale.json"
    done = subprocess.run([sys.executable, "scripts/layer_scale.py", str(run), "--rows", "2", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.read_text())
    mse = json.loads((run / "transfer" / "result.json").read_text())["val_mse_per_layer"]
    assert [r["layer"] for r in rows] == sorted(int(i) for i in mse)
    for r in rows:
        assert r["val_mse"] == mse[str(r["layer"])]
        assert r["teacher_mean_square"] > 0 and torch.isfinite(torch.tensor(r["teacher_mean_square"]))
        assert abs(r["relative"] - r["val_mse"] / r["teacher_mean_square"]) < 1e-12
    assert "relative" in done.stdout


def test_a_run_without_transfer_is_refused(tmp_path):
    done = subprocess.run([sys.executable, "scripts/layer_scale.py", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode != 0 and "transfer/result.json not found" in done.stderr
