"""What a converted layer's mixer reads: the family's own q, k, v as :class:`Projected`, with the
pre-rotary queries and keys for maps that act before rotary (SUPRA, Liger's gate), recovered by
the family's own ``apply_rotary_pos_emb`` with the sine negated."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn


@dataclass
class Projected:
    """One layer's projected inputs, (B, H, T, D) layout; k/v at the KV head count."""

    q: Tensor  # (B, H, T, D) after rotary
    k: Tensor  # (B, H_kv, T, D) after rotary
    v: Tensor  # (B, H_kv, T, D)
    q_pre: Optional[Tensor]  # (B, H, T, D) before rotary (None unless the mixer asks: pre_rotary)
    k_pre: Optional[Tensor]  # (B, H_kv, T, D) before rotary
    scale: float  # the teacher's softmax scale
    # Applies this layer's rotary at these positions to any (q, k) pair: for maps that act
    # before rotary (SUPRA). None where no positions are known.
    rotate: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None
    # (B, T) True at real tokens, False at padding; None when every token is real.
    valid: Optional[Tensor] = None


def family_function(module: nn.Module, name: str) -> Optional[Callable]:
    return getattr(sys.modules[type(module).__module__], name, None)


def project(
    module: nn.Module, mixer: nn.Module, q: Tensor, k: Tensor, v: Tensor, scaling: Optional[float],
    rope: Optional[tuple[Tensor, Tensor]], check: bool = False,
) -> Projected:  # fmt: skip
    """The mixer's inputs from the family's own (rotated) q, k, v; with ``check``, first make
    sure that rotating the pre-rotary q, k again gives the family's own."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    apply_rotary = family_function(module, "apply_rotary_pos_emb")
    if rope is None or apply_rotary is None:  # no rotary: pre- and post-rotary are one
        return Projected(q, k, v, q, k, scale, lambda a, b: (a, b))
    cos, sin = rope
    q_pre = k_pre = None
    if getattr(mixer, "pre_rotary", False):
        # Rotating by -angle undoes a rotation; cos² + sin² is the scale some rotaries also apply
        # (YaRN's attention factor), divided out twice: once for the scale, once for its inverse.
        advice = (
            f"{type(mixer).__name__} reads queries and keys before rotary, but {type(module).__name__} "
            "rotates only part of them or in its own way, so its rotary cannot be undone here"
        )
        hint = "use an attention kind that reads them after rotary (lolcats, hedgehog, t2r, elu, relu)"
        try:
            norm = cos * cos + sin * sin
            q_pre, k_pre = apply_rotary(q, k, cos / norm, -sin / norm)
            if check:
                q_again, k_again = apply_rotary(q_pre, k_pre, cos, sin)
        except (TypeError, RuntimeError) as err:
            raise NotImplementedError(f"{advice} ({err}); {hint}") from None
        if check:
            for got, want in ((q_again, q), (k_again, k)):
                tol = max(32 * torch.finfo(want.dtype).eps, 1e-5) * want.abs().max().item()
                if not torch.allclose(got, want, rtol=0.0, atol=tol):
                    raise NotImplementedError(
                        f"{advice} (rotating the recovered inputs again misses by "
                        f"{(got - want).abs().max().item():.3g}); {hint}"
                    )
    return Projected(q, k, v, q_pre, k_pre, scale, lambda a, b: apply_rotary(a, b, cos, sin))
