"""SUPRA ("Linearizing Large Language Models"): ReLU-affine features, fixed decay, GroupNorm.

Per layer, as SUPRA's public code (TRI-ML/linear_open_lm) does it:

- queries and keys each go through a learned affine map over all heads' channels (with bias),
  then ReLU; under GQA the keys have their own map at the KV head count. The maps start as the
  identity (weight I, bias 0), so training starts from ReLU of the teacher's own q and k.
  They are the only new parameters;
- rotary is applied to those features (after the map), and keys are scaled by 1/sqrt(d);
- the recurrence is gated linear attention with a constant per-head gate:
  S_t = γ_h S_{t-1} + k_tᵀ v_t, y_t = q_t S_t (``ops.gated_attn`` with g = log γ_h), no
  normalising denominator;
- each head's output is normalised over its channels (GroupNorm with one group per head, no
  affine) before the teacher's output projection.

γ_h: ``lightning`` (default) uses exp(−slope_h) with ALiBi's geometric slopes, as Lightning
Attention does, without its per-layer rescaling; ``retnet`` uses 1 − 2^(−5−h); ``none`` uses 1.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize import ops
from linearize.attention.projected import Projected
from linearize.config import AttentionConfig


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's head slopes: 2^(−8/n)^(h+1) for n a power of two, interleaved otherwise."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (h + 1) for h in range(n)]

    if math.log2(n_heads).is_integer():
        return power_of_two(n_heads)
    closest = 2 ** math.floor(math.log2(n_heads))
    return power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]


def log_decays(kind: str, n_heads: int) -> Tensor:
    """log γ_h per head (H,), every entry <= 0."""
    if kind == "lightning":
        return -torch.tensor(alibi_slopes(n_heads), dtype=torch.float64).float()
    if kind == "retnet":
        return torch.log1p(-(2.0 ** (-5.0 - torch.arange(n_heads, dtype=torch.float64)))).float()
    if kind == "none":
        return torch.zeros(n_heads)
    raise ValueError(f"attention.decay={kind!r} is not one of lightning, retnet, none")


def _identity_affine(width: int) -> nn.Linear:
    layer = nn.Linear(width, width, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(width))
        layer.bias.zero_()
    return layer


class SupraAttention(nn.Module):
    pre_rotary = True  # its maps act before rotary
    def __init__(self, cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.map_q = _identity_affine(n_heads * head_dim)
        self.map_k = _identity_affine(n_kv_heads * head_dim)
        self.register_buffer("log_decay", log_decays(cfg.decay, n_heads), persistent=False)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.eps, self.chunk_size, self.backend = cfg.eps, cfg.chunk_size, cfg.backend

    @staticmethod
    def _map(affine: nn.Linear, x: Tensor) -> Tensor:
        """ReLU(affine) over all heads' channels of x (B, H, T, D) at each position."""
        b, h, t, d = x.shape
        y = F.relu(affine(x.transpose(1, 2).reshape(b, t, h * d)))
        return y.view(b, t, h, d).transpose(1, 2)

    def features(self, p: Projected) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """q, k, v at the query head count and the per-head log decay g (B, H, T)."""
        if p.rotate is None:
            raise ValueError("SUPRA applies rotary after its feature maps: Projected.rotate is missing")
        q, k = p.rotate(self._map(self.map_q, p.q_pre), self._map(self.map_k, p.k_pre))
        k = k * self.head_dim**-0.5
        b, h, t, _ = q.shape
        g = self.log_decay.to(q.dtype).view(1, h, 1).expand(b, h, t)
        return q, ops.expand_kv(k, h), ops.expand_kv(p.v, h), g

    def norm(self, y: Tensor) -> Tensor:
        """GroupNorm with one group per head and no affine: each head's channels, per token."""
        wide = y.to(torch.promote_types(y.dtype, torch.float32))  # fp32 at least (bf16 inputs)
        return F.layer_norm(wide, (y.shape[-1],), eps=self.eps).to(y.dtype)

    def forward(self, p: Projected) -> Tensor:
        q, k, v, g = self.features(p)
        return self.norm(ops.gated_attn(q, k, v, g, chunk_size=self.chunk_size, backend=self.backend))

    def extend(self, p: Projected, state: Optional[ops.GatedState]) -> tuple[Tensor, ops.GatedState]:
        """Outputs over p's tokens continuing from ``state``, and the state after them."""
        q, k, v, g = self.features(p)
        if q.shape[2] == 1:
            y, state = ops.gated_attn_step(q, k, v, g, state, backend=self.backend)
        else:
            y, state = ops.gated_attn(
                q, k, v, g, chunk_size=self.chunk_size, backend=self.backend,
                initial_state=state, output_final_state=True,
            )  # fmt: skip
        return self.norm(y), state
