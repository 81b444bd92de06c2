"""DeltaNet and Gated DeltaNet as the converted attention: the delta rule over the teacher's own
queries and keys, optionally beside a sliding-window softmax.

Queries and keys go through the configured feature map (``identity``: the teacher's own), then
are L2-normalised, as the rule needs for a stable state (`linearize.ops.delta`). Per token and
kv head the mixer needs a write strength β_t in (0, 1) and, gated, a log decay log α_t < 0.
Both are read from the pre-rotary key (the attention function sees no hidden state):

- ``delta_rates=proj``: a new per-head projection of the key to one logit each,
  β = sigmoid(w_β · k + b_β), log α = -softplus(w_α · k + b_α). They start at w = 0, β = 1/2
  and α = e^-softplus(-4) ≈ 0.98 (a memory of some 55 tokens), so a fresh swap writes evenly;
- ``delta_rates=key``: no new parameter (as Liger's gate): the key's mean feature m gives
  β = sigmoid(m) and log α = logsigmoid(m) / gate_normalizer.

With ``window > 0`` the output is ``mix · delta + (1 - mix) · sliding-window softmax`` (Liger's
hybrid form); with ``window = 0`` it is the delta rule alone. The output scale is 1: a unit
query reads a unit key's written value back at its own size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize import ops
from linearize.attention.feature_maps import build_feature_map
from linearize.attention.gated import LigerState, beside_window, beside_window_full
from linearize.attention.projected import Projected
from linearize.config import AttentionConfig

_DECAY_BIAS = -4.0  # log α = -softplus(-4) ≈ -0.018 at the start: α ≈ 0.98


class DeltaAttention(nn.Module):
    pre_rotary = True  # β and α read the pre-rotary keys

    def __init__(self, cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.feature_q = build_feature_map(cfg.feature_map, n_heads, head_dim, cfg.feature_dim)
        self.feature_k = build_feature_map(cfg.feature_map, n_kv_heads, head_dim, cfg.feature_dim)
        self.gated, self.rates = cfg.gated, cfg.delta_rates
        self.window, self.mix = cfg.window, cfg.mix
        self.gate_normalizer = cfg.gate_normalizer
        self.chunk_size, self.backend = cfg.chunk_size, cfg.backend
        if self.rates == "proj":
            n = 2 if self.gated else 1  # β's logit, then α's
            self.rate_weight = nn.Parameter(torch.zeros(n, n_kv_heads, head_dim))
            self.rate_bias = nn.Parameter(torch.tensor([0.0, _DECAY_BIAS][:n]).view(n, 1, 1).repeat(1, n_kv_heads, 1))

    def rates_of(self, k_pre: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """β (B, H_kv, T) in (0, 1) and the log decay (B, H_kv, T) < 0 (None ungated) of the keys."""
        if self.rates == "key":
            m = k_pre.mean(-1)
            return torch.sigmoid(m), (F.logsigmoid(m) / self.gate_normalizer if self.gated else None)
        logits = torch.einsum("bhtd,nhd->nbht", k_pre, self.rate_weight.to(k_pre.dtype))
        logits = logits + self.rate_bias.to(k_pre.dtype)[:, None]  # (n, H_kv, 1) -> (n, 1, H_kv, 1)
        return torch.sigmoid(logits[0]), (-F.softplus(logits[1]) if self.gated else None)

    def _inputs(self, p: Projected) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
        fq = F.normalize(self.feature_q(p.q), dim=-1)
        fk = F.normalize(self.feature_k(p.k), dim=-1)
        return (fq, fk, *self.rates_of(p.k_pre))

    def extend(self, p: Projected, state: Optional[LigerState]) -> tuple[Tensor, LigerState]:
        """Outputs over p's tokens continuing from ``state``, and the state after them."""
        fq, fk, beta, g = self._inputs(p)
        delta = None if state is None else ops.DeltaState(state.S)
        if p.q.shape[2] == 1:
            y, delta = ops.delta_attn_step(fq, fk, p.v, beta, g, delta, backend=self.backend)
        else:
            y, delta = ops.delta_attn(
                fq, fk, p.v, beta, g, chunk_size=self.chunk_size, backend=self.backend,
                initial_state=delta, output_final_state=True,
            )  # fmt: skip
        return beside_window(y, p, state, delta.S, self.window, self.mix)

    def forward(self, p: Projected) -> Tensor:
        fq, fk, beta, g = self._inputs(p)
        y = ops.delta_attn(fq, fk, p.v, beta, g, chunk_size=self.chunk_size, backend=self.backend)
        return beside_window_full(y, p, self.window, self.mix)
