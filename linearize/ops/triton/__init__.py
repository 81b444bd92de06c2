"""Triton kernels (forward and backward) for the linear attentions; see docs/kernels.md.

Same signatures and semantics as their namesakes in `linearize.ops.<kind>.reference`, which the tests
hold them to. Only `linearize.ops` should import this package (it picks the backend).

Triton decides between compiling and interpreting when a jit function is defined: its own
library's (tl.sum, tl.zeros, ...) when Triton is first imported, ours when this package is. On
CPU (TRITON_INTERPRET=1) both must be interpreted; `interpreter_problem` says when they are not.
"""

from __future__ import annotations

import triton
import triton.language

from linearize.ops.triton import linear as _linear
from linearize.ops.triton.gated import gated_attn_chunked, gated_attn_step
from linearize.ops.triton.linear import linear_attn_chunked, linear_attn_step
from linearize.ops.triton.window import window_attn_chunked, window_attn_step

__all__ = [
    "INTERPRETED", "gated_attn_chunked", "gated_attn_step", "interpreter_problem", "linear_attn_chunked",
    "linear_attn_step", "window_attn_chunked", "window_attn_step",
]  # fmt: skip


def _interpreted(fn) -> bool:
    return type(fn).__name__ == "InterpretedFunction"


INTERPRETED: bool = _interpreted(_linear._fwd)  # how this package's kernels were built


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
