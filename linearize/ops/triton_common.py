"""Host and device helpers shared by the Triton kernels (`linearize.ops.<kind>.triton`; see
docs/kernels.md): block sizes, tiles, dots, GQA sums, and whether the kernels can run interpreted.

Each kernel module has the same signatures and semantics as its namesakes in the `reference.py`
beside it, which the tests hold it to. Only `linearize.ops` should import the kernel modules (it
picks the backend), all of them at once, on first use.

Every kernel reads contiguous (B, H, T, X) tensors; a program handles one (batch, query head)
and reads kv head h // (H // H_kv). Tiles are padded to powers of two (at least 16, the
smallest `tl.dot` operand on NVIDIA) and masked, so no dimension need be a power of two.

Triton decides between compiling and interpreting when a jit function is defined: its own
library's (tl.sum, tl.zeros, ...) when Triton is first imported, ours when this module and the
kernel modules (which import it first) are. On CPU (TRITON_INTERPRET=1) both must be
interpreted; `interpreter_problem` says when they are not.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

MIN_BLOCK = 16  # smallest tl.dot dimension
MAX_TIME_BLOCK = 64  # time rows per tile in the linear and window kernels
MAX_VALUE_BLOCK = 64  # value columns per program: larger D is split over programs
# Warps per chunked-kernel program: with 4, ptxas (sm_90, bf16, F = 32, D = 128) spilled
# registers in the linear and window kernels; with 8 it did not (window backward: a little).
NUM_WARPS = 8
# Triton's interpreter keeps bf16 as raw uint16 and multiplies it as such: there, 16-bit dots are
# run as fp32 dots of the 16-bit-rounded operands, which is what the tensor cores compute.
_knobs = getattr(triton, "knobs", None)
_INTERPRETING = bool(_knobs.runtime.interpret) if _knobs is not None else os.environ.get("TRITON_INTERPRET") == "1"
EMULATE_16BIT_DOT = tl.constexpr(_INTERPRETING)


def pow2(n: int, lo: int = MIN_BLOCK) -> int:
    """The tile width for a dimension of n: the next power of two, at least lo."""
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def time_block(chunk_size: int) -> int:
    """Time rows per tile: chunk_size rounded to a power of two within [16, 64].

    The chunked forms are exact for any chunk size, so the chunk is only a blocking choice;
    results differ from the reference's chunking by rounding alone.
    """
    return min(pow2(chunk_size), MAX_TIME_BLOCK)


def value_block(d: int) -> int:
    return min(pow2(d), MAX_VALUE_BLOCK)


def contiguous(*xs: Tensor) -> list[Tensor]:
    return [x.contiguous() for x in xs]


def kv_sum(x: Tensor, n_kv: int) -> Tensor:
    """Sum a per-query-head gradient (B, H, T, ...) over each GQA group: (B, H_kv, T, ...)."""
    b, h = x.shape[:2]
    return x if h == n_kv else x.view(b, n_kv, h // n_kv, *x.shape[2:]).sum(2)


def unify(*xs: Tensor) -> list[Tensor]:
    """The inputs in one dtype (the widest among them) for the kernels' dots.

    fp32, bf16 and fp16 are taken; mixed inputs (say bf16 q with fp32 feature maps) are
    promoted, as the reference promotes everything to fp32.
    """
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"the Triton kernels take fp32, bf16 or fp16 tensors, got {dtype}; "
                        "use attention.backend=reference (fp64 is the reference's self-check)")
    return [x.to(dtype) for x in xs]


def no_grad_step(name: str, *xs) -> None:
    """Decoding steps are forward-only kernels: refuse a graph rather than drop it silently."""
    if torch.is_grad_enabled() and any(isinstance(x, Tensor) and x.requires_grad for x in xs):
        raise RuntimeError(
            f"{name}: the Triton decoding step is forward-only and got tensors that require grad; "
            "run it under torch.no_grad() (decoding), or use attention.backend=reference for a "
            "differentiable step"
        )


@triton.jit
def tile(ptr, rows, n_rows, cols, n_cols, stride):
    """Load x[rows, cols] of a row-major (n_rows, stride) matrix; zeros outside (n_rows, n_cols)."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    return tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def put(ptr, x, rows, n_rows, cols, n_cols, stride):
    """Store x into rows, cols of a row-major (n_rows, stride) matrix, inside (n_rows, n_cols)."""
    mask = (rows[:, None] >= 0) & (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(ptr + rows[:, None] * stride + cols[None, :], x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def mm(a, b, DT: tl.constexpr):
    """a @ b with fp32 accumulation; operands in DT (the input dtype: exact fp32 for fp32 inputs,
    bf16/fp16 tensor-core products for 16-bit inputs, as the inputs themselves carry no more)."""
    if EMULATE_16BIT_DOT:
        return tl.dot(a.to(DT).to(tl.float32), b.to(DT).to(tl.float32), input_precision="ieee")
    return tl.dot(a.to(DT), b.to(DT), input_precision="ieee")


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


INTERPRETED: bool = _interpreted(mm)  # how our jit functions were built


def interpreter_problem() -> str | None:
    """Why the kernels cannot run in Triton's interpreter in this process; None when they can."""
    if not INTERPRETED:
        return "the kernels were compiled for a GPU: TRITON_INTERPRET=1 was not set at their first import"
    if not _interpreted(getattr(triton.language.standard, "sum", None)):
        return (
            "Triton was imported (by another library, e.g. peft) before TRITON_INTERPRET=1 was set, so "
            "its own library is compiled; set TRITON_INTERPRET=1 before anything imports Triton"
        )
    return None
