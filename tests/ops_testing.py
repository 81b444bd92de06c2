"""Helpers the tests of `linearize.ops` share: inputs, error measures, step loops, and the Triton
kernels' import, fixture and checks.

The reference forms are checked against each other (`assert_close`) on fp64 inputs unless a
test says otherwise, so they must agree to rounding (1e-9); one test per kind holds the fp32 path,
which the kernels are compared against, to fp32 tolerance (`check_fp32_forms`). The kernels are
checked against the reference, forward and every gradient (`check`): the kernel runs on fp32 (or
bf16/fp16) inputs and the reference on the same values in fp64, so a difference is the kernel's
own error.

Without CUDA the kernels run on the CPU in Triton's interpreter, which needs TRITON_INTERPRET=1
when Triton itself is first imported (its library's jit functions are built then). `import_kernels`
sets it for that import only; if something imported Triton earlier in the session (peft does),
the kernel tests run instead in a fresh process (test_ops_dispatch.py::test_in_a_fresh_process).
With CUDA they run compiled. Under the `kernels` fixture uninitialised buffers are filled with
NaN (as flash-linear-attention's tests do), so a kernel that leaves an output element unwritten
fails.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from linearize.ops.delta.reference import DeltaState
from linearize.ops.gated.reference import GatedState
from linearize.ops.linear.reference import LinearState
from linearize.ops.window.reference import WindowState

B, D = 2, 16
HEADS = {"mha": (4, 4), "gqa": (4, 2)}
DIMS = {"F16": 16, "F24": 24}  # feature dim equal to / different from the head dim

CHUNK_CASES = list(itertools.product([1, 7, 63, 130], [16, 64], HEADS))
CHUNK_IDS = [f"T{t}-C{c}-{h}" for t, c, h in CHUNK_CASES]
STEP_CASES = list(itertools.product([1, 7, 63, 130], HEADS))
STEP_IDS = [f"T{t}-{h}" for t, h in STEP_CASES]


def assert_close(name, got, want, ratio=None, atol=None):
    """Pass when rmse(got - want) / rmse(want) <= ratio or max |got - want| <= atol.

    Defaults: 1e-9 / 1e-10 when want is fp64 (the forms must agree up to rounding, so even a
    misplaced eps shows), 1e-5 / 1e-5 otherwise.
    """
    tight = want.dtype == torch.float64
    ratio = (1e-9 if tight else 1e-5) if ratio is None else ratio
    atol = (1e-10 if tight else 1e-5) if atol is None else atol
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    diff = (got.double() - want.double()).abs()
    max_diff = diff.max().item() if diff.numel() else 0.0
    rmse_want = want.double().pow(2).mean().sqrt().item()
    err_ratio = diff.pow(2).mean().sqrt().item() / rmse_want if rmse_want > 0 else float("inf")
    msg = f"{name}: rmse ratio {err_ratio:.3e}, max abs diff {max_diff:.3e}"
    assert err_ratio <= ratio or max_diff <= atol, msg


def leaf(x):
    return x.detach().double().requires_grad_()


def features(*shape):
    return torch.softmax(torch.randn(*shape), -1)  # non-negative, as a hedgehog / Liger map gives


def run_with_grads(fn, inputs, weight=None):
    """Forward fn(**inputs), then grads of a random-weighted output sum w.r.t. every input."""
    y = fn(**inputs)
    weight = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)) if weight is None else weight
    weight = weight.to(y.dtype)
    # Keys still inside the window at the end never reach the step form's graph: zero, not None.
    grads = torch.autograd.grad((y * weight).sum(), list(inputs.values()), materialize_grads=True)
    return y, dict(zip(inputs, grads)), weight


def assert_same_with_grads(impls, inputs):
    """Every implementation in impls gives the first one's output and gradients."""
    names = list(impls)
    y0, g0, w = run_with_grads(impls[names[0]], inputs)
    for name in names[1:]:
        y, g, _ = run_with_grads(impls[name], inputs, w)
        assert_close(f"{name} y", y, y0)
        for key in inputs:
            assert_close(f"{name} d{key}", g[key], g0[key])


def step_loop(step, inputs, static=(), state=None, **kw):
    """Run a step function token by token over the time dim (2) of inputs not named in static."""
    ys = []
    for t in range(inputs["v"].shape[2]):
        x = {n: (v if n in static else v[:, :, t : t + 1]) for n, v in inputs.items()}
        y, state = step(**x, state=state, **kw)
        ys.append(y)
    return torch.cat(ys, 2), state


def linear_leaves(t, heads, f=16):
    h, hk = HEADS[heads]
    return {
        "q": leaf(features(B, h, t, f)),
        "k": leaf(features(B, hk, t, f)),
        "v": leaf(torch.randn(B, hk, t, D)),
    }


def window_leaves(t, heads, f=16):
    h, hk = HEADS[heads]
    return {
        "q": leaf(torch.randn(B, h, t, D)),
        "k": leaf(torch.randn(B, hk, t, D)),
        "v": leaf(torch.randn(B, hk, t, D)),
        "fq": leaf(features(B, h, t, f)),
        "fk": leaf(features(B, hk, t, f)),
        "window_factor": leaf(torch.rand(h) * 0.8 + 0.1),
    }


def gated_leaves(t, heads, gate, f=16):
    h, hk = HEADS[heads]
    g_shape = (B, hk, t, f) if gate == "feature" else (B, hk, t)
    return {
        "q": leaf(torch.randn(B, h, t, f)),
        "k": leaf(torch.randn(B, hk, t, f) * f**-0.5),
        "v": leaf(torch.randn(B, hk, t, D)),
        "g": leaf(F.logsigmoid(torch.randn(g_shape)) / 4),
    }


def delta_leaves(t, heads, gated, f=16):
    """Delta-rule inputs as its mixer gives them: unit-norm keys (and queries), β in (0, 1),
    per-head log decays when gated (None otherwise, DeltaNet)."""
    h, hk = HEADS[heads]
    x = {
        "q": leaf(F.normalize(torch.randn(B, h, t, f).double(), dim=-1)),
        "k": leaf(F.normalize(torch.randn(B, hk, t, f).double(), dim=-1)),
        "v": leaf(torch.randn(B, hk, t, D)),
        "beta": leaf(torch.rand(B, hk, t)),
    }
    if gated:
        x["g"] = leaf(F.logsigmoid(torch.randn(B, hk, t) + 2))
    return x


def split_impls(chunked, step, split, static=(), **kw):
    """One chunked call; two chunked calls passing the state; a chunked prefill then a step loop.

    static names inputs that have no time dim (window_factor).
    """

    def halves(x):
        first = {n: (v if n in static else v[:, :, :split]) for n, v in x.items()}
        rest = {n: (v if n in static else v[:, :, split:]) for n, v in x.items()}
        return first, rest

    def two_calls(**x):
        first, rest = halves(x)
        y1, state = chunked(**first, output_final_state=True, **kw)
        y2, _ = chunked(**rest, initial_state=state, output_final_state=True, **kw)
        return torch.cat([y1, y2], 2)

    def prefill_then_step(**x):
        first, rest = halves(x)
        y1, state = chunked(**first, output_final_state=True, **kw)
        step_kw = {k: v for k, v in kw.items() if k != "chunk_size"}
        y2, _ = step_loop(step, rest, static, state=state, **step_kw)
        return torch.cat([y1, y2], 2)

    return {"one call": lambda **x: chunked(**x, **kw), "two calls": two_calls, "prefill+step": prefill_then_step}


def check_fp32_forms(make, forms, kw, static):
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64:
    make() gives fp64 leaves, forms is (quadratic, chunked, step), kw their keyword arguments,
    static the inputs without a time dim."""
    quadratic, chunked, step = forms
    x64 = make()
    x32 = {n: v.detach().float().requires_grad_() for n, v in x64.items()}
    y64, g64, w = run_with_grads(lambda **a: quadratic(**a, **kw), x64)
    for name, fn in {
        "quadratic": lambda **a: quadratic(**a, **kw),
        "chunked": lambda **a: chunked(**a, **kw, chunk_size=16),
        "step": lambda **a: step_loop(step, a, static, **kw)[0],
    }.items():
        y32, g32, _ = run_with_grads(fn, x32, w)
        assert y32.dtype == torch.float32
        assert_close(f"{name} y", y32, y64.float())
        for n in x32:
            assert_close(f"{name} d{n}", g32[n], g64[n].float())


def sdpa(q, k, v, scale, mask=None):
    rep = q.shape[1] // k.shape[1]  # expanded here by hand, independent of ref.expand_kv
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None
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


def import_kernels(kind: str):
    """The kind's kernel module (`linearize.ops.<kind>.triton`), interpreted when there is no GPU,
    and why it cannot run here (or None); (None, why) without Triton."""
    if not HAS_TRITON:
        return None, "Triton is not installed"
    name = f"linearize.ops.{kind}.triton"
    if CUDA:
        return importlib.import_module(name), None
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")  # read when Triton and our kernels are first imported
        kernels = importlib.import_module(name)
    from linearize.ops.triton_common import interpreter_problem

    return kernels, interpreter_problem()


def kernels_fixture(kind: str):
    """A module-scoped fixture ``kernels``: the kind's kernel module; TRITON_INTERPRET=1 while
    they run on CPU (the dispatch checks it); NaN-filled empty buffers."""
    module, problem = import_kernels(kind)

    @pytest.fixture(scope="module", name="kernels")
    def kernels():
        if module is None:
            pytest.skip(problem)
        if problem is not None:
            pytest.skip(f"runs in a fresh process (test_ops_dispatch.py::test_in_a_fresh_process): {problem}")
        with pytest.MonkeyPatch.context() as mp:
            if not CUDA:
                mp.setenv("TRITON_INTERPRET", "1")
            empty, empty_like, new_empty = torch.empty, torch.empty_like, torch.Tensor.new_empty
            mp.setattr(torch, "empty", lambda *a, **kw: _poison(empty(*a, **kw)))
            mp.setattr(torch, "empty_like", lambda *a, **kw: _poison(empty_like(*a, **kw)))
            mp.setattr(torch.Tensor, "new_empty", lambda self, *a, **kw: _poison(new_empty(self, *a, **kw)))
            yield module

    return kernels


def _poison(x: torch.Tensor) -> torch.Tensor:
    return x.fill_(float("nan") if x.is_floating_point() else -(2**30))


def assert_kernel_close(name, got, want, *, atol=None, rtol=0.0, ratio=None, peak=None):
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
    """Fresh leaves (states: each field) in dtype; window_factor, gates and β stay fp32 for bf16."""

    def leaf(name, x):
        keep = x.dtype if name in ("window_factor", "g", "beta") and dtype != torch.float64 else dtype
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
        assert_kernel_close(label, g, w, **tol_y)
    names = [f"{n}.{field}" for n, x in inputs.items()
             for field in ([f for f, v in zip(x._fields, x) if v is not None] if isinstance(x, tuple) else ("",))]  # fmt: skip
    for n, g, w in zip(names, got_grads, want_grads):
        assert_kernel_close(f"{name} d{n.rstrip('.')}", g, w, **tol_grad)


def linear_inputs(b, h, h_kv, t, f, d, state=False):
    x = dict(q=features(b, h, t, f), k=features(b, h_kv, t, f), v=torch.randn(b, h_kv, t, d))
    if state:
        x["initial_state"] = LinearState(torch.rand(b, h, f, d), torch.rand(b, h, f) + 0.5)
    return x


def window_inputs(b, h, h_kv, t, dk, f, d, cached=None):
    x = dict(
        q=torch.randn(b, h, t, dk), k=torch.randn(b, h_kv, t, dk), v=torch.randn(b, h_kv, t, d),
        fq=features(b, h, t, f), fk=features(b, h_kv, t, f), window_factor=torch.rand(h) * 0.8 + 0.1,
    )  # fmt: skip
    if cached is not None:
        x["initial_state"] = WindowState(
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
        x["initial_state"] = GatedState(torch.randn(b, h, f, d))
    return x


def delta_inputs(b, h, h_kv, t, f, d, gated=True, state=False):
    x = dict(
        q=F.normalize(torch.randn(b, h, t, f), dim=-1), k=F.normalize(torch.randn(b, h_kv, t, f), dim=-1),
        v=torch.randn(b, h_kv, t, d), beta=torch.rand(b, h_kv, t),
    )  # fmt: skip
    if gated:
        x["g"] = F.logsigmoid(torch.randn(b, h_kv, t) + 2)
    if state:
        x["initial_state"] = DeltaState(torch.randn(b, h, f, d) * 0.3)
    return x
