"""The attention math. Only this module chooses an implementation.

Layout everywhere: (B, H, T, D), k/v/gates may carry fewer (KV) heads (see ``reference``).
``backend``: ``auto`` picks Triton on CUDA once it exists and the PyTorch reference otherwise;
``reference`` forces PyTorch; ``triton`` where Triton cannot run is an error, never a fallback.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from linearize.config import BACKENDS
from linearize.log import get_logger
from linearize.ops import reference
from linearize.ops.reference import (  # attention weights: dense T x T, for losses on them
    GatedState,
    LinearState,
    WindowState,
    expand_kv,
    linear_attn_weights,
    softmax_weights,
    window_attn_weights,
)

__all__ = [
    "BACKENDS", "GatedState", "LinearState", "WindowState", "gated_attn", "linear_attn",
    "linear_attn_weights", "resolve_backend", "softmax_attn", "softmax_weights", "window_attn",
    "window_attn_weights",
]  # fmt: skip

log = get_logger(__name__)
_said_why: set[str] = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The implementation that will run; logs once why Triton is not used on a GPU."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "triton":
        raise NotImplementedError(
            "attention.backend=triton: the Triton kernels are not built yet; "
            "use attention.backend=reference (or auto)"
        )
    if backend == "auto" and device.type == "cuda" and "cuda" not in _said_why:
        _said_why.add("cuda")
        log.warning("Triton kernels are not built yet; the PyTorch reference runs on CUDA")
    return "reference"


def linear_attn(
    q: Tensor, k: Tensor, v: Tensor, *, normalize: bool = True, eps: float = 1e-6,
    chunk_size: int = 64, backend: str = "auto",
) -> Tensor:  # fmt: skip
    """Causal linear attention on feature-mapped q (B,H,T,F), k (B,H_kv,T,F); v (B,H_kv,T,D)."""
    resolve_backend(backend, q.device)
    return reference.linear_attn_chunked(q, k, v, chunk_size=chunk_size, normalize=normalize, eps=eps)


def window_attn(
    q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, *, window: int,
    window_factor: Tensor, scale: float, eps: float = 1e-6, chunk_size: int = 64,
    backend: str = "auto",
) -> Tensor:  # fmt: skip
    """LoLCATs hybrid: softmax over the last ``window`` keys, linear beyond; see ``reference``."""
    resolve_backend(backend, q.device)
    return reference.window_attn_chunked(
        q, k, v, fq, fk, window=window, window_factor=window_factor, scale=scale,
        chunk_size=chunk_size, eps=eps,
    )  # fmt: skip


def gated_attn(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float = 1.0, chunk_size: int = 64,
    backend: str = "auto",
) -> Tensor:  # fmt: skip
    """Gated linear attention (GLA): S_t = diag(exp g_t) S_{t-1} + k_tᵀ v_t, y_t = scale q_t S_t."""
    resolve_backend(backend, q.device)
    return reference.gated_attn_chunked(q, k, v, g, scale=scale, chunk_size=chunk_size)


def softmax_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """Causal softmax attention as the teacher computes it (SDPA), optionally sliding-window.

    Args:
        q: (B, H, T, D); k, v: (B, H_kv, T, D).
        window: keys per query, itself included; ``None`` for full causal attention.
    Returns:
        (B, H, T, D) in q's dtype.
    """
    h, t = q.shape[1], q.shape[2]
    k, v = expand_kv(k, h), expand_kv(v, h)
    if window is None or window >= t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(t, device=q.device)
    dist = i[:, None] - i[None, :]  # (T, T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(dist >= 0) & (dist < window), scale=scale)
