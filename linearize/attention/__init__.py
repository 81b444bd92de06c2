"""The attention zoo: pure PyTorch modules, no training code.

``build_mixer`` turns an ``AttentionConfig`` into the module that stands in for softmax attention
in a converted layer (see :mod:`linearize.attention.layer`).
"""

from __future__ import annotations

from torch import nn

from linearize.attention.delta import DeltaAttention
from linearize.attention.gated import GatedAttention
from linearize.attention.layer import Linearized
from linearize.attention.linear import LinearAttention
from linearize.attention.projected import Projected
from linearize.attention.supra import SupraAttention
from linearize.attention.window import WindowAttention
from linearize.config import AttentionConfig

MIXERS = {
    "linear": LinearAttention, "window": WindowAttention, "gated": GatedAttention,
    "supra": SupraAttention, "delta": DeltaAttention,
}  # fmt: skip

__all__ = ["MIXERS", "Linearized", "Projected", "build_mixer"]


def build_mixer(cfg: AttentionConfig, n_heads: int, n_kv_heads: int, head_dim: int) -> nn.Module:
    if cfg.kind not in MIXERS:
        raise ValueError(
            f"attention.kind={cfg.kind!r} has no mixer; swappable kinds: {', '.join(MIXERS)}"
        )
    return MIXERS[cfg.kind](cfg, n_heads, n_kv_heads, head_dim)
