"""The converted attention: one function behind transformers' ``AttentionInterface``.

Every family transformers ships projects q, k, v in its own attention module, normalises them
where it does (q/k norms), applies its own rotary, updates the cache, and only then calls the
attention function its config names. :func:`linearized_attention` is registered as
``linearize_<original>`` (``linearize_sdpa``, ``linearize_eager``, …), so it receives exactly the
family's q, k, v — nothing of a family's projection code is copied here. A converted layer's
attention module carries its *mixer* (one of the zoo's linear attentions) as the child module
``mixer`` and a :class:`Linearized` slot; a module without one (a layer kept softmax, or a
teacher layer that was already local) runs the original function, untouched.

``Linearized.mode`` decides what a converted layer returns:

- ``student``: the mixer's output (the converted model);
- ``teacher``: the original function's (the teacher itself, bit for bit);
- ``transfer``: both from the same q, k, v; the student and teacher outputs (and the projected
  inputs, for losses on attention weights) go to ``collector`` (stage 1's loss) and the
  teacher's output flows on, so every layer trains on the inputs the teacher would give it.

What the function is not handed, and where it comes from:

- *rotary*, for maps that act before it (SUPRA) and Liger's gate on pre-rotary keys: a forward
  pre-hook on the module keeps the call's position embeddings; the family's own
  ``apply_rotary_pos_emb`` applies them to any (q, k), and with the sine negated undoes them;
- *the cache*: in ``student`` mode the pre-hook puts a :class:`RecurrentState` into the layer's
  cache slot before the module updates it; that entry hands the new tokens' keys and values
  back without storing them, and the function continues the mixer's constant-size state;
- *masks*: each ``linearize_<original>`` is also registered with the original's mask function,
  so the teacher path gets the masks (causal, padding, sliding) it always had. The mixers are
  causal by construction and read only which of the call's keys are padding
  (:func:`key_validity`): a padded batch runs the mixer on each row's real tokens alone, so a
  left-padded prompt gives what it gives unpadded, and its decoding state never holds a pad.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

from torch import Tensor, nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from linearize import ops
from linearize.attention.cache import RecurrentState
from linearize.attention.hooks import slot
from linearize.attention.padding import by_row, key_validity
from linearize.attention.projected import Projected, family_function, project

MODES = ("student", "teacher", "transfer")
PREFIX = "linearize_"
Collector = Callable[[int, Tensor, Tensor, "Projected"], None]


class Linearized:
    """A converted layer's slot on its attention module: mode, collector, the teacher's window,
    and what the pre-hook hands over for one call (position embeddings, cache entry)."""

    def __init__(self, module: nn.Module, sliding_window: Optional[int]):
        self.layer_idx: int = module.layer_idx
        self.mode = "student"
        self.collector: Optional[Collector] = None
        self.sliding_window = sliding_window  # the teacher's own, for losses on its weights
        self.module = module  # the attention module this slot sits on (a plain reference)
        self.rope: Optional[tuple[Tensor, Tensor]] = None
        self.entry: Optional[RecurrentState] = None
        self.calls = 0  # attention calls in this forward
        self.rotary_checked = False

    @property
    def mixer(self) -> nn.Module:
        return self.module.mixer

    @mixer.setter
    def mixer(self, mixer: nn.Module) -> None:
        self.module.mixer = mixer

    def teacher_weights(self, p: Projected) -> Tensor:
        """The teacher's softmax attention weights (B, H, T, T) for the projected inputs ``p``,
        its own window applied: the target of losses on attention weights (Hedgehog's)."""
        return ops.softmax_weights(p.q, p.k, scale=p.scale, window=self.sliding_window)


def original_function(module: nn.Module, name: str) -> Callable:
    """The attention function ``name`` means for this module (``eager``: the family's own)."""
    if name == "eager":
        fn = family_function(module, "eager_attention_forward")
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def linearized_attention(
    module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
    scaling: Optional[float] = None, dropout: float = 0.0, *, original: str, **kwargs,
) -> tuple[Tensor, Optional[Tensor]]:  # fmt: skip
    """The attention function of a converted model: (B, T, H, D) outputs, like every other."""
    teacher = original_function(module, original)
    s = slot(module)
    if s is None or s.mode == "teacher":
        return teacher(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if s.mode not in MODES:
        raise ValueError(f"Linearized.mode={s.mode!r} is not one of {', '.join(MODES)}")
    # A module may call attention more than once per forward (DiffLlama's two value halves, the
    # cycles of HRM-like models): each call keeps its own state.
    if s.entry is not None and not s.entry.updated:
        raise NotImplementedError(
            f"{type(module).__name__} (layer {s.layer_idx}) stored its keys in another cache slot than its own "
            "layer's (a model that runs its layers more than once per forward), which linearize's recurrent "
            "state does not replace, so this family decodes only with use_cache=False"
        )
    entry = None if s.entry is None else s.entry.for_call(s.calls)
    s.calls += 1
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(
            f"layer {s.layer_idx} got {key.shape[2]} keys for {query.shape[2]} queries: {type(module).__name__} "
            "handed it keys from a cache slot linearize's recurrent state does not replace (one it does not pass "
            "by a known name, or another layer's), so this family decodes only with use_cache=False"
        )
    p = project(module, s.mixer, query, key, value, scaling, s.rope, check=not s.rotary_checked)
    s.rotary_checked = True
    p.valid = key_validity(attention_mask, 0 if entry is None else entry.seen, query.shape[2])
    if s.mode == "transfer":
        if s.collector is None:
            raise RuntimeError("mode='transfer' needs a collector for the per-layer outputs")
        out, weights = teacher(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        student = s.mixer(p) if p.valid is None else by_row(module, s, p, scaling, None)
        s.collector(s.layer_idx, student, out.transpose(1, 2), p)
        return out, weights
    if p.valid is not None or (entry is not None and isinstance(entry.state, list)):
        y = by_row(module, s, p, scaling, entry)
    elif entry is not None:  # decoding, or a forward that keeps its state
        y, state = s.mixer.extend(p, entry.state)
        entry.advance(state, query.shape[2])
    else:
        y = s.mixer(p)
    return y.transpose(1, 2).contiguous(), None


def register_as(name: str, fn: Callable, original: str) -> str:
    """Register ``fn`` as attention implementation ``name``, with ``original``'s mask function
    (an implementation registered without one gets no mask); returns the name."""
    AttentionInterface.register(name, fn)
    if original in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[original])
    return name


def register(original: str) -> str:
    """Register ``linearize_<original>``; returns the name."""
    if original.startswith(PREFIX):
        raise ValueError(f"attention implementation {original!r} is already linearized")
    return register_as(PREFIX + original, partial(linearized_attention, original=original), original)
