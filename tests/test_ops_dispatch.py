"""The dispatch (`linearize.ops`) picks the backend as asked, fails loudly where Triton cannot run,
and imports without Triton; every kernel compiles for a GPU; and, when the kernels cannot run in
this process, the kernel tests of every test_ops_*.py in a fresh one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from linearize import ops
from tests.conftest import KERNEL_TESTS_ONLY
from tests.ops_testing import (
    CUDA,
    DEV,
    HAS_TRITON,
    ROOT,
    import_kernels,
    kernels_fixture,
    linear_inputs,
    window_inputs,
)

if not HAS_TRITON:
    pytest.skip("Triton is not installed", allow_module_level=True)

_, PROBLEM = import_kernels("linear")
kernels = kernels_fixture("linear")
KERNEL_TEST_FILES = [f"tests/test_ops_{kind}.py" for kind in ("dispatch", "delta", "gated", "linear", "window")]


@pytest.mark.skipif(PROBLEM is None, reason="the kernels run in this process")
def test_in_a_fresh_process():
    """The fast kernel tests (those using the `kernels` fixture) of every test_ops_*.py in a
    process where TRITON_INTERPRET=1 precedes Triton's import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[KERNEL_TESTS_ONLY] = "1"
    cmd = [sys.executable, "-m", "pytest", *KERNEL_TEST_FILES, "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]


def test_dispatch_routes_backend_triton_to_the_kernels(kernels, monkeypatch):
    calls = []
    real = kernels.linear_attn_chunked
    monkeypatch.setattr(kernels, "linear_attn_chunked", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = linear_inputs(1, 2, 2, 5, 16, 16).values()
    y = ops.linear_attn(q.to(DEV), k.to(DEV), v.to(DEV), backend="triton")
    assert calls and y.shape == (1, 2, 5, 16)
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert ops.resolve_backend("reference", DEV) == "reference"
    if CUDA:
        assert ops.resolve_backend("auto", DEV) == "triton"


@pytest.mark.skipif(CUDA, reason="on a GPU machine backend=triton runs")
def test_triton_without_interpreter_on_cpu_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, k, v = linear_inputs(1, 2, 2, 5, 16, 16).values()
    named = r"attention\.backend=triton.*TRITON_INTERPRET.*attention\.backend=reference"
    with pytest.raises(ops.BackendUnavailableError, match=named):
        ops.linear_attn(q, k, v, backend="triton")
    with pytest.raises(ops.BackendUnavailableError, match="attention.backend=triton"):
        ops.resolve_backend("triton", torch.device("cpu"))
    assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"


_NO_TRITON = """
import sys, torch
sys.modules["triton"] = None  # as on a machine without Triton
from linearize import ops
q = torch.rand(1, 1, 3, 4)
assert ops.resolve_backend("auto", torch.device("cpu")) == "reference"
ops.linear_attn(q, q, q)  # auto: the reference
try:
    ops.linear_attn(q, q, q, backend="triton")
except ops.BackendUnavailableError as e:
    print("ERROR:", e)
"""


@pytest.mark.slow
def test_ops_import_and_errors_without_triton():
    """In a fresh process with Triton unimportable: ops imports, auto runs, triton is an error."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ERROR: attention.backend=triton cannot run here: Triton cannot be imported" in out.stdout


_COMPILE = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from triton.runtime.jit import JITFunction
launches = []
JITFunction.run = lambda self, *args, grid, warmup, **kw: launches.append((self, args, kw))
import linearize.ops.delta.triton as delta
import linearize.ops.gated.triton as gated
import linearize.ops.linear.triton as linear
import linearize.ops.window.triton as window
from linearize.ops.delta.reference import DeltaState
from linearize.ops.gated.reference import GatedState
from linearize.ops.linear.reference import LinearState
B, H, HK, T, F, DK, D, dt = 1, 4, 2, 40, 32, 64, 128, torch.bfloat16
r = lambda *s: torch.rand(*s, dtype=dt, requires_grad=True)
q, k, v, qq, kk = r(B, H, T, F), r(B, HK, T, F), r(B, HK, T, D), r(B, H, T, DK), r(B, HK, T, DK)
calls = [
    lambda: linear.linear_attn_chunked(q, k, v, initial_state=LinearState(torch.rand(B, H, F, D), torch.rand(B, H, F))),
    lambda: gated.gated_attn_chunked(q, k, v, -torch.rand(B, HK, T, F),
                                     initial_state=GatedState(torch.rand(B, H, F, D))),
    lambda: gated.gated_attn_chunked(q, k, v, -torch.rand(B, HK, T)),
    lambda: window.window_attn_chunked(qq, kk, v, q, k, window=8, window_factor=torch.rand(H), scale=0.1),
    lambda: delta.delta_attn_chunked(q, k, v, torch.rand(B, HK, T), -torch.rand(B, HK, T),
                                     initial_state=DeltaState(torch.rand(B, H, F, D))),
    lambda: delta.delta_attn_chunked(q, k, v, torch.rand(B, HK, T)),
]
for call in calls:
    try:  # the launches are recorded, not run: the backward then reads garbage
        call().sum().backward()
    except (RuntimeError, IndexError):
        pass
with torch.no_grad():
    one = lambda x: x[:, :, :1]
    linear.linear_attn_step(one(q), one(k), one(v), None)
    gated.gated_attn_step(one(q), one(k), one(v), -torch.rand(B, HK, 1, F), None)
    delta.delta_attn_step(one(q), one(k), one(v), torch.rand(B, HK, 1), None, None)
    window.window_attn_step(one(qq), one(kk), one(v), one(q), one(k), None, window=4, window_factor=torch.rand(H), scale=0.1)
names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32"}
done = set()
for fn, args, kw in launches:
    sig, const = {}, {}
    for p, a in zip(fn.params, args):
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", a
        else:
            scalar = {bool: "i1", int: "i32", float: "fp32"}
            sig[p.name] = "*" + names[a.dtype] if isinstance(a, torch.Tensor) else scalar[type(a)]
    key = (fn.fn.__module__, fn.__name__, str(const))
    if key not in done:
        done.add(key)
        opts = {"num_warps": kw.get("num_warps", 4)}
        compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", 90, 32), options=opts)
        print("compiled", fn.fn.__module__.split(".")[-2], fn.__name__)  # the kind
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    """Every kernel compiles to sm_90 machine code (Triton's bundled ptxas; no GPU needed):
    the interpreter accepts code the compiler rejects, so CPU-only CI checks this too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("compiled") == 20, out.stdout


def test_window_kernel_is_never_dispatched_on_cuda(monkeypatch):
    """The compiled window kernel was wrong on an H200 (docs/kernels.md): on CUDA ``auto`` takes
    the reference and ``triton`` is an error naming why, before any kernel runs."""
    cuda = torch.device("cuda")
    assert ops._window_backend("auto", 0, cuda) == "reference"
    assert ops._window_backend("reference", 0, cuda) == "reference"
    with pytest.raises(ops.BackendUnavailableError, match=r"window attention on CUDA.*miscompiled.*not yet verified.*backend=auto"):
        ops._window_backend("triton", 0, cuda)
    assert ops._window_backend("triton", 0, torch.device("cpu")) == "triton"  # interpreted: still tested
    assert ops._window_backend("triton", 0, cuda, step=True) == "triton"  # the step passed compiled
    assert ops._window_backend("auto", 0, torch.device("cpu")) == "auto"
    # the op itself asks the guard, and with the answer for CUDA it runs the reference
    real, seen = ops._window_backend, []
    monkeypatch.setattr(ops, "_window_backend", lambda b, n, d: seen.append((b, d.type)) or real(b, n, cuda))
    monkeypatch.setattr(ops, "_kernels", lambda kind: pytest.fail(f"the {kind} kernels were dispatched"))
    x = window_inputs(1, 2, 2, 9, 16, 8, 16)
    y = ops.window_attn(**x, window=4, scale=0.25, backend="auto")
    assert seen == [("auto", "cpu")] and y.shape == (1, 2, 9, 16)
