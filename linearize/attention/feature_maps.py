"""Feature maps φ applied to queries and keys, one registry for all of them.

Every map takes (B, H, T, D) and returns (B, H, T, F) with ``F = out_dim``. Learned maps hold
one weight per head (queries and keys get separate instances, as LoLCATs does); under GQA the
key map has the KV head count.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _PerHeadLinear(nn.Module):
    """x @ W_h (+ b_h) for each head h: (B, H, T, D) -> (B, H, T, F).

    W_h starts as the identity when F == D (the map begins as φ applied to x itself, so a
    freshly swapped model is already close to a useful attention), else Kaiming-uniform.
    """

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_heads, head_dim, feature_dim))
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, feature_dim)) if bias else None
        with torch.no_grad():
            if feature_dim == head_dim:
                self.weight.copy_(torch.eye(head_dim).expand(n_heads, -1, -1))
            else:
                nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("bhtd,hdf->bhtf", x, self.weight.to(x.dtype))
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Hedgehog(nn.Module):
    """Hedgehog / LoLCATs: [softmax(W x), softmax(-W x)] over the feature dim ("fullspace")."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.linear = _PerHeadLinear(n_heads, head_dim, feature_dim, bias=False)
        self.out_dim = 2 * feature_dim

    def forward(self, x: Tensor) -> Tensor:
        y = self.linear(x)  # (B, H, T, F)
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)  # (B, H, T, 2F)


class T2R(nn.Module):
    """T2R: ReLU(W x + b), a learned per-head affine map."""

    def __init__(self, n_heads: int, head_dim: int, feature_dim: int):
        super().__init__()
        self.linear = _PerHeadLinear(n_heads, head_dim, feature_dim, bias=True)
        self.out_dim = feature_dim

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.linear(x))


class _Elementwise(nn.Module):
    """A fixed map with nothing to learn; keeps the head dim."""

    def __init__(self, fn: Callable[[Tensor], Tensor], head_dim: int):
        super().__init__()
        self.fn = fn
        self.out_dim = head_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


FEATURE_MAPS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "hedgehog": Hedgehog,
    "t2r": T2R,
    "elu": lambda h, d, f: _Elementwise(lambda x: F.elu(x) + 1.0, d),
    "relu": lambda h, d, f: _Elementwise(F.relu, d),
    "identity": lambda h, d, f: _Elementwise(lambda x: x, d),
    # Liger: softmax over the head dim, for queries and keys alike.
    "softmax": lambda h, d, f: _Elementwise(lambda x: x.softmax(-1), d),
}


def build_feature_map(name: str, n_heads: int, head_dim: int, feature_dim: int) -> nn.Module:
    """A feature map from the registry; its ``out_dim`` attribute is F."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature map {name!r} is not one of {', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name](n_heads, head_dim, feature_dim)
