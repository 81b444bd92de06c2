"""Causal softmax attention, the teacher's, in fp32 with explicit masks: the oracle the window
hybrid reduces to, and the dense weights for losses on them. No kernel: `linearize.ops.softmax_attn`
runs torch's SDPA.

Layout, GQA and precision: see `linearize.ops.common`.
"""

from __future__ import annotations

from torch import Tensor

from linearize.ops.common import _check_positive, _check_qkv, _distance, _up

__all__ = ["softmax_attn", "softmax_weights"]


def softmax_attn(q: Tensor, k: Tensor, v: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """Causal softmax attention in fp32 with an explicit mask: the teacher-side oracle.

    Args:
        q: (B, H, T, Dk); k: (B, H_kv, T, Dk); v: (B, H_kv, T, D).
        scale: logit scale, usually Dk ** -0.5.
        window: if given, each query sees only its last `window` keys, itself included.
    Returns:
        y: (B, H, T, D) in v's dtype.
    """
    _check_qkv(q, k, v)
    if window is not None:
        _check_positive("window", window)
    dtype, h, t = v.dtype, q.shape[1], q.shape[2]
    q, k, v = _up(h, v, q, k, v)
    dist = _distance(t, t, 0, q.device)  # (T, T)
    hidden = (dist < 0) | (dist >= (t if window is None else window))
    s = (q @ k.mT * scale).masked_fill(hidden, float("-inf"))
    return (s.softmax(-1) @ v).to(dtype)


def softmax_weights(q: Tensor, k: Tensor, *, scale: float, window: int | None = None) -> Tensor:
    """The (B, H, T, T) causal softmax weights of `softmax_attn` (the teacher's attention)."""
    h, t = q.shape[1], q.shape[2]
    q, k = _up(h, q, q, k)
    dist = _distance(t, t, 0, q.device)
    hidden = (dist < 0) | (dist >= (t if window is None else window))
    return (q @ k.mT * scale).masked_fill(hidden, float("-inf")).softmax(-1)
