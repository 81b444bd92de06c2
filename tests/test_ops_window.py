"""The LoLCATs window hybrid (`linearize.ops.window`): the reference forms agree with themselves
(quadratic == chunked == step loop, forward and every gradient), with a definition by hand, and
with softmax attention (torch's SDPA) where they reduce to it.

Reference inputs are fp64 unless a test says otherwise, so the forms must agree to rounding (1e-9);
one test holds the fp32 path, which the kernel is compared against, to fp32 tolerance.
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
    HEADS,
    STEP_CASES,
    STEP_IDS,
    B,
    D,
    assert_close,
    assert_same_with_grads,
    check_fp32_forms,
    leaf,
    run_with_grads,
    sdpa,
    split_impls,
    step_loop,
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
