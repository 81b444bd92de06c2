"""Causal linear attention (`linearize.ops.linear`): the reference forms agree with themselves
(quadratic == chunked == step loop, forward and every gradient) and with a definition by hand.

Reference inputs are fp64 unless a test says otherwise, so the forms must agree to rounding (1e-9);
one test holds the fp32 path, which the kernel is compared against, to fp32 tolerance.
"""

from __future__ import annotations

import pytest
import torch

from linearize.ops.linear import reference as ref
from tests.ops_testing import (
    CHUNK_CASES,
    CHUNK_IDS,
    DIMS,
    HEADS,
    STEP_CASES,
    STEP_IDS,
    assert_close,
    assert_same_with_grads,
    check_fp32_forms,
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
