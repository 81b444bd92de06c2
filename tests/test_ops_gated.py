"""Gated linear attention (`linearize.ops.gated`): the reference forms agree with themselves
(quadratic == chunked == step loop, forward and every gradient), with plain linear attention at
zero gates and with a recurrence written out, also under decays far outside exp's range; the
Triton kernel (`triton.py`) equals them. How each is measured: tests/ops_testing.py.
"""

from __future__ import annotations

import pytest
import torch

from linearize.ops.gated import reference as ref
from linearize.ops.linear.reference import linear_attn_quadratic
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
    gated_inputs,
    gated_leaves,
    kernels_fixture,
    linear_inputs,
    split_impls,
    step_loop,
)

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
def test_gated_chunked_matches_quadratic(t, chunk, heads, gate):
    impls = {
        "quadratic": lambda **x: ref.gated_attn_quadratic(**x, scale=0.5),
        "chunked": lambda **x: ref.gated_attn_chunked(**x, scale=0.5, chunk_size=chunk),
    }
    assert_same_with_grads(impls, gated_leaves(t, heads, gate, f=24 if heads == "gqa" else 16))  # F != D too


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_gated_step_matches_quadratic(t, heads, gate):
    impls = {
        "quadratic": lambda **x: ref.gated_attn_quadratic(**x, scale=0.5),
        "step": lambda **x: step_loop(ref.gated_attn_step, x, scale=0.5)[0],
    }
    assert_same_with_grads(impls, gated_leaves(t, heads, gate))


@pytest.mark.parametrize("gate", ["feature", "scalar"])
@pytest.mark.parametrize("heads", HEADS)
def test_gated_state_continues(heads, gate):
    impls = split_impls(ref.gated_attn_chunked, ref.gated_attn_step, 29, chunk_size=16)
    assert_same_with_grads(impls, gated_leaves(63, heads, gate))


FAMILIES = {  # inputs, (quadratic, chunked, step), keyword arguments, inputs without a time dim
    "gated-feature": (
        lambda: gated_leaves(63, "gqa", "feature"),
        (ref.gated_attn_quadratic, ref.gated_attn_chunked, ref.gated_attn_step),
        {"scale": 0.5},
        (),
    ),
    "gated-scalar": (
        lambda: gated_leaves(63, "gqa", "scalar"),
        (ref.gated_attn_quadratic, ref.gated_attn_chunked, ref.gated_attn_step),
        {"scale": 0.5},
        (),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_forms_match_fp64(family):
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64."""
    check_fp32_forms(*FAMILIES[family])


@pytest.mark.parametrize("gate", ["feature", "scalar"])
def test_gated_zero_gate_is_linear(gate):
    x = {n: v.detach() for n, v in gated_leaves(37, "gqa", gate).items()}
    x["g"] = torch.zeros_like(x["g"])
    want = 0.5 * linear_attn_quadratic(x["q"], x["k"], x["v"], normalize=False)
    assert_close("quadratic", ref.gated_attn_quadratic(**x, scale=0.5), want)
    assert_close("chunked", ref.gated_attn_chunked(**x, scale=0.5, chunk_size=16), want)


def test_gated_constant_decay_matches_loop():
    q, k, v, _ = (x.detach() for x in gated_leaves(37, "mha", "scalar").values())
    gamma = 1 - 2.0 ** (-1 - torch.arange(4.0, dtype=torch.float64))  # RetNet-like, but strong
    g = gamma.log().view(1, 4, 1).expand(B, 4, 37)
    s = torch.zeros(B, 4, 16, D, dtype=torch.float64)
    want = []
    for t in range(37):
        s = gamma.view(1, 4, 1, 1) * s + k[:, :, t, :, None] * v[:, :, t, None, :]
        want.append(q[:, :, t, None] @ s)
    want = torch.cat(want, 2)
    assert_close("quadratic", ref.gated_attn_quadratic(q, k, v, g), want)
    assert_close("chunked", ref.gated_attn_chunked(q, k, v, g, chunk_size=16), want)


@pytest.mark.parametrize("gate", ["feature", "scalar"])
def test_gated_chunked_strong_decay_stays_finite(gate):
    """Gates down to -40 a token over 300 tokens: the cumulative log decay passes -1000, far
    outside exp's fp32 range, so every exponent must be a span sum taken before exp."""
    x = {n: v.detach() for n, v in gated_leaves(300, "gqa", gate).items()}
    x["g"] = -40 * torch.rand_like(x["g"])
    assert x["g"].sum(2).max() < -1000
    want, final = step_loop(ref.gated_attn_step, x, scale=0.5)
    got, got_final = ref.gated_attn_chunked(**x, scale=0.5, chunk_size=32, output_final_state=True)
    assert torch.isfinite(got).all() and torch.isfinite(got_final.S).all()
    assert_close("chunked", got, want)
    assert_close("final state", got_final.S, final.S)


def test_gated_chunked_far_decaying_blocks_are_redone_exactly():
    """Per-feature gates, mild everywhere but strong (down to -150 a token) in one head over
    tokens 40-71: those blocks' cumulative decay passes e^-30, where the factorised product
    e^G_i e^-G_j is clamped (unclamped, e^-G_j overflows even fp64), so they are recomputed
    pair by pair; the others are not. Forward and gradients against the quadratic form, fp64."""
    x = {n: v.detach().double() for n, v in gated_leaves(100, "mha", "feature").items()}
    g = x["g"].clone()
    g[:, 1, 40:72] = -150 * torch.rand_like(g[:, 1, 40:72])
    x["g"] = g
    assert g[:, 1, 48:64].sum(1).max() < -710  # the 16-token block from 48: e^710 overflows fp64
    assert g[:, 0, :96].unflatten(1, (6, 16)).sum(2).min() > -30  # head 0's blocks are not
    x = {n: v.requires_grad_() for n, v in x.items()}
    want = ref.gated_attn_quadratic(**x, scale=0.5)
    got = ref.gated_attn_chunked(**x, scale=0.5, chunk_size=64)
    assert_close("chunked", got, want)
    cot = torch.randn_like(want)
    for (name, gw), gg in zip(x.items(), torch.autograd.grad(got, list(x.values()), cot)):
        (ww,) = torch.autograd.grad(want, gw, cot, retain_graph=True)
        assert_close(f"grad {name}", gg, ww)


# The Triton kernel equals the reference: forward, every gradient, states, steps (fp32 unless said).

kernels = kernels_fixture("gated")

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
    check(case, kernels.gated_attn_chunked, ref.gated_attn_chunked, inputs, kwargs)


def test_strong_decay_stays_finite(kernels):
    """Gates near -30 per step: every exponent in the kernels is a decay over a span (<= 0)."""
    torch.manual_seed(0)
    inputs = gated_inputs(1, 2, 2, 20, 16, 16, strength=15.0)
    assert inputs["g"].min() < -20
    check("strong", kernels.gated_attn_chunked, ref.gated_attn_chunked, inputs, dict(scale=1.0))


def test_continuation_equals_one_pass(kernels):
    """Two calls with the state handed over equal one call."""
    torch.manual_seed(0)
    t1 = 21
    gla = {k: v.to(DEV) for k, v in gated_inputs(1, 4, 2, 50, 16, 24).items()}
    whole = kernels.gated_attn_chunked(**gla)
    y1, state = kernels.gated_attn_chunked(*(x[:, :, :t1] for x in gla.values()), output_final_state=True)
    y2 = kernels.gated_attn_chunked(*(x[:, :, t1:] for x in gla.values()), initial_state=state)
    assert_kernel_close("gated split", torch.cat([y1, y2], 2), whole, **FP32)


@pytest.mark.parametrize("per_head", [False, True], ids=["per-feature", "per-head"])
def test_steps_match_reference_steps(per_head, kernels):
    """Decoding token by token equals the reference's step loop, states included; GQA heads."""
    torch.manual_seed(0)
    t = 12
    with torch.no_grad():
        gla = {k: v.to(DEV) for k, v in gated_inputs(2, 4, 2, t, 16, 24, per_head=per_head).items()}
        got, s_got = step_loop(kernels.gated_attn_step, gla, scale=0.5)
        want, s_want = step_loop(ref.gated_attn_step, gla, scale=0.5)
        assert_kernel_close("gated step y", got, want, **FP32)
        assert_kernel_close("gated step S", s_got.S, s_want.S, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_reference(dtype, kernels):
    torch.manual_seed(0)
    inputs = gated_inputs(1, 4, 2, 40, 32, 64)
    check(f"gated {dtype}", kernels.gated_attn_chunked, ref.gated_attn_chunked, inputs, {}, dtype=dtype)


def test_bad_calls_raise_clear_errors(kernels):
    q, k, v = linear_inputs(1, 2, 2, 1, 16, 16).values()
    q, k, v = q.to(DEV).requires_grad_(), k.to(DEV), v.to(DEV)
    with pytest.raises(ValueError, match="chunk_size"):  # the reference's own checks
        kernels.gated_attn_chunked(q, k, v, k[..., 0], chunk_size=0)
    with pytest.raises(ValueError, match="g has shape"):
        kernels.gated_attn_chunked(q, k, v, k[..., :3])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_long_sequences(dtype, kernels):
    torch.manual_seed(0)
    check("gpu gated", kernels.gated_attn_chunked, ref.gated_attn_chunked,
          gated_inputs(2, 8, 2, 300, 64, 128), {}, dtype=dtype)  # fmt: skip
