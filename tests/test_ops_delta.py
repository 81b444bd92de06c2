"""The delta rule (`linearize.ops.delta`): the reference forms agree with each other (recurrent ==
chunked == step loop, forward and every gradient, a starting state included) on fp64 inputs,
with and without the decay gate, on odd lengths and GQA heads; the recurrence equals the update
as papers write it (column vectors, I - β k kᵀ), and a full-strength write of a unit key reads
back its value exactly. The Triton kernel (`triton.py`) equals them, under the interpreter on
CPU. How each is measured: tests/ops_testing.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linearize.ops.delta import reference as ref
from linearize.ops.delta.reference import DeltaState
from tests.ops_testing import HEADS, B, D, assert_close, assert_same_with_grads, check_fp32_forms, delta_leaves
from tests.ops_testing import CUDA, DEV, FP32, assert_kernel_close, check, delta_inputs, kernels_fixture, leaf
from tests.ops_testing import split_impls, step_loop

pytestmark = pytest.mark.usefixtures("seed_and_one_thread")

LENGTHS = [1, 5, 63, 70]
GATES = {"deltanet": False, "gated": True}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("t", LENGTHS)
def test_forms_agree(t, heads, gate):
    """Recurrent, chunked (blocks of 16 and of 64: several blocks, a partial one, T < block) and
    the step loop: one output, one gradient for every input."""
    impls = {
        "recurrent": lambda **x: ref.delta_attn_recurrent(**x, scale=0.5),
        "chunked-16": lambda **x: ref.delta_attn_chunked(**x, scale=0.5, chunk_size=16),
        "chunked-64": lambda **x: ref.delta_attn_chunked(**x, scale=0.5, chunk_size=64),
        "step": lambda **x: step_loop(ref.delta_attn_step, x, scale=0.5)[0],
    }
    assert_same_with_grads(impls, delta_leaves(t, heads, GATES[gate], f=24 if heads == "gqa" else 16))


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("heads", HEADS)
def test_state_continues(heads, gate):
    """Chunked over 29 tokens then chunked (or stepped) over 41 from its state == the recurrent
    form over all 70, with gradients through the handed-over state."""
    impls = {"recurrent": lambda **x: ref.delta_attn_recurrent(**x, scale=0.5)}
    impls.update(split_impls(ref.delta_attn_chunked, ref.delta_attn_step, 29, chunk_size=16, scale=0.5))
    assert_same_with_grads(impls, delta_leaves(70, heads, GATES[gate]))


@pytest.mark.parametrize("gate", GATES)
def test_initial_state_gradients(gate):
    """A given starting state: chunked == recurrent, its gradient included, final states equal."""
    x = delta_leaves(37, "gqa", GATES[gate])
    x["s0"] = leaf(torch.randn(B, 4, 16, D) * 0.3)

    def with_state(form, **kw):
        def run(s0, **a):
            y, final = form(**a, scale=0.5, initial_state=DeltaState(s0), output_final_state=True, **kw)
            return torch.cat([y, final.S], 2)  # (B, H, T + F, D): outputs, then the final state

        return run

    assert_same_with_grads(
        {"recurrent": with_state(ref.delta_attn_recurrent), "chunked": with_state(ref.delta_attn_chunked, chunk_size=16)}, x
    )


def test_fp32_forms_match_fp64():
    """The fp32 path (what kernels are compared against) stays within fp32 tolerance of fp64."""
    forms = (ref.delta_attn_recurrent, ref.delta_attn_chunked, ref.delta_attn_step)
    check_fp32_forms(lambda: delta_leaves(63, "gqa", True), forms, {"scale": 0.5}, ())


def test_recurrence_is_the_papers_update():
    """S_t = α_t S_{t-1} (I - β_t k_t k_tᵀ) + β_t v_t k_tᵀ, o_t = S_t q_t with S (D x F) and
    column vectors, written out here with an explicit identity matrix."""
    x = {n: v.detach() for n, v in delta_leaves(23, "mha", True).items()}
    q, k, v, beta, g = x["q"], x["k"], x["v"], x["beta"], x["g"]
    s = torch.zeros(B, 4, D, 16, dtype=torch.float64)
    eye = torch.eye(16, dtype=torch.float64)
    want = []
    for t in range(23):
        kt, vt, bt, at = k[:, :, t, :, None], v[:, :, t, :, None], beta[:, :, t, None, None], g[:, :, t, None, None].exp()
        s = at * s @ (eye - bt * kt @ kt.mT) + bt * vt @ kt.mT
        want.append((s @ q[:, :, t, :, None]).mT)
    want = torch.cat(want, 2)
    assert_close("recurrent", ref.delta_attn_recurrent(q, k, v, beta, g), want)
    assert_close("chunked", ref.delta_attn_chunked(q, k, v, beta, g, chunk_size=8), want)


def test_full_write_reads_back():
    """β = 1 on a unit key overwrites what S held for it: querying that key returns its value,
    whatever was written before (a plain linear attention would return the sum)."""
    x = {n: v.detach() for n, v in delta_leaves(9, "mha", False).items()}
    k = x["k"].clone()
    k[:, :, 8] = k[:, :, 2]  # the last token rewrites an earlier token's key with a new value
    beta = torch.ones_like(x["beta"])
    y = ref.delta_attn_chunked(k, k, x["v"], beta, chunk_size=4)  # queries = keys
    assert_close("read back", y[:, :, 8], x["v"][:, :, 8])


def test_bad_gate_shapes_are_refused():
    x = {n: v.detach() for n, v in delta_leaves(5, "gqa", True).items()}
    with pytest.raises(ValueError, match=r"beta has shape \(2, 2, 4\), expected \(2, 2, 5\)"):
        ref.delta_attn_chunked(x["q"], x["k"], x["v"], x["beta"][:, :, :4])
    with pytest.raises(ValueError, match="g has shape"):
        ref.delta_attn_recurrent(x["q"], x["k"], x["v"], x["beta"], x["g"][..., None])


# The Triton kernel equals the reference: forward, every gradient (β and the decay's included),
# final and initial states, steps (fp32 unless said).

kernels = kernels_fixture("delta")

DELTA = {  # b, h, h_kv, t, f, d, extra
    "T1": (1, 2, 2, 1, 16, 16, {}),
    "T5-deltanet": (1, 2, 2, 5, 16, 16, dict(gated=False)),
    "T63-gqa-F24-D40": (1, 4, 2, 63, 24, 40, {}),
    "T70-gqa-deltanet-state": (1, 4, 2, 70, 16, 24, dict(gated=False, state=True)),
    "T70-state-D80": (1, 2, 2, 70, 16, 80, dict(state=True)),  # two value blocks
    "T33-hd128": (1, 2, 1, 33, 128, 128, {}),
}


@pytest.mark.parametrize("case", DELTA)
def test_delta_matches_reference(case, kernels):
    b, h, h_kv, t, f, d, extra = DELTA[case]
    torch.manual_seed(0)
    inputs = delta_inputs(b, h, h_kv, t, f, d, **extra)
    check(case, kernels.delta_attn_chunked, ref.delta_attn_recurrent, inputs, dict(scale=0.7, output_final_state=True))


def test_delta_continuation_equals_one_pass(kernels):
    """Two calls with the state handed over equal one call."""
    torch.manual_seed(0)
    x = {k: v.to(DEV) for k, v in delta_inputs(1, 4, 2, 50, 16, 24).items()}
    whole = kernels.delta_attn_chunked(**x)
    y1, state = kernels.delta_attn_chunked(**{n: v[:, :, :21] for n, v in x.items()}, output_final_state=True)
    y2 = kernels.delta_attn_chunked(**{n: v[:, :, 21:] for n, v in x.items()}, initial_state=state)
    assert_kernel_close("delta split", torch.cat([y1, y2], 2), whole, **FP32)


@pytest.mark.parametrize("gate", GATES)
def test_delta_steps_match_reference_steps(gate, kernels):
    """Decoding token by token equals the reference's step loop, states included; GQA heads."""
    torch.manual_seed(0)
    with torch.no_grad():
        x = {k: v.to(DEV) for k, v in delta_inputs(2, 4, 2, 12, 16, 24, gated=GATES[gate]).items()}
        got, s_got = step_loop(kernels.delta_attn_step, x, scale=0.5)
        want, s_want = step_loop(ref.delta_attn_step, x, scale=0.5)
        assert_kernel_close("delta step y", got, want, **FP32)
        assert_kernel_close("delta step S", s_got.S, s_want.S, **FP32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_delta_half_precision_matches_reference(dtype, kernels):
    torch.manual_seed(0)
    check(f"delta {dtype}", kernels.delta_attn_chunked, ref.delta_attn_recurrent,
          delta_inputs(1, 4, 2, 40, 32, 64), {}, dtype=dtype)  # fmt: skip


def test_delta_bad_calls_raise_clear_errors(kernels):
    x = {k: v.to(DEV) for k, v in delta_inputs(1, 2, 2, 5, 16, 16).items()}
    with pytest.raises(ValueError, match="chunk_size"):
        kernels.delta_attn_chunked(**x, chunk_size=0)
    with pytest.raises(ValueError, match="beta has shape"):
        kernels.delta_attn_chunked(x["q"], x["k"], x["v"], x["beta"][:, :, :3])
    with pytest.raises(RuntimeError, match="forward-only"):
        kernels.delta_attn_step(*(v[:, :, :1].requires_grad_() for v in (x["q"], x["k"], x["v"])), x["beta"][:, :, :1])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_delta_gpu_long_sequences(dtype, kernels):
    torch.manual_seed(0)
    check("gpu delta", kernels.delta_attn_chunked, ref.delta_attn_chunked, delta_inputs(2, 8, 2, 300, 64, 128), {},
          dtype=dtype)  # fmt: skip
