"""LoLCATs: exact softmax over the last ``window`` keys (and the first ``sinks`` keys of the
sequence) plus linear attention over the others.

One shared normalizer; the softmax share per head is sigmoid(window_factor), a learned
parameter starting at ``window_factor_init`` (sigmoid⁻¹(0.1) in LoLCATs). With ``window=0``
there is no softmax part and the layer is exactly plain linear attention.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from linearize import ops
from linearize.attention.linear import LinearAttention
from linearize.attention.projected import Projected
from linearize.config import AttentionConfig


class WindowAttention(nn.Module):
    def __init__(self, cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.linear = LinearAttention(cfg, n_heads, n_kv_heads, head_dim)
        self.window_factor = nn.Parameter(torch.full((n_heads,), cfg.window_factor_init))
        self.window, self.sinks = cfg.window, cfg.sinks

    def forward(self, p: Projected) -> Tensor:
        if self.window == 0:
            return self.linear(p)
        lin = self.linear
        return ops.window_attn(
            p.q, p.k, p.v, lin.feature_q(p.q), lin.feature_k(p.k),
            window=self.window, window_factor=torch.sigmoid(self.window_factor), scale=p.scale,
            eps=lin.eps, chunk_size=lin.chunk_size, backend=lin.backend, sinks=self.sinks,
        )  # fmt: skip

    def extend(self, p: Projected, state):
        """Outputs over p's tokens continuing from ``state``, and the state after them."""
        if self.window == 0:
            return self.linear.extend(p, state)
        lin = self.linear
        fq, fk = lin.feature_q(p.q), lin.feature_k(p.k)
        common = dict(
            window=self.window, window_factor=torch.sigmoid(self.window_factor), scale=p.scale,
            eps=lin.eps, backend=lin.backend, sinks=self.sinks,
        )  # fmt: skip
        if p.q.shape[2] == 1:
            return ops.window_attn_step(p.q, p.k, p.v, fq, fk, state, **common)
        return ops.window_attn(
            p.q, p.k, p.v, fq, fk, chunk_size=lin.chunk_size, initial_state=state,
            output_final_state=True, **common,
        )  # fmt: skip

    def weights(self, p: Projected) -> Tensor:
        """(B, H, T, T) attention weights, for the attention-weight cross-entropy."""
        if self.window == 0:
            return self.linear.weights(p)
        lin = self.linear
        return ops.window_attn_weights(
            p.q, p.k, lin.feature_q(p.q), lin.feature_k(p.k), window=self.window,
            window_factor=torch.sigmoid(self.window_factor), scale=p.scale, eps=lin.eps, sinks=self.sinks,
        )  # fmt: skip
