"""The Triton kernels equal the PyTorch reference: forward, every gradient, states, steps.

Without CUDA the kernels run on the CPU in Triton's interpreter, which needs TRITON_INTERPRET=1
when Triton itself is first imported (its library's jit functions are built then). This module
sets it for that import only; if something imported Triton earlier in the session (peft does),
its tests run instead in a fresh process (`test_in_a_fresh_process`). With CUDA they run compiled.
The kernel runs on fp32 (or bf16) inputs and the reference on the same values in fp64, so a
difference is the kernel's own error. Uninitialised buffers are filled with NaN (as
flash-linear-attention's tests do), so a kernel that leaves an output element unwritten fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linearize import ops
from linearize.ops.gated import reference as gated_ref
from linearize.ops.linear import reference as linear_ref
from linearize.ops.window import reference as window_ref

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[1]
FP32 = dict(atol=1e-4, rtol=1e-4)  # every element, outputs and gradients
# 16-bit inputs: the kernels feed 16-bit operands (inputs, probabilities, scores, states) to the
# dots with fp32 accumulation, as flash attention does, and return 16-bit outputs and gradients.
# The forward is held elementwise; gradients, sums of terms that largely cancel (the normalizer's),
# by the rmse ratio and the largest error relative to the largest value (measured: bf16 <= 1.3e-2
# and 2.8e-2, fp16 <= 9e-4 and 9e-4).
HALF = {
    torch.bfloat16: (dict(atol=2e-2, rtol=2e-2), dict(ratio=2e-2, peak=5e-2)),
    torch.float16: (dict(atol=2e-3, rtol=2e-3), dict(ratio=2e-3, peak=5e-3)),
}


def _import_kernels():
    """The kernels package, interpreted when there is no GPU, and why it cannot run here (or None)."""
    if CUDA:
        return importlib.import_module("linearize.ops.triton"), None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # read when Triton and our kernels are first imported
        kernels = importlib.import_module("linearize.ops.triton")
    return kernels, kernels.interpreter_problem()


KERNELS, PROBLEM = _import_kernels()


@pytest.fixture(scope="module")
def kernels():
    """The kernels; TRITON_INTERPRET=1 while they run on CPU (the dispatch checks it); NaN-filled
    empty buffers."""
    if PROBLEM is not None:
        pytest.skip(f"runs in a fresh process (test_in_a_fresh_process): {PROBLEM}")
    with pytest.MonkeyPatch.context() as mp:
        if not CUDA:
            mp.setenv("TRITON_INTERPRET", "1")
        empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
        mp.setattr(torch, "empty", lambda *a, **kw: _poison(empty(*a, **kw)))
        mp.setattr(torch, "empty_like", lambda *a, **kw: _poison(empty_like(*a, **kw)))
        mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poison(new_empty(self, *a, **kw)))
        yield KERNELS


@pytest.mark.skipif(PROBLEM is None, reason="the kernels run in this process")
def test_in_a_fresh_process():
    """This file's fast tests in a process where TRITON_INTERPRET=1 precedes Triton's import."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider", "-m", "not slow and not gpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert out.returncode == 0, out.stdout[-8000:] + out.stderr[-2000:]


def _poison(x: torch.Tensor) -> torch.Tensor:
    return x.fill_(float("nan") if x.is_floating_point() else -(2**30))


def assert_close(name, got, want, *, atol=None, rtol=0.0, ratio=None, peak=None):
    """Pass when every given measure holds: |got - want| <= atol + rtol |want| elementwise;
    rmse(got - want) / rmse(want) <= ratio; max |got - want| <= peak max |want|."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    if want.numel() == 0:
        return
    got, want = got.double(), want.double()
    diff = (got - want).abs().nan_to_num(float("inf"))
    rmse = want.pow(2).mean().sqrt().item()
    err_ratio = diff.pow(2).mean().sqrt().item() / rmse if rmse > 0 else float("inf")
    excess = (diff - rtol * want.abs()).max().item()
    err_peak = diff.max().item() / max(want.abs().max().item(), 1e-30)
    msg = (f"{name}: max |diff| {diff.max().item():.2e} (over rtol {excess:.2e}), rmse ratio {err_ratio:.2e}, "
           f"peak ratio {err_peak:.2e}; allowed atol {atol}, rtol {rtol}, ratio {ratio}, peak {peak}")  # fmt: skip
    assert atol is None or excess <= atol, msg
    assert ratio is None or err_ratio <= ratio, msg
    assert peak is None or err_peak <= peak, msg


def _leaves(inputs: dict, dtype: torch.dtype) -> dict:
    """Fresh leaves (states: each field) in dtype; window_factor and gates stay fp32 for bf16."""

    def leaf(name, x):
        keep = x.dtype if name in ("window_factor", "g") and dtype != torch.float64 else dtype
        return x.detach().to(DEV, keep).requires_grad_()

    out = {}
    for name, x in inputs.items():
        # a state's unused fields (a window state's sinks, with none) stay None
        out[name] = type(x)(*(f if f is None else leaf(name, f) for f in x)) if isinstance(x, tuple) else leaf(name, x)
    return out


def _tensors(inputs: dict) -> list[torch.Tensor]:
    return [t for x in inputs.values() for t in (x if isinstance(x, tuple) else (x,)) if t is not None]


def _run(fn, inputs: dict, kwargs: dict, weights: dict | None):
    """fn's output (and final state), and the grads of a random-weighted sum of them w.r.t. every input."""
    out = fn(**inputs, **kwargs)
    outs = list(out[:1]) + [s for s in out[1] if s is not None] if isinstance(out, tuple) else [out]
    if weights is None:
        gen = torch.Generator().manual_seed(1)
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    loss = sum((o.double() * w.to(DEV)).sum() for o, w in zip(outs, weights))
    grads = torch.autograd.grad(loss, _tensors(inputs), materialize_grads=True)
    return outs, grads, weights


def check(name, fn_triton, fn_ref, inputs, kwargs, *, dtype=torch.float32):
    """fn_triton on dtype inputs against fn_ref on the same values in fp64: outputs and every gradient."""
    tol_y, tol_grad = HALF.get(dtype, (FP32, FP32))
    lo = _leaves(inputs, dtype)
    hi = _leaves(lo, torch.float64)  # the very values the kernel sees, in fp64
    got, got_grads, weights = _run(fn_triton, lo, kwargs, None)
    want, want_grads, _ = _run(fn_ref, hi, kwargs, weights)
    labels = [f"{name} y"] + [f"{name} final_state.{f}" for f in range(len(got) - 1)]
    for label, g, w in zip(labels, got, want):
        assert g.dtype == (lo["v"].dtype if label.endswith(" y") else torch.float32), f"{label}: dtype {g.dtype}"
        assert_close(label, g, w, **tol_y)
    names = [f"{n}.{field}" for n, x in inputs.items()
             for field in ([f for f, v in zip(x._fields, x) if v is not None] if isinstance(x, tuple) else ("",))]  # fmt: skip
    for n, g, w in zip(names, got_grads, want_grads):
        assert_close(f"{name} d{n.rstrip('.')}", g, w, **tol_grad)


def features(*shape):
    return torch.softmax(torch.randn(*shape), -1)  # non-negative, as the hedgehog / Liger maps give


def linear_inputs(b, h, h_kv, t, f, d, state=False):
    x = dict(q=features(b, h, t, f), k=features(b, h_kv, t, f), v=torch.randn(b, h_kv, t, d))
    if state:
        x["initial_state"] = linear_ref.LinearState(torch.rand(b, h, f, d), torch.rand(b, h, f) + 0.5)
    return x


def window_inputs(b, h, h_kv, t, dk, f, d, cached=None):
    x = dict(
        q=torch.randn(b, h, t, dk), k=torch.randn(b, h_kv, t, dk), v=torch.randn(b, h_kv, t, d),
        fq=features(b, h, t, f), fk=features(b, h_kv, t, f), window_factor=torch.rand(h) * 0.8 + 0.1,
    )  # fmt: skip
    if cached is not None:
        x["initial_state"] = window_ref.WindowState(
            torch.rand(b, h, f, d), torch.rand(b, h, f) + 0.5, torch.randn(b, h, cached, dk),
            torch.randn(b, h, cached, d), features(b, h, cached, f),
        )  # fmt: skip
    return x


def gated_inputs(b, h, h_kv, t, f, d, per_head=False, strength=1.0, state=False):
    shape = (b, h_kv, t) if per_head else (b, h_kv, t, f)
    x = dict(
        q=features(b, h, t, f), k=features(b, h_kv, t, f), v=torch.randn(b, h_kv, t, d),
        g=F.logsigmoid(torch.randn(shape) * 2 * strength) * strength,
    )  # fmt: skip
    if state:
        x["initial_state"] = gated_ref.GatedState(torch.randn(b, h, f, d))
    return x


# Forward and every gradient, fp32.

LINEAR = {  # b, h, h_kv, t, f, d, chunk, extra
    "T1-gqa": (1, 4, 2, 1, 16, 16, 16, {}),
    "T63-gqa-F24-D40": (1, 4, 2, 63, 24, 40, 16, {}),
    "T100-D128-chunk64": (2, 2, 2, 100, 32, 128, 64, {}),
    "T37-unnormalized": (1, 2, 1, 37, 16, 24, 32, dict(normalize=False)),
    "T50-state-gqa-D64": (1, 4, 2, 50, 32, 64, 16, dict(state=True)),
}


@pytest.mark.parametrize("case", LINEAR)
def test_linear_matches_reference(case, kernels):
    b, h, h_kv, t, f, d, chunk, extra = LINEAR[case]
    torch.manual_seed(0)
    extra = dict(extra)
    state = extra.pop("state", False)
    inputs = linear_inputs(b, h, h_kv, t, f, d, state=state)
    kwargs = dict(chunk_size=chunk, output_final_state=state, **extra)
    check(case, kernels.linear_attn_chunked, linear_ref.linear_attn_chunked, inputs, kwargs)


WINDOW = {  # b, h, h_kv, t, dk, f, d, window, chunk, cached
    "T1": (1, 2, 2, 1, 16, 16, 16, 4, 16, None),
    "T63-gqa-W20-F32-D40": (1, 4, 2, 63, 24, 32, 40, 20, 16, None),
    "T10-below-window64-hd64": (1, 2, 1, 10, 64, 32, 64, 64, 16, None),
    "T40-window1": (1, 2, 2, 40, 16, 16, 16, 1, 32, None),
    "T50-hd128-F64-W16": (1, 2, 2, 50, 128, 64, 128, 16, 64, None),
    "T45-cache7-gqa": (1, 4, 2, 45, 24, 16, 40, 12, 16, 7),
    "T20-cache-full-W64": (1, 2, 2, 20, 16, 16, 16, 64, 32, 63),
}


@pytest.mark.parametrize("case", WINDOW)
def test_window_matches_reference(case, kernels):
    b, h, h_kv, t, dk, f, d, window, chunk, cached = WINDOW[case]
    torch.manual_seed(0)
    inputs = window_inputs(b, h, h_kv, t, dk, f, d, cached)
    kwargs = dict(window=window, scale=dk**-0.5, chunk_size=chunk, output_final_state=cached is not None)
    check(case, kernels.window_attn_chunked, window_ref.window_attn_chunked, inputs, kwargs)


GATED = {  # b, h, h_kv, t, f, d, extra
    "T1": (1, 2, 2, 1, 16, 16, {}),
    "T63-gqa-F24-D40": (1, 4, 2, 63, 24, 40, {}),
    "T63-gqa-per-head": (1, 4, 2, 63, 24, 40, dict(per_head=True)),
    "T40-strong-decay": (1, 2, 2, 40, 16, 16, dict(strength=4.0)),
    "T33-hd128": (1, 2, 2, 33, 128, 128, {}),
    "T30-state-gqa-per-head": (1, 4, 2, 30, 16, 32, dict(per_head=True, state=True)),
    "T30-state-per-feature": (1, 2, 2, 30, 16, 32, dict(state=True)),
}


@pytest.mark.parametrize("case", GATED)
def test_gated_matches_reference(case, kernels):
    b, h, h_kv, t, f, d, extra = GATED[case]
    torch.manual_seed(0)
    inputs = gated_inputs(b, h, h_kv, t, f, d, **extra)
    kwargs = dict(scale=0.7, chunk_size=16, output_final_state=extra.get("state", False))
    check(case, kernels.gated_attn_chunked, gated_ref.gated_attn_chunked, inputs, kwargs)


def test_strong_decay_stays_finite(kernels):
    """Gates near -30 per step: every exponent in the kernels is a decay over a span (<= 0)."""
    torch.manual_seed(0)
    inputs = gated_inputs(1, 2, 2, 20, 16, 16, strength=15.0)
    assert inputs["g"].min() < -20
    check("strong", kernels.gated_attn_chunked, gated_ref.gated_attn_chunked, inputs, dict(scale=1.0))


# Continuation: two calls with the state handed over equal one call; steps equal the reference's.


def test_continuation_equals_one_pass(kernels):
    torch.manual_seed(0)
    t1 = 21
    lin = {k: v.to(DEV) for k, v in linear_inputs(1, 4, 2, 50, 16, 24).items()}
    whole = kernels.linear_attn_chunked(**lin, chunk_size=16)
    y1, state = kernels.linear_attn_chunked(*(x[:, :, :t1] for x in lin.values()), output_final_state=True)
    y2 = kernels.linear_attn_chunked(*(x[:, :, t1:] for x in lin.values()), initial_state=state)
    assert_close("linear split", torch.cat([y1, y2], 2), whole, **FP32)

    win = {k: v.to(DEV) for k, v in window_inputs(1, 4, 2, 50, 16, 16, 24).items()}
    wf = win.pop("window_factor")
    kw = dict(window=9, window_factor=wf, scale=0.25)
    whole = kernels.window_attn_chunked(*win.values(), **kw)
    y1, state = kernels.window_attn_chunked(*(x[:, :, :t1] for x in win.values()), output_final_state=True, **kw)
    y2 = kernels.window_attn_chunked(*(x[:, :, t1:] for x in win.values()), initial_state=state, **kw)
    assert_close("window split", torch.cat([y1, y2], 2), whole, **FP32)

    gla = {k: v.to(DEV) for k, v in gated_inputs(1, 4, 2, 50, 16, 24).items()}
    whole = kernels.gated_attn_chunked(**gla)
    y1, state = kernels.gated_attn_chunked(*(x[:, :, :t1] for x in gla.values()), output_final_state=True)
    y2 = kernels.gated_attn_chunked(*(x[:, :, t1:] for x in gla.values()), initial_state=state)
    assert_close("gated split", torch.cat([y1, y2], 2), whole, **FP32)


def _step_loop(step, tokens: dict, state, **kw):
    ys = []
    for i in range(next(iter(tokens.values())).shape[2]):
        y, state = step(**{n: x[:, :, i : i + 1] for n, x in tokens.items()}, state=state, **kw)
        ys.append(y)
    return torch.cat(ys, 2), state


@pytest.mark.parametrize("per_head", [False, True], ids=["per-feature", "per-head"])
def test_steps_match_reference_steps(per_head, kernels):
    """Decoding token by token (through a filling and then sliding window cache) equals the
    reference's step loop, states included; GQA heads."""
    torch.manual_seed(0)
    t = 12
    with torch.no_grad():
        if not per_head:
            lin = {k: v.to(DEV) for k, v in linear_inputs(2, 4, 2, t, 16, 24).items()}
            got, s_got = _step_loop(kernels.linear_attn_step, lin, None)
            want, s_want = _step_loop(linear_ref.linear_attn_step, lin, None)
            for name, g, w in zip(("y", "S", "z"), (got, *s_got), (want, *s_want)):
                assert_close(f"linear step {name}", g, w, **FP32)
            win = {k: v.to(DEV) for k, v in window_inputs(2, 4, 2, t, 16, 16, 24).items()}
            kw = dict(window=5, window_factor=win.pop("window_factor"), scale=0.25)
            got, s_got = _step_loop(kernels.window_attn_step, win, None, **kw)
            want, s_want = _step_loop(window_ref.window_attn_step, win, None, **kw)
            for name, g, w in zip(("y", *window_ref.WindowState._fields), (got, *s_got), (want, *s_want)):
                assert (g is None) == (w is None), name  # no sinks: none in either state
                if g is not None:
                    assert_close(f"window step {name}", g, w, **FP32)
        gla = {k: v.to(DEV) for k, v in gated_inputs(2, 4, 2, t, 16, 24, per_head=per_head).items()}
        got, s_got = _step_loop(kernels.gated_attn_step, gla, None, scale=0.5)
        want, s_want = _step_loop(gated_ref.gated_attn_step, gla, None, scale=0.5)
        assert_close("gated step y", got, want, **FP32)
        assert_close("gated step S", s_got.S, s_want.S, **FP32)


def test_chunked_then_steps(kernels):
    """A prefill's final state continued by decoding steps equals the reference over the whole."""
    torch.manual_seed(0)
    win = {k: v.to(DEV) for k, v in window_inputs(1, 4, 2, 30, 16, 16, 24).items()}
    kw = dict(window=8, window_factor=win.pop("window_factor"), scale=0.25)
    with torch.no_grad():
        y1, state = kernels.window_attn_chunked(*(x[:, :, :22] for x in win.values()), output_final_state=True, **kw)
        y2, _ = _step_loop(kernels.window_attn_step, {n: x[:, :, 22:] for n, x in win.items()}, state, **kw)
        want = window_ref.window_attn_quadratic(*win.values(), **kw)
    assert_close("prefill + steps", torch.cat([y1, y2], 2), want, **FP32)


# 16-bit inputs.


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("family", ["linear", "window", "gated"])
def test_half_precision_matches_reference(family, dtype, kernels):
    torch.manual_seed(0)
    inputs, kwargs = {
        "linear": (linear_inputs(1, 4, 2, 70, 32, 64), {}),
        "window": (window_inputs(1, 4, 2, 70, 64, 32, 64), dict(window=24, scale=0.125)),
        "gated": (gated_inputs(1, 4, 2, 40, 32, 64), {}),
    }[family]
    name = f"{family}_attn_chunked"
    check(f"{family} {dtype}", getattr(kernels, name), getattr({"linear": linear_ref, "window": window_ref, "gated": gated_ref}[family], name), inputs, kwargs, dtype=dtype)


# Dispatch.


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


def test_bad_calls_raise_clear_errors(kernels):
    q, k, v = linear_inputs(1, 2, 2, 1, 16, 16).values()
    q, k, v = q.to(DEV).requires_grad_(), k.to(DEV), v.to(DEV)
    with pytest.raises(RuntimeError, match="forward-only.*torch.no_grad"):
        kernels.linear_attn_step(q, k, v, None)
    with pytest.raises(TypeError, match="attention.backend=reference"):
        kernels.linear_attn_chunked(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="chunk_size"):  # the reference's own checks
        kernels.gated_attn_chunked(q, k, v, k[..., 0], chunk_size=0)
    with pytest.raises(ValueError, match="g has shape"):
        kernels.gated_attn_chunked(q, k, v, k[..., :3])


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
import linearize.ops.triton as K
from linearize.ops.gated import reference as gated_ref
from linearize.ops.linear import reference as linear_ref
B, H, HK, T, F, DK, D, dt = 1, 4, 2, 40, 32, 64, 128, torch.bfloat16
r = lambda *s: torch.rand(*s, dtype=dt, requires_grad=True)
q, k, v, qq, kk = r(B, H, T, F), r(B, HK, T, F), r(B, HK, T, D), r(B, H, T, DK), r(B, HK, T, DK)
calls = [
    lambda: K.linear_attn_chunked(q, k, v, initial_state=linear_ref.LinearState(torch.rand(B, H, F, D), torch.rand(B, H, F))),
    lambda: K.gated_attn_chunked(q, k, v, -torch.rand(B, HK, T, F),
                                 initial_state=gated_ref.GatedState(torch.rand(B, H, F, D))),
    lambda: K.gated_attn_chunked(q, k, v, -torch.rand(B, HK, T)),
    lambda: K.window_attn_chunked(qq, kk, v, q, k, window=8, window_factor=torch.rand(H), scale=0.1),
]
for call in calls:
    try:  # the launches are recorded, not run: the backward then reads garbage
        call().sum().backward()
    except (RuntimeError, IndexError):
        pass
with torch.no_grad():
    one = lambda x: x[:, :, :1]
    K.linear_attn_step(one(q), one(k), one(v), None)
    K.gated_attn_step(one(q), one(k), one(v), -torch.rand(B, HK, 1, F), None)
    K.window_attn_step(one(qq), one(kk), one(v), one(q), one(k), None, window=4, window_factor=torch.rand(H), scale=0.1)
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
        print("compiled", fn.fn.__module__.rsplit(".", 1)[-1], fn.__name__)
"""


@pytest.mark.slow
def test_kernels_compile_for_a_gpu():
    """Every kernel compiles to sm_90 machine code (Triton's bundled ptxas; no GPU needed):
    the interpreter accepts code the compiler rejects, so CPU-only CI checks this too."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-c", _COMPILE]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert out.stdout.count("compiled") == 15, out.stdout


# On a GPU: compiled kernels, longer sequences.


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_long_sequences(dtype, kernels):
    torch.manual_seed(0)
    t = 1000
    check("gpu linear", kernels.linear_attn_chunked, linear_ref.linear_attn_chunked,
          linear_inputs(2, 8, 2, t, 64, 128), {}, dtype=dtype)  # fmt: skip
    check("gpu window", kernels.window_attn_chunked, window_ref.window_attn_chunked,
          window_inputs(2, 8, 2, t, 128, 64, 128), dict(window=64, scale=128**-0.5), dtype=dtype)  # fmt: skip
    check("gpu gated", kernels.gated_attn_chunked, gated_ref.gated_attn_chunked,
          gated_inputs(2, 8, 2, 300, 64, 128), {}, dtype=dtype)  # fmt: skip
