"""Plain normalized linear attention: y_i = φ(q_i)·S_i / φ(q_i)·z_i."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from linearize import ops
from linearize.attention.feature_maps import build_feature_map
from linearize.attention.projected import Projected
from linearize.config import AttentionConfig


class LinearAttention(nn.Module):
    """Separate (untied) feature maps for queries and keys; keys at the KV head count."""

    def __init__(self, cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.feature_q = build_feature_map(cfg.feature_map, n_heads, head_dim, cfg.feature_dim)
        self.feature_k = build_feature_map(cfg.feature_map, n_kv_heads, head_dim, cfg.feature_dim)
        self.eps, self.chunk_size, self.backend = cfg.eps, cfg.chunk_size, cfg.backend

    def forward(self, p: Projected) -> Tensor:
        return ops.linear_attn(
            self.feature_q(p.q), self.feature_k(p.k), p.v,
            eps=self.eps, chunk_size=self.chunk_size, backend=self.backend,
        )  # fmt: skip

    def extend(self, p: Projected, state: Optional[ops.LinearState]) -> tuple[Tensor, ops.LinearState]:
        """Outputs over p's tokens continuing from ``state``, and the state after them."""
        fq, fk = self.feature_q(p.q), self.feature_k(p.k)
        if p.q.shape[2] == 1:
            return ops.linear_attn_step(fq, fk, p.v, state, eps=self.eps, backend=self.backend)
        return ops.linear_attn(
            fq, fk, p.v, eps=self.eps, chunk_size=self.chunk_size, backend=self.backend,
            initial_state=state, output_final_state=True,
        )  # fmt: skip

    def weights(self, p: Projected) -> Tensor:
        """(B, H, T, T) attention weights, for the attention-weight cross-entropy."""
        return ops.linear_attn_weights(self.feature_q(p.q), self.feature_k(p.k), eps=self.eps)
