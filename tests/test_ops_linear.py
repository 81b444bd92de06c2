"""Causal linear attention (`linearize.ops.linear`): the reference forms agree with themselves
(quadratic == chunked == step loop, forward and every gradient) and with a definition by hand;
the Triton kernel (`triton.py`) equals them. How each is measured: tests/ops_testing.py.
"""

from __future__ import annotations

import pytest
import torch

from linearize.ops.linear import reference as ref
from tests.ops_testing import (
    CHUNK_CASES,
    CHUNK_IDS,
    CUDA,
    DEV,
    DIMS,
    FP32,
    HEADS,
    STEP_CASES,
    STEP_IDS,
    assert_close,
    assert_kernel_close,
    assert_same_with_grads,
    check,
    check_fp32_forms,
    kernels_fixture,
    linear_inputs,
    linear_leaves,
    split_impls,
    step_loop,
)

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("t,chunk,heads", CHUNK_CASES, ids=CHUNK_IDS)
@pytest.mark.parametrize("f", DIMS.values(), ids=DIMS.keys())
def test_linear_chunked_matches_quadratic(t, chunk, heads, f, normalize):
    impls = {
        "quadratic": lambda **x: ref.linear_attn_quadratic(**x, normalize=normalize),
        "chunked": lambda **x: ref.linear_attn_chunked(**x, chunk_size=chunk, normalize=normalize),
    }
    assert_same_with_grads(impls, linear_leaves(t, heads, f))


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "nonorm"])
@pytest.mark.parametrize("t,heads", STEP_CASES, ids=STEP_IDS)
def test_linear_step_matches_quadratic(t, heads, normalize):
    impls = {
        "quadratic": lambda **x: ref.linear_attn_quadratic(**x, normalize=normalize),
        "step": lambda **x: step_loop(ref.linear_attn_step, x, normalize=normalize)[0],
    }
    assert_same_with_grads(impls, linear_leaves(t, heads, f=24))


@pytest.mark.parametrize("heads", HEADS)
def test_linear_state_continues(heads):
    impls = split_impls(ref.linear_attn_chunked, ref.linear_attn_step, 29, chunk_size=16)
    assert_same_with_grads(impls, linear_leaves(63, heads))


FAMILIES = {  # inputs, (quadratic, chunked, step), keyword arguments, inputs without a time dim
    "linear": (
        lambda: linear_leaves(63, "gqa", f=24),
        (ref.linear_attn_quadratic, ref.linear_attn_chunked, ref.linear_attn_step),
        {},
        (),
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_forms_match_fp64(family):
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64."""
    check_fp32_forms(*FAMILIES[family])


def test_linear_quadratic_by_hand():
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 2.0]]).view(1, 1, 3, 2)
    k = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0]]).view(1, 1, 3, 2)
    v = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).view(1, 1, 3, 2)
    want = torch.zeros(1, 1, 3, 2)
    for i in range(3):
        weights = [float(q[0, 0, i] @ k[0, 0, j]) for j in range(i + 1)]
        for j, w in enumerate(weights):
            want[0, 0, i] += w * v[0, 0, j] / sum(weights)
    # Rows by hand: v0; (v0 + v1) / 2; (2 v0 + 2 v2) / 4.
    assert_close("loop", want, torch.tensor([[1.0, 2.0], [2.0, 3.0], [3.0, 4.0]]).view(1, 1, 3, 2))
    assert_close("linear", ref.linear_attn_quadratic(q, k, v), want)


def test_dtype_round_trip():
    x = {n: v.detach().bfloat16() for n, v in linear_leaves(7, "gqa").items()}
    y = ref.linear_attn_chunked(**x, chunk_size=4)
    assert y.dtype == torch.bfloat16
    want = ref.linear_attn_quadratic(*(x[n].float() for n in "qkv"))
    assert_close("bf16", y.float(), want, ratio=1e-2, atol=1e-2)
    _, state = ref.linear_attn_chunked(**x, chunk_size=4, output_final_state=True)
    assert state.S.dtype == torch.float32


# The Triton kernel equals the reference: forward, every gradient, states, steps (fp32 unless said).

kernels = kernels_fixture("linear")

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
    check(case, kernels.linear_attn_chunked, ref.linear_attn_chunked, inputs, kwargs)


def test_continuation_equals_one_pass(kernels):
    """Two calls with the state handed over equal one call."""
    torch.manual_seed(0)
    t1 = 21
    lin = {k: v.to(DEV) for k, v in linear_inputs(1, 4, 2, 50, 16, 24).items()}
    whole = kernels.linear_attn_chunked(**lin, chunk_size=16)
    y1, state = kernels.linear_attn_chunked(*(x[:, :, :t1] for x in lin.values()), output_final_state=True)
    y2 = kernels.linear_attn_chunked(*(x[:, :, t1:] for x in lin.values()), initial_state=state)
    assert_kernel_close("linear split", torch.cat([y1, y2], 2), whole, **FP32)


def test_steps_match_reference_steps(kernels):
    """Decoding token by token equals the reference's step loop, states included; GQA heads."""
    torch.manual_seed(0)
    t = 12
    with torch.no_grad():
        lin = {k: v.to(DEV) for k, v in linear_inputs(2, 4, 2, t, 16, 24).items()}
        got, s_got = step_loop(kernels.linear_attn_step, lin)
        want, s_want = step_loop(ref.linear_attn_step, lin)
        for name, g, w in zip(("y", "S", "z"), (got, *s_got), (want, *s_want)):
            assert_kernel_close(f"linear step {name}", g, w, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_matches_reference(dtype, kernels):
    torch.manual_seed(0)
    inputs = linear_inputs(1, 4, 2, 70, 32, 64)
    check(f"linear {dtype}", kernels.linear_attn_chunked, ref.linear_attn_chunked, inputs, {}, dtype=dtype)


def test_bad_calls_raise_clear_errors(kernels):
    q, k, v = linear_inputs(1, 2, 2, 1, 16, 16).values()
    q, k, v = q.to(DEV).requires_grad_(), k.to(DEV), v.to(DEV)
    with pytest.raises(RuntimeError, match="forward-only.*torch.no_grad"):
        kernels.linear_attn_step(q, k, v, None)
    with pytest.raises(TypeError, match="attention.backend=reference"):
        kernels.linear_attn_chunked(q.double(), k.double(), v.double())


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gpu_long_sequences(dtype, kernels):
    torch.manual_seed(0)
    t = 1000
    check("gpu linear", kernels.linear_attn_chunked, ref.linear_attn_chunked,
          linear_inputs(2, 8, 2, t, 64, 128), {}, dtype=dtype)  # fmt: skip
