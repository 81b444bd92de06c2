"""The attention layer that replaces a teacher's: its projections, rotary, and a mixer.

The layer keeps the teacher's q/k/v/o projection modules themselves (shared, not copied),
computes q, k, v and rotary exactly as the teacher does, then hands them to a *mixer* — one of
the zoo's linear attentions — which returns per-head outputs. ``mode`` decides what flows on:

- ``student``: the mixer's output (the converted model);
- ``teacher``: softmax attention over the same q, k, v (the original model, to fp rounding);
- ``transfer``: both are computed from one pass over the projections; the student and teacher
  outputs (and the projected inputs, for losses on attention weights) go to ``collector``
  (stage 1's loss) and the teacher's output flows on, so every layer trains on the inputs the
  teacher would give it.

Given a cache (``generate()``, ``use_cache=True``), a student layer continues from its
recurrent state in that cache (see :mod:`linearize.attention.cache`); in ``teacher`` mode the
teacher's own module runs, keeping keys and values as it always did.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

from torch import Tensor, nn

from linearize import ops
from linearize.attention.cache import recurrent_entry

MODES = ("student", "teacher", "transfer")
RotaryFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
Collector = Callable[[int, Tensor, Tensor, "Projected"], None]


@dataclass
class Projected:
    """One layer's projected inputs, (B, H, T, D) layout; k/v at the KV head count."""

    q: Tensor  # (B, H, T, D) after rotary
    k: Tensor  # (B, H_kv, T, D) after rotary
    v: Tensor  # (B, H_kv, T, D)
    q_pre: Tensor  # (B, H, T, D) before rotary
    k_pre: Tensor  # (B, H_kv, T, D) before rotary
    scale: float  # the teacher's softmax scale
    # Applies this layer's rotary at these positions to any (q, k) pair: for maps that act
    # before rotary (SUPRA). None where no positions are known.
    rotate: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None


class Mixer(Protocol):
    """A linear attention of the zoo: per-head outputs (B, H, T, D) from projected inputs."""

    def __call__(self, p: Projected) -> Tensor: ...

    def extend(self, p: Projected, state: Optional[NamedTuple]) -> tuple[Tensor, NamedTuple]:
        """Continue a sequence from ``state`` (None: its start) over p's tokens: the outputs
        and the state after them (one token: the recurrent step; more: the chunked form)."""
        ...


class AttentionLayer(nn.Module):
    """Drop-in replacement for a teacher attention module (same call signature and returns)."""

    def __init__(
        self, teacher: nn.Module, mixer: nn.Module, rotary: RotaryFn, *,
        n_heads: int, n_kv_heads: int, head_dim: int, sliding_window: Optional[int] = None,
    ):  # fmt: skip
        super().__init__()
        self.layer_idx: int = teacher.layer_idx
        self.q_proj, self.k_proj = teacher.q_proj, teacher.k_proj
        self.v_proj, self.o_proj = teacher.v_proj, teacher.o_proj
        self.mixer = mixer
        self.rotary = rotary
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.scaling: float = teacher.scaling
        self.sliding_window = sliding_window
        self.mode = "student"
        self.collector: Optional[Collector] = None
        # The replaced module, kept out of the module tree (its projections are ours already)
        # so that a layer can be set back to the teacher's own attention.
        self._teacher = (teacher,)

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def project(self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Projected:
        b, t, _ = hidden_states.shape
        q = self.q_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q_rot, k_rot = self.rotary(q, k, cos, sin)
        return Projected(q_rot, k_rot, v, q, k, self.scaling, lambda a, b: self.rotary(a, b, cos, sin))

    def teacher_attention(self, p: Projected) -> Tensor:
        return ops.softmax_attn(p.q, p.k, p.v, scale=p.scale, window=self.sliding_window)

    def forward(
        self, hidden_states: Tensor, position_embeddings: tuple[Tensor, Tensor],
        attention_mask: Optional[Tensor] = None, cache=None, **kwargs,
    ) -> tuple[Tensor, None]:  # fmt: skip
        if self.mode not in MODES:
            raise ValueError(f"AttentionLayer.mode={self.mode!r} is not one of {', '.join(MODES)}")
        if cache is not None and self.mode == "teacher":  # the original module, keys and values cached
            return self.teacher(hidden_states, position_embeddings, attention_mask, cache=cache, **kwargs)
        if cache is not None and self.mode == "transfer":
            if cache.get_seq_length(self.layer_idx) > 0:
                raise ValueError("stage-1 transfer mode does not decode: call the model with use_cache=False")
            cache = None  # a plain forward that asked for a fresh cache: nothing to continue
        p = self.project(hidden_states, position_embeddings)
        if cache is not None:
            entry = recurrent_entry(cache, self.layer_idx)
            y, state = self.mixer.extend(p, entry.state)
            entry.advance(state, p.q.shape[2])
        elif self.mode == "teacher":
            y = self.teacher_attention(p)
        elif self.mode == "student":
            y = self.mixer(p)
        else:
            if self.collector is None:
                raise RuntimeError("mode='transfer' needs a collector for the per-layer outputs")
            y = self.teacher_attention(p)
            self.collector(self.layer_idx, self.mixer(p), y, p)
        b, _, t, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1)), None  # (B, T, hidden)
