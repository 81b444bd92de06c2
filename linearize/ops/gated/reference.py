"""Gated linear attention (GLA form; SUPRA's fixed decay is a constant gate): the PyTorch
reference (quadratic, chunked, step) that the Triton kernel beside it (`triton.py`) is held to.

Layout, GQA, precision and what the three forms promise: see `linearize.ops.common`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from linearize.ops.common import (
    _block_rows,
    _check_one_token,
    _check_positive,
    _check_qkv,
    _check_shape,
    _distance,
    _up,
)

__all__ = ["GatedState", "gated_attn_chunked", "gated_attn_quadratic", "gated_attn_step"]


class GatedState(NamedTuple):
    """State of gated linear attention after t tokens (compute dtype).

    Attributes:
        S: (B, H, F, D) decayed sum of k_j^T v_j.
    """

    S: Tensor


def _gate(g: Tensor, k: Tensor, v: Tensor, n_heads: int) -> Tensor:
    """Check g against k; return it in the compute dtype as (B, H, T, F) or (B, H, T, 1)."""
    per_feature, per_head = tuple(k.shape), tuple(k.shape[:3])
    if tuple(g.shape) not in (per_feature, per_head):
        raise ValueError(
            f"g has shape {tuple(g.shape)}, expected {per_feature} (per key feature) or {per_head} (per head)"
        )
    return _up(n_heads, v, g if g.dim() == 4 else g.unsqueeze(-1))[0]


def _gated_state(state: GatedState | None, q: Tensor, v: Tensor) -> Tensor:
    shape = (*q.shape[:2], q.shape[-1], v.shape[-1])  # (B, H, F, D)
    if state is None:
        return q.new_zeros(shape)
    _check_shape("state.S", state.S, shape)
    return state.S.to(q.dtype)


_FEATURE_BLOCK = 16  # tokens per block with per-feature gates: short enough that e^-G rarely passes e^30
_MAX_BLOCK_DECAY = 30.0  # a per-feature block whose |G| passes this takes the exact (slow) form
_EXACT_GROUP = 4096  # blocks per group in that form: 4096 x 16 x 16 x F floats at most at a time


def _decay_matrix(cum: Tensor, causal: Tensor) -> Tensor:
    """exp(G_i - G_j) where j <= i, else 0.

    Args:
        cum: (B, H, c, F|1) cumulative log decay G over time.
        causal: (c, c) bool, True where j <= i.
    Returns:
        (B, H, c, c, F|1). Exponents are masked to -inf where j > i before exp, so the positive
        ones there never overflow.
    """
    diff = cum[:, :, :, None] - cum[:, :, None, :]  # (B, H, c, c, F|1): sum of g over (j, i]
    return diff.masked_fill(~causal[:, :, None], float("-inf")).exp()


def gated_attn_quadratic(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0) -> Tensor:
    """Gated linear attention (GLA, Liger; SUPRA with a constant gate) as a T x T sum.

    y_i = scale sum_{j<=i} (sum_f q_if k_jf exp(G_if - G_jf)) v_j with G = cumsum of g over time:
    the same as S_t = diag(exp g_t) S_{t-1} + k_t^T v_t, y_t = scale q_t S_t. No normalizer.
    Memory is O(T^2 F): an oracle for test sizes.

    Args:
        q: (B, H, T, F); k: (B, H_kv, T, F); v: (B, H_kv, T, D).
        g: (B, H_kv, T, F) per-feature or (B, H_kv, T) per-head log decay (<= 0).
        scale: output scale.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    decay = _decay_matrix(g.cumsum(2), _distance(t, t, 0, q.device) >= 0)
    a = (q[:, :, :, None] * k[:, :, None] * decay).sum(-1)  # (B, H, T, T)
    return (scale * (a @ v)).to(dtype)


def gated_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0, chunk_size: int = 64,
    initial_state: GatedState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, GatedState]:  # fmt: skip
    """Gated linear attention in blocks of ``chunk_size`` tokens, gates cumulated from each
    block's start.

    Inside a block: the causal, decayed q.k products. Per-head gates give one decay per
    (query, key) pair. Per-feature gates factor as e^(G_i - G_j) = e^G_i e^-G_j (G from the
    block's start) in one product for every block; blocks are then at most 16 tokens so that
    |G| <= 30 (e^30 is safe in fp32) nearly always, and the few blocks past that are redone
    exactly, one exp per pair and feature. Across blocks: each block's kᵀv decayed to its end,
    carried by a scan over the blocks' states. Every other exponent is a sum of g over a span.

    Args: as `gated_attn_quadratic`, plus
        chunk_size: tokens per block (>= 1); T need not divide by it.
        initial_state: state after the tokens preceding q (None: zeros).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `GatedState` if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    per_head = g.shape[-1] == 1
    c = min(chunk_size if per_head else min(chunk_size, _FEATURE_BLOCK), t) or 1
    n = -(-t // c)
    qb, kb, vb, gb = (_block_rows(x, n, c, 0) for x in (q, k, v, g))  # padding: zero keys, no decay
    cum = gb.cumsum(3)  # (B, H, n, c, F|1): log decay from the block start through each token
    causal = _distance(c, c, 0, q.device) >= 0
    q_decayed = qb * cum.exp()  # queries decayed to their block's start
    if per_head:  # one decay per (query, key) pair
        a = (qb @ kb.mT) * (cum[..., :, None, 0] - cum[..., None, :, 0]).masked_fill(~causal, float("-inf")).exp()
    else:  # e^(G_i - G_j) = e^G_i e^-G_j, exact while |G| <= 30 (clamped past it, those blocks redone)
        k_undecayed = kb * (-cum).clamp(max=_MAX_BLOCK_DECAY).exp()
        a = (q_decayed @ k_undecayed.mT).masked_fill(~causal, 0.0)
        far = (cum.abs().amax((-2, -1)) > _MAX_BLOCK_DECAY).nonzero(as_tuple=True)  # (b, h, block) indices
        if far[0].numel():
            exact = torch.cat([
                (qj[:, :, None] * kj[:, None] * _decay_matrix(cj[None], causal)[0]).sum(-1)
                for qj, kj, cj in zip(*(x[far].split(_EXACT_GROUP) for x in (qb, kb, cum)))
            ])  # fmt: skip
            a = a.index_put(far, exact)
    last = cum[:, :, :, -1:]  # (B, H, n, 1, F|1): log decay over each whole block
    kv = (kb * (last - cum).exp()).mT @ vb  # (B, H, n, F, D): each block's kᵀv at its end
    starts = [_gated_state(initial_state, q, v)]  # the state where each block starts, then the final one
    for decay_j, kv_j in zip(last.mT.exp().unbind(2), kv.unbind(2)):
        starts.append(decay_j * starts[-1] + kv_j)
    y = scale * (a @ vb + q_decayed @ torch.stack(starts[:n], 2))  # (B, H, n, c, D)
    y = y.flatten(2, 3)[:, :, :t].to(dtype)
    return (y, GatedState(starts[n])) if output_final_state else y


def gated_attn_step(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: GatedState | None = None, *, scale: float = 1.0
) -> tuple[Tensor, GatedState]:
    """One token of gated linear attention: S = diag(exp g) S + k^T v, y = scale q S.

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D); g: (B, H_kv, 1, F) or (B, H_kv, 1).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    dtype, h = v.dtype, q.shape[1]
    g = _gate(g, k, v, h)
    q, k, v = _up(h, v, q, k, v)
    s_ = g.mT.exp() * _gated_state(state, q, v) + k.mT @ v  # (B, H, F, D)
    return (scale * (q @ s_)).to(dtype), GatedState(s_)
