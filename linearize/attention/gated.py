"""Liger: gated linear attention with gates taken from the key projection (no new parameters).

The per-step log decay is ``logsigmoid(pool(k)) / gate_normalizer``, where ``pool`` averages
the pre-rotary key features down to the feature width (the identity when they match).
Queries and keys go through the configured feature map (Liger: softmax over the head dim).
With ``window > 0`` the output is ``mix · GLA + (1 - mix) · sliding-window softmax`` (Liger
attention); with ``window = 0`` it is the GLA output alone.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize import ops
from linearize.attention.feature_maps import build_feature_map
from linearize.attention.projected import Projected
from linearize.config import AttentionConfig


class LigerState(NamedTuple):
    """Decoding state of :class:`GatedAttention` (and of the delta rule's mixer, which pairs its
    state with a window the same way).

    Attributes:
        S: (B, H, F, D) the recurrent state (GLA's, or the delta rule's).
        k: (B, H_kv, W', D) the last W' <= window - 1 raw (rotary-applied) keys, for the
            sliding-window softmax part (W' = 0 when window is 0).
        v: (B, H_kv, W', D) their values.
    """

    S: Tensor
    k: Tensor
    v: Tensor


def beside_window(
    y: Tensor, p: Projected, state: Optional[LigerState], s: Tensor, window: int, mix: float
) -> tuple[Tensor, LigerState]:
    """A recurrent output ``y`` over p's tokens mixed with the sliding-window softmax over the
    last ``window`` keys (``mix · y + (1 - mix) · window``; ``y`` alone when window is 0), and
    the decoding state: the recurrent state ``s`` and the keys and values a later window reaches."""
    k, v = p.k, p.v
    if state is not None:  # keys and values still inside the window, then the new ones
        k, v = torch.cat([state.k, k], 2), torch.cat([state.v, v], 2)
    first = max(k.shape[2] - max(window - 1, 0), 0)  # older keys: no later window reaches them
    new_state = LigerState(s, k[:, :, first:], v[:, :, first:])
    if window == 0:
        return y, new_state
    return mix * y + (1.0 - mix) * ops.softmax_attn(p.q, k, v, scale=p.scale, window=window), new_state


def beside_window_full(y: Tensor, p: Projected, window: int, mix: float) -> Tensor:
    """`beside_window`'s output for a whole sequence (no state kept)."""
    if window == 0:
        return y
    return mix * y + (1.0 - mix) * ops.softmax_attn(p.q, p.k, p.v, scale=p.scale, window=window)


class GatedAttention(nn.Module):
    pre_rotary = True  # its gate reads the pre-rotary keys
    def __init__(self, cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.feature_q = build_feature_map(cfg.feature_map, n_heads, head_dim, cfg.feature_dim)
        self.feature_k = build_feature_map(cfg.feature_map, n_kv_heads, head_dim, cfg.feature_dim)
        self.window, self.mix = cfg.window, cfg.mix
        self.gate_normalizer = cfg.gate_normalizer
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend

    def gate(self, k_pre: Tensor) -> Tensor:
        """Log decay (B, H_kv, T, F), every entry < 0, from the pre-rotary keys."""
        b, h, t, d = k_pre.shape
        width = self.feature_k.out_dim
        pooled = k_pre if width == d else F.adaptive_avg_pool1d(k_pre.reshape(-1, 1, d), width)
        return F.logsigmoid(pooled.reshape(b, h, t, width)) / self.gate_normalizer

    def extend(self, p: Projected, state: Optional["LigerState"]) -> tuple[Tensor, "LigerState"]:
        """Outputs over p's tokens continuing from ``state``, and the state after them."""
        fq, fk, g = self.feature_q(p.q), self.feature_k(p.k), self.gate(p.k_pre)
        gla = None if state is None else ops.GatedState(state.S)
        if p.q.shape[2] == 1:
            y, gla = ops.gated_attn_step(fq, fk, p.v, g, gla, scale=p.scale, backend=self.backend)
        else:
            y, gla = ops.gated_attn(
                fq, fk, p.v, g, scale=p.scale, chunk_size=self.chunk_size, backend=self.backend,
                initial_state=gla, output_final_state=True,
            )  # fmt: skip
        return beside_window(y, p, state, gla.S, self.window, self.mix)

    def forward(self, p: Projected) -> Tensor:
        y = ops.gated_attn(
            self.feature_q(p.q), self.feature_k(p.k), p.v, self.gate(p.k_pre),
            scale=p.scale, chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        return beside_window_full(y, p, self.window, self.mix)
