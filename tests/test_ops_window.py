"""The LoLCATs window hybrid (`linearize.ops.window`): the reference forms agree with themselves
(quadratic == chunked == step loop, forward and every gradient), with a definition by hand, and
with softmax attention (torch's SDPA) where they reduce to it; the Triton kernel (`triton.py`)
equals them, also continued from a decoding cache. How each is measured: tests/ops_testing.py.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from linearize.ops.common import expand_kv
from linearize.ops.softmax.reference import softmax_attn
from linearize.ops.window import reference as ref
from tests.ops_testing import (
    CHUNK_CASES,
    CHUNK_IDS,
    CUDA,
    DEV,
    FP32,
    HEADS,
    STEP_CASES,
    STEP_IDS,
    B,
    D,
    assert_close,
    assert_kernel_close,
    assert_same_with_grads,
    check,
    check_fp32_forms,
    kernels_fixture,
    leaf,
    run_with_grads,
    sdpa,
    split_impls,
    step_loop,
    window_inputs,
    window_leaves,
)

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
def test_window_chunked_matches_quadratic(t, chunk, heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "sinks": sinks}
    impls = {
        "quadratic": lambda **x: ref.window_attn_quadratic(**x, **kw),
        "chunked": lambda **x: ref.window_attn_chunked(**x, **kw, chunk_size=chunk),
    }
    assert_same_with_grads(impls, window_leaves(t, heads, f=24 if heads == "gqa" else 16))  # F != D too


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_window_step_matches_quadratic(t, heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "sinks": sinks}
    impls = {
        "quadratic": lambda **x: ref.window_attn_quadratic(**x, **kw),
        "step": lambda **x: step_loop(ref.window_attn_step, x, static=("window_factor",), **kw)[0],
    }
    assert_same_with_grads(impls, window_leaves(t, heads, f=24))


@pytest.mark.parametrize("sinks", [0, 4], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("window", [1, 4, 64], ids=lambda w: f"W{w}")
@pytest.mark.parametrize("heads", HEADS)
def test_window_state_continues(heads, window, sinks):
    kw = {"window": window, "scale": D**-0.5, "chunk_size": 16, "sinks": sinks}
    impls = split_impls(ref.window_attn_chunked, ref.window_attn_step, 29, static=("window_factor",), **kw)
    assert_same_with_grads(impls, window_leaves(63, heads))


@pytest.mark.parametrize("split", [2, 5, 11])
def test_window_state_continues_while_the_sinks_fill(split):
    """A state made before every sink has left the window: the next keys to leave are sinks."""
    kw = {"window": 3, "scale": D**-0.5, "chunk_size": 4, "sinks": 6}
    impls = split_impls(ref.window_attn_chunked, ref.window_attn_step, split, static=("window_factor",), **kw)
    assert_same_with_grads(impls, window_leaves(23, "gqa"))
    x = {n: t.detach() for n, t in window_leaves(23, "gqa").items()}
    _, state = ref.window_attn_chunked(**x, **kw, output_final_state=True)
    assert state.sk.shape[2] == 6 and torch.equal(state.sk, expand_kv(x["k"][:, :, :6].double(), 4))
    assert torch.equal(state.sv, expand_kv(x["v"][:, :, :6].double(), 4))


def test_window_sinks_definition():
    """Each query: softmax (max-shifted) over its window and the first `sinks` keys, the linear
    scores over its other earlier keys, one normalizer; written out by hand."""
    t, window, sinks, scale, eps = 20, 4, 3, 0.5, 1e-6
    x = {n: v.detach() for n, v in window_leaves(t, "mha").items()}
    got = ref.window_attn_quadratic(**x, window=window, scale=scale, sinks=sinks, eps=eps)
    want = torch.zeros_like(got)
    for b, h, i in itertools.product(range(B), range(4), range(t)):
        f = x["window_factor"][h]
        soft = [j for j in range(i + 1) if i - j < window or j < sinks]
        linear = [j for j in range(i + 1) if j not in soft]
        s = torch.stack([scale * x["q"][b, h, i] @ x["k"][b, h, j] for j in soft])
        e = torch.exp(s - s.max())
        a = [x["fq"][b, h, i] @ x["fk"][b, h, j] for j in linear]
        num = f * sum(e_ * x["v"][b, h, j] for e_, j in zip(e, soft)) + (1 - f) * sum(a_ * x["v"][b, h, j] for a_, j in zip(a, linear))
        den = f * e.sum() + (1 - f) * sum(a, torch.tensor(0.0, dtype=e.dtype))
        want[b, h, i] = num / (den + eps)
    assert_close("sinks", got, want)
    no_sinks = ref.window_attn_quadratic(**x, window=window, scale=scale, eps=eps)
    assert (no_sinks - got)[:, :, window:].abs().max() > 1e-3  # a sink leaves the window at query `window`
    torch.testing.assert_close(no_sinks[:, :, :window], got[:, :, :window], rtol=0, atol=1e-12)


FAMILIES = {  # inputs, (quadratic, chunked, step), keyword arguments, inputs without a time dim
    "window": (
        lambda: window_leaves(63, "gqa", f=24),
        (ref.window_attn_quadratic, ref.window_attn_chunked, ref.window_attn_step),
        {"window": 4, "scale": D**-0.5},
        ("window_factor",),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_forms_match_fp64(family):
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64."""
    check_fp32_forms(*FAMILIES[family])


def test_window_final_state_holds_last_keys():
    x = window_leaves(10, "mha")
    _, state = ref.window_attn_chunked(**x, window=4, scale=D**-0.5, chunk_size=3, output_final_state=True)
    assert_close("cached k", state.k, x["k"][:, :, -3:])  # window 4 = the next query + 3 cached keys
    assert_close("cached v", state.v, x["v"][:, :, -3:])
    assert_close("cached fk", state.fk, x["fk"][:, :, -3:])
    assert_close("S", state.S, x["fk"][:, :, :7].mT @ x["v"][:, :, :7])
    assert_close("z", state.z, x["fk"][:, :, :7].sum(2))


@pytest.mark.parametrize("t", [7, 63])
@pytest.mark.parametrize("heads", HEADS)
def test_window_beyond_length_is_softmax(t, heads):
    x = {n: v.detach() for n, v in window_leaves(t, heads).items()}
    want = sdpa(x["q"], x["k"], x["v"], D**-0.5)
    # eps=0: with no linear terms the normalizer is f * sum(exp) >= f > 0, and eps would bias it.
    for window in (t, 64):
        got = ref.window_attn_quadratic(**x, window=window, scale=D**-0.5, eps=0.0)
        assert_close(f"window {window}", got, want)
        got = ref.window_attn_chunked(**x, window=window, scale=D**-0.5, eps=0.0, chunk_size=16)
        assert_close(f"chunked window {window}", got, want)


@pytest.mark.parametrize("window", [1, 4])
@pytest.mark.parametrize("heads", HEADS)
def test_window_factor_one_is_windowed_softmax(heads, window):
    x = {n: v.detach() for n, v in window_leaves(63, heads).items()}
    x["window_factor"] = torch.ones_like(x["window_factor"])
    # eps=0: the softmax sum is >= 1 (its max term is e^0), and eps would bias it by up to 1e-6.
    got = ref.window_attn_quadratic(**x, window=window, scale=D**-0.5, eps=0.0)
    assert_close("hybrid f=1", got, softmax_attn(x["q"], x["k"], x["v"], scale=D**-0.5, window=window))


def test_window_large_logits_stay_finite():
    x = window_leaves(63, "gqa")
    x["q"] = leaf(x["q"] * 100)
    for name, fn in {
        "quadratic": lambda **a: ref.window_attn_quadratic(**a, window=8, scale=D**-0.5),
        "chunked": lambda **a: ref.window_attn_chunked(**a, window=8, scale=D**-0.5, chunk_size=16),
    }.items():
        y, grads, _ = run_with_grads(fn, x)
        assert torch.isfinite(y).all(), name
        assert all(torch.isfinite(g).all() for g in grads.values()), name


# The Triton kernel equals the reference: forward, every gradient, states, steps (fp32 unless said).

kernels = kernels_fixture("window")

WINDOW = {  # b, h, h_kv, t, dk, f, d, window, chunk, cached
    "T1": (1, 2, 2, 1, 16, 16, 16, 4, 16, None),
    "T63-gqa-W20-F32-D40": (1, 4, 2, 63, 24, 32, 40, 20, 16, None),
    "T10-below-window64-hd64": (1, 2, 1, 10, 64, 32, 64, 64, 16, None),
    "T40-window1": (1, 2, 2, 40, 16, 16, 16, 1, 32, None),
    "T50-hd128-F64-W16": (1, 2, 2, 50, 128, 64, 128, 16, 64, None),
    "T45-cache7-gqa": (1, 4, 2, 45, 24, 16, 40, 12, 16, 7),
    "T20-cache-full-W64": (1, 2, 2, 20, 16, 16, 16, 64, 32, 63),
    # keys leave the window into the state block after block (the cases that failed compiled did)
    "T150-gqa-W20-C16": (1, 4, 2, 150, 24, 16, 40, 20, 16, None),
    "T90-cache11-gqa-W12-C16": (1, 4, 2, 90, 24, 16, 24, 12, 16, 11),
}


@pytest.mark.parametrize("case", WINDOW)
def test_window_matches_reference(case, kernels):
    b, h, h_kv, t, dk, f, d, window, chunk, cached = WINDOW[case]
    torch.manual_seed(0)
    inputs = window_inputs(b, h, h_kv, t, dk, f, d, cached)
    kwargs = dict(window=window, scale=dk**-0.5, chunk_size=chunk, output_final_state=cached is not None)
    check(case, kernels.window_attn_chunked, ref.window_attn_chunked, inputs, kwargs)


def test_continuation_equals_one_pass(kernels):
    """Two calls with the state handed over equal one call."""
    torch.manual_seed(0)
    t1 = 21
    win = {k: v.to(DEV) for k, v in window_inputs(1, 4, 2, 50, 16, 16, 24).items()}
    wf = win.pop("window_factor")
    kw = dict(window=9, window_factor=wf, scale=0.25)
    whole = kernels.window_attn_chunked(*win.values(), **kw)
    y1, state = kernels.window_attn_chunked(*(x[:, :, :t1] for x in win.values()), output_final_state=True, **kw)
    y2 = kernels.window_attn_chunked(*(x[:, :, t1:] for x in win.values()), initial_state=state, **kw)
    assert_kernel_close("window split", torch.cat([y1, y2], 2), whole, **FP32)


def test_steps_match_reference_steps(kernels):
    """Decoding token by token (through a filling and then sliding window cache) equals the
    reference's step loop, states included; GQA heads."""
    torch.manual_seed(0)
    t = 12
    with torch.no_grad():
        win = {k: v.to(DEV) for k, v in window_inputs(2, 4, 2, t, 16, 16, 24).items()}
        kw = dict(window=5, window_factor=win.pop("window_factor"), scale=0.25)
        got, s_got = step_loop(kernels.window_attn_step, win, **kw)
        want, s_want = step_loop(ref.window_attn_step, win, **kw)
        for name, g, w in zip(("y", *ref.WindowState._fields), (got, *s_got), (want, *s_want)):
            assert (g is None) == (w is None), name  # no sinks: none in either state
            if g is not None:
                assert_kernel_close(f"window step {name}", g, w, **FP32)


def test_chunked_then_steps(kernels):
    """A prefill's final state continued by decoding steps equals the reference over the whole."""
    torch.manual_seed(0)
    win = {k: v.to(DEV) for k, v in window_inputs(1, 4, 2, 30, 16, 16, 24).items()}
    kw = dict(window=8, window_factor=win.pop("window_factor"), scale=0.25)
    with torch.no_grad():
        y1, state = kernels.window_attn_chunked(*(x[:, :, :22] for x in win.values()), output_final_state=True, **kw)
        y2, _ = step_loop(kernels.window_attn_step, {n: x[:, :, 22:] for n, x in win.items()}, state=state, **kw)
        want = ref.window_attn_quadratic(*win.values(), **kw)
    assert_kernel_close("prefill + steps", torch.cat([y1, y2], 2), want, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_reference(dtype, kernels):
    torch.manual_seed(0)
    inputs, kwargs = window_inputs(1, 4, 2, 70, 64, 32, 64), dict(window=24, scale=0.125)
    check(f"window {dtype}", kernels.window_attn_chunked, ref.window_attn_chunked, inputs, kwargs, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_long_sequences(dtype, kernels):
    torch.manual_seed(0)
    t = 1000
    check("gpu window", kernels.window_attn_chunked, ref.window_attn_chunked,
          window_inputs(2, 8, 2, t, 128, 64, 128), dict(window=64, scale=128**-0.5), dtype=dtype)  # fmt: skip
