"""Helpers the tests of `linearize.ops` share: inputs, error measures, step loops."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

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
