"""Liger: gated linear attention with gates taken from the key projection (no new parameters).

The per-step log decay is ``logsigmoid(pool(k)) / gate_normalizer``, where ``pool`` averages
the pre-rotary key features down to the feature width (the identity when they match).
Queries and keys go through the configured feature map (Liger: softmax over the head dim).
With ``window > 0`` the output is ``mix · GLA + (1 - mix) · sliding-window softmax`` (Liger
attention); with ``window = 0`` it is the GLA output alone.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from linearize import ops
from linearize.attention.feature_maps import build_feature_map
from linearize.attention.layer import Projected
from linearize.config import AttentionConfig


class GatedAttention(nn.Module):
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

    def forward(self, p: Projected) -> Tensor:
        y = ops.gated_attn(
            self.feature_q(p.q), self.feature_k(p.k), p.v, self.gate(p.k_pre),
            scale=p.scale, chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip
        if self.window == 0:
            return y
        swa = ops.softmax_attn(p.q, p.k, p.v, scale=p.scale, window=self.window)
        return self.mix * y + (1.0 - self.mix) * swa
