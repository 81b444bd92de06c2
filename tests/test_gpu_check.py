"""`make gpu-check`'s dry run (scripts/gpu_check.py --dry-run): the GPU check command runs on the
CPU on tiny shapes, interpreted, and prints its three parts with every kernel and both stage-1
rows, so the command keeps working between GPU sessions; the window kernel's diagnosis script
runs; the window kernels compile for a GPU (sm_90, on the CPU) with no scalar carried through a
loop (scripts/compiled_loops.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_reports_every_part():
    cmd = [sys.executable, "scripts/gpu_check.py", "--dry-run"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    block = out.stdout
    assert block.startswith("### GPU check: CPU"), block[:200]
    for path in ("test_ops_linear", "test_ops_window", "test_ops_gated", "test_ops_delta"):
        row = next(line for line in block.splitlines() if path in line)
        passed, failed = (int(c) for c in row.split("|")[2:4])
        assert passed > 0 and failed == 0, row
    for method in ("sdpa-softmax", "linear-triton", "window-triton", "gated-triton", "delta-triton", "gated_delta-triton"):
        assert f"| {method} | 16 |" in block, method
    stage1 = [line for line in block.splitlines() if line.startswith("| tiny-llama")]
    assert len(stage1) == 2 and not any("failed" in line for line in stage1), stage1
    assert "every check passed" in block


def test_window_diagnosis_runs_interpreted():
    """The script gpu_check runs when the window kernel fails compiled: on the CPU its short shapes
    (a cached GQA case, keys leaving into the state block after block) find the kernel exact."""
    cmd = [sys.executable, "scripts/diag_window_kernel.py", "--quick"]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if "kernel-vs-ref" in line]
    assert len(lines) == 3 and "ERROR" not in out.stdout, out.stdout
    assert all("first bad t None; bad rows 0;" in line for line in lines), out.stdout


@pytest.mark.slow
def test_window_kernels_compile_for_a_gpu_without_a_carried_scalar():
    """Compiled for sm_90 here (no GPU needed), no window kernel carries a scalar through a loop:
    the pattern Triton 3.4-3.7 miscompile, which made the window kernel wrong on an H200."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "scripts/compiled_loops.py", "--check"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    kernels = [line for line in out.stdout.splitlines() if "TTIR loops" in line]
    assert len(kernels) == 10, out.stdout  # fwd, dq with and without a state, dkv; fp32 and bf16
    assert "repro: this Triton" in out.stdout, out.stdout
