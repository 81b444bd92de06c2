"""Causal linear attention on feature-mapped q, k, normalized or not: the PyTorch reference
(quadratic, chunked, step, weights) that the Triton kernel beside it (`triton.py`) is held to.

Layout, GQA, precision and what the three forms promise: see `linearize.ops.common`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.ops.common import (
    _block_rows,
    _check_one_token,
    _check_positive,
    _check_qkv,
    _check_shape,
    _distance,
    _query_heads_back,
    _query_rows,
    _up,
    expand_kv,
)

__all__ = ["LinearState", "linear_attn_chunked", "linear_attn_quadratic", "linear_attn_step", "linear_attn_weights"]


class LinearState(NamedTuple):
    """State of normalized linear attention after t tokens (compute dtype).

    Attributes:
        S: (B, H, F, D) sum over seen tokens of k_j^T v_j (k already feature-mapped).
        z: (B, H, F) sum over seen tokens of k_j, for the normalizer.
    """

    S: Tensor
    z: Tensor


def _linear_state(state: LinearState | None, q: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    b, h, _, f = q.shape
    d = v.shape[-1]
    if state is None:
        return q.new_zeros(b, h, f, d), q.new_zeros(b, h, f)
    _check_shape("state.S", state.S, (b, h, f, d))
    _check_shape("state.z", state.z, (b, h, f))
    return state.S.to(q.dtype), state.z.to(q.dtype)


def linear_attn_quadratic(q: Tensor, k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = 1e-6) -> Tensor:
    """Causal linear attention as a masked T x T matrix.

    y_i = sum_{j<=i} (q_i.k_j) v_j / (sum_{j<=i} q_i.k_j + eps); no division if not normalize.

    Args:
        q: (B, H, T, F) feature-mapped, non-negative queries.
        k: (B, H_kv, T, F) feature-mapped, non-negative keys.
        v: (B, H_kv, T, D) values.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    dtype, h = v.dtype, q.shape[1]
    q, k, v = _up(h, v, q, k, v)
    a = _linear_scores(q, k)  # (B, H, T, T)
    y = a @ v
    if normalize:
        y = y / (a.sum(-1, keepdim=True) + eps)
    return y.to(dtype)


def _linear_scores(q: Tensor, k: Tensor) -> Tensor:
    """Causally masked q.k for expanded, compute-dtype q, k: (B, H, T, T)."""
    t = q.shape[2]
    return (q @ k.mT).masked_fill(_distance(t, t, 0, q.device) < 0, 0.0)


def linear_attn_chunked(
    q: Tensor, k: Tensor, v: Tensor, *, chunk_size: int = 64, normalize: bool = True, eps: float = 1e-6,
    initial_state: LinearState | None = None, output_final_state: bool = False,
) -> Tensor | tuple[Tensor, LinearState]:  # fmt: skip
    """Causal linear attention in blocks of ``chunk_size`` tokens, all blocks at once: a masked
    quadratic inside each block, and the state (S, z) of every earlier block from a cumulative
    sum of the blocks' kᵀv (plus the initial state). The query heads of a kv head are stacked
    as rows of one product, so keys are not repeated per query head.

    Args: as `linear_attn_quadratic`, plus
        chunk_size: tokens per block (>= 1).
        initial_state: state after the tokens preceding q (None: no history).
        output_final_state: also return the state after the last token.
    Returns:
        y: (B, H, T, D) in v's dtype, and the final `LinearState` if output_final_state.
    """
    _check_qkv(q, k, v)
    _check_positive("chunk_size", chunk_size)
    dtype, h, t, d = v.dtype, q.shape[1], q.shape[2], v.shape[-1]
    q, k, v = (x.to(torch.promote_types(dtype, torch.float32)) for x in (q, k, v))
    hk = k.shape[1]
    g = h // hk
    c = min(chunk_size, t) or 1
    n = -(-t // c)
    v1 = torch.cat([v, torch.ones_like(v[..., :1])], -1) if normalize else v  # ones: the normalizer
    qb = _query_rows(q, n, c, 0, hk)  # (B, Hk, n, g c, F)
    kb, vb = _block_rows(k, n, c, 0), _block_rows(v1, n, c, 0)  # (B, Hk, n, c, .)
    a = (qb @ kb.mT).masked_fill(_distance(c, c, 0, q.device).repeat(g, 1) < 0, 0.0)  # (B, Hk, n, g c, c)
    older = F.pad((kb.mT @ vb).cumsum(2), (0, 0, 0, 0, 1, 0))[:, :, :n]  # blocks before j: (B, Hk, n, F, D')
    full = a @ vb + qb @ older
    if initial_state is not None:
        s0, z0 = _linear_state(initial_state, q, v)  # per query head: (B, H, F, D), (B, H, F)
        s0 = torch.cat([s0, z0.unsqueeze(-1)], -1) if normalize else s0
        full = full + _query_rows(q @ s0, n, c, 0, hk)
    y = full[..., :d] / (full[..., d:] + eps) if normalize else full
    y = _query_heads_back(y, c, 0, t).to(dtype)
    if not output_final_state:
        return y
    s_, z = expand_kv(k.mT @ v, h), expand_kv(k.sum(2), h)
    if initial_state is not None:
        s0, z0 = _linear_state(initial_state, q, v)
        s_, z = s0 + s_, z0 + z
    return y, LinearState(s_, z)


def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, state: LinearState | None = None, *, normalize: bool = True, eps: float = 1e-6
) -> tuple[Tensor, LinearState]:
    """One token of causal linear attention: S += k^T v, z += k, then y = q S / (q z + eps).

    Args:
        q: (B, H, 1, F); k: (B, H_kv, 1, F); v: (B, H_kv, 1, D).
        state: state before this token (None: zeros).
    Returns:
        y: (B, H, 1, D) in v's dtype, and the state after this token.
    """
    _check_qkv(q, k, v)
    _check_one_token(q)
    dtype, h = v.dtype, q.shape[1]
    q, k, v = _up(h, v, q, k, v)
    s_, z = _linear_state(state, q, v)
    s_ = s_ + k.mT @ v  # (B, H, F, D)
    z = z + k[:, :, 0]
    y = q @ s_
    if normalize:
        y = y / (q @ z.unsqueeze(-1) + eps)
    return y.to(dtype), LinearState(s_, z)


def linear_attn_weights(q: Tensor, k: Tensor, *, eps: float = 1e-6) -> Tensor:
    """The (B, H, T, T) row-normalized weights of `linear_attn_quadratic`: y = weights @ v.

    Used for Hedgehog's attention-weight cross-entropy; q: (B, H, T, F); k: (B, H_kv, T, F).
    """
    a = _linear_scores(*_up(q.shape[1], q, q, k))  # (B, H, T, T)
    return a / (a.sum(-1, keepdim=True) + eps)
