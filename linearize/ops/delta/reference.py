"""The delta rule (DeltaNet; Gated DeltaNet with a per-head decay): the PyTorch reference
(recurrent, chunked, step).

The state S (F x D) maps keys to values. Each token first decays it by α_t, then writes v_t over
what S held for k_t, by a step of size β_t:

    S_t = α_t (I - β_t k_tᵀ k_t) S_{t-1} + β_t k_tᵀ v_t,      y_t = scale · q_t S_t

(rows are tokens, as everywhere in `linearize.ops`). α_t = 1 is DeltaNet. With ‖k_t‖ = 1 and
0 <= β_t <= 2 no direction of S grows, so the caller L2-normalises keys (and queries). Unlike the
additive kinds there is no T x T closed form: the recurrence is the definition (`*_recurrent`),
and the chunked form solves, per block, the triangular system that the block's writes make
(the UT transform of DeltaNet's WY representation).

Layout, GQA, precision and what the forms promise: see `linearize.ops.common` (here the
recurrent form plays the part of the quadratic one).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from linearize.ops.common import _block_rows, _check_one_token, _check_positive, _check_qkv, _check_shape, _up

__all__ = ["DeltaState", "delta_attn_chunked", "delta_attn_recurrent", "delta_attn_step"]


class DeltaState(NamedTuple):
    """State of the delta rule after t tokens (compute dtype).

    Attributes:
        S: (B, H, F, D) the key-to-value map.
    """

    S: Tensor


def _per_token(name: str, x: Optional[Tensor], k: Tensor) -> None:
    if x is not None and tuple(x.shape) != tuple(k.shape[:3]):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(k.shape[:3])} (one per kv head and token)")


def _inputs(q, k, v, beta, g):
    """Checked inputs in the compute dtype, expanded to the query heads; g zeros when None."""
    _check_qkv(q, k, v)
    _per_token("beta", beta, k)
    _per_token("g", g, k)
    if g is None:
        g = torch.zeros_like(beta)
    return _up(q.shape[1], v, q, k, v, beta, g)


def _delta_state(state: Optional[DeltaState], q: Tensor, v: Tensor) -> Tensor:
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1])  # (B, H, F, D)
    if state is None:
        return q.new_zeros(shape)
    _check_shape("state.S", state.S, shape)
    return state.S.to(q.dtype)


def _write(s: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Tensor) -> Tensor:
    """One token's update of s (B, H, F, D); k (B, H, 1, F), v (B, H, 1, D), beta and g (B, H, 1)."""
    s = g.exp()[..., None] * s
    return s + k.mT @ (beta[..., None] * (v - k @ s))


def delta_attn_recurrent(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor] = None, *, scale: float = 1.0,
    initial_state: Optional[DeltaState] = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, DeltaState]:  # fmt: skip
    """The delta rule token by token: the definition, an oracle for test sizes.

    Args:
        q: (B, H, T, F); k: (B, H_kv, T, F), L2-normalised rows for a stable rule; v: (B, H_kv, T, D).
        beta: (B, H_kv, T) write strengths, in [0, 2] for a stable rule.
        g: (B, H_kv, T) log decay log α_t <= 0 (Gated DeltaNet); None: α = 1 (DeltaNet).
        scale: output scale.
        initial_state: state after the tokens preceding q (None: zeros).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `DeltaState` if output_final_state.
    """
    dtype = v.dtype
    q, k, v, beta, g = _inputs(q, k, v, beta, g)
    s, ys = _delta_state(initial_state, q, v), []
    for t in range(q.shape[2]):
        at = slice(t, t + 1)
        s = _write(s, k[:, :, at], v[:, :, at], beta[:, :, at], g[:, :, at])
        ys.append(q[:, :, at] @ s)
    y = (scale * torch.cat(ys, 2)).to(dtype) if ys else v.new_zeros(*q.shape[:3], v.shape[-1]).to(dtype)
    return (y, DeltaState(s)) if output_final_state else y


def delta_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor] = None, *, scale: float = 1.0,
    chunk_size: int = 64, initial_state: Optional[DeltaState] = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, DeltaState]:  # fmt: skip
    """The delta rule in blocks of ``chunk_size`` tokens.

    In a block starting from state S_0, with G_i the log decay from the block's start through
    token i and γ_i = e^{G_i}, the state is S_i = γ_i S_0 + Σ_{j<=i} e^{G_i - G_j} k_jᵀ u_j, where
    the written values u_j = β_j (v_j - α_j k_j S_{j-1}) solve the lower-triangular system

        (I + diag(β) A) U = diag(β) V - diag(β γ) K S_0,   A_ij = e^{G_i - G_j} k_i k_jᵀ (j < i).

    With T = (I + diag(β) A)^-1: U = T diag(β) V - (T diag(β γ) K) S_0, both products found for
    every block at once (one triangular solve); only the S_0 part waits for the scan over
    blocks. The block's outputs are γ ⊙ Q S_0 + (Q Kᵀ ⊙ e^{G_i - G_j}, j <= i) U, its end state
    γ_c S_0 + (e^{G_c - G_j} k_j)ᵀ U. Every exponent is a sum of log decays over a span (<= 0).

    Args: as `delta_attn_recurrent`, plus
        chunk_size: tokens per block (>= 1); T need not divide by it.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `DeltaState` if output_final_state.
    """
    _check_positive("chunk_size", chunk_size)
    dtype, t = v.dtype, q.shape[2]
    q, k, v, beta, g = _inputs(q, k, v, beta, g)
    c = min(chunk_size, t) or 1
    n = -(-t // c)
    qb, kb, vb = (_block_rows(x, n, c, 0) for x in (q, k, v))  # (B, H, n, c, .); padding writes nothing
    bb, gb = (_block_rows(x[..., None], n, c, 0)[..., 0] for x in (beta, g))  # (B, H, n, c)
    cum = gb.cumsum(-1)
    steps = torch.arange(c, device=q.device)
    diff = (cum[..., :, None] - cum[..., None, :]).masked_fill(steps[:, None] < steps[None, :], float("-inf"))
    decay = diff.exp()  # (B, H, n, c, c): e^{G_i - G_j} for j <= i, else 0
    strict = decay.masked_fill(steps[:, None] == steps[None, :], 0.0)
    system = torch.eye(c, dtype=q.dtype, device=q.device) + bb[..., None] * (kb @ kb.mT) * strict
    rhs = torch.cat([bb[..., None] * vb, (bb * cum.exp())[..., None] * kb], -1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    u_v, w = solved.split([v.shape[-1], k.shape[-1]], -1)  # U = u_v - w S_0
    inner = (qb @ kb.mT) * decay  # (B, H, n, c, c)
    q_decayed = qb * cum.exp()[..., None]
    k_to_end = kb * (cum[..., -1:] - cum).exp()[..., None]
    s, ys = _delta_state(initial_state, q, v), []
    for j in range(n):
        u = u_v[:, :, j] - w[:, :, j] @ s
        ys.append(q_decayed[:, :, j] @ s + inner[:, :, j] @ u)
        s = cum[:, :, j, -1, None, None].exp() * s + k_to_end[:, :, j].mT @ u
    y = (scale * torch.cat(ys, 2)[:, :, :t]).to(dtype)
    return (y, DeltaState(s)) if output_final_state else y


def delta_attn_step(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, g: Optional[Tensor] = None,
    state: Optional[DeltaState] = None, *, scale: float = 1.0,
) -> tuple[Tensor, DeltaState]:  # fmt: skip
    """One token of the delta rule.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D); beta, g: (B, H_kv, 1) (g may be None).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_one_token(q)
    dtype = v.dtype
    q, k, v, beta, g = _inputs(q, k, v, beta, g)
    s = _write(_delta_state(state, q, v), k, v, beta, g)
    return (scale * (q @ s)).to(dtype), DeltaState(s)
