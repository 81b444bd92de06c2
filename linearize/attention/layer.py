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

import sys
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch import Tensor, nn
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from linearize.attention.cache import RecurrentState, recurrent_entry

MODES = ("student", "teacher", "transfer")
PREFIX = "linearize_"
Collector = Callable[[int, Tensor, Tensor, "Projected"], None]
# Cache layers that hold keys and values only: a converted layer's recurrent state takes their place.
PLAIN_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer, RecurrentState)


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


def slot(module: nn.Module) -> Optional[Linearized]:
    return module.__dict__.get("_linearized")


def _family_function(module: nn.Module, name: str) -> Optional[Callable]:
    return getattr(sys.modules[type(module).__module__], name, None)


def _cache_of(kwargs: dict):
    for name in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def before_call(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a converted attention module: keep the call's position embeddings,
    and in ``student`` mode put the layer's recurrent entry into the cache before the module
    writes keys and values there."""
    s = slot(module)
    if s is None:
        return
    s.rope = kwargs.get("position_embeddings", args[1] if len(args) > 1 else None)
    s.entry, s.calls = None, 0
    cache = _cache_of(kwargs)
    if cache is None or s.mode == "teacher":
        return
    if s.mode == "transfer":
        if cache.get_seq_length(s.layer_idx) > 0:
            raise ValueError("stage-1 transfer mode does not decode: call the model with use_cache=False")
        return
    held = cache.layers[s.layer_idx] if s.layer_idx < len(cache.layers) else None
    if held is None or type(held) in PLAIN_CACHE_LAYERS:
        s.entry = recurrent_entry(cache, s.layer_idx)
        s.entry.updated = False  # the module's cache.update on it says it reads its own slot
    elif _seq_length(held) > 0:
        raise NotImplementedError(
            f"layer {s.layer_idx}'s cache slot is a {type(held).__name__}, which holds more than keys and values; "
            "a converted layer keeps its recurrent state in place of a plain key/value slot, so this family "
            "decodes only from a fresh cache (a whole forward works; token-by-token generation does not yet)"
        )
    # else: a forward over a fresh cache; keys and values it stores are not read back


def _seq_length(layer) -> int:
    try:
        return layer.get_seq_length()
    except Exception:  # a layer not yet initialised
        return 0


def after_call(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    s = slot(module)
    if s is not None:
        s.rope, s.entry = None, None


def original_function(module: nn.Module, name: str) -> Callable:
    """The attention function ``name`` means for this module (``eager``: the family's own)."""
    if name == "eager":
        fn = _family_function(module, "eager_attention_forward")
        if fn is None:
            raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its modeling file")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def project(
    module: nn.Module, mixer: nn.Module, q: Tensor, k: Tensor, v: Tensor, scaling: Optional[float],
    rope: Optional[tuple[Tensor, Tensor]], check: bool = False,
) -> Projected:  # fmt: skip
    """The mixer's inputs from the family's own (rotated) q, k, v; with ``check``, first make
    sure that rotating the pre-rotary q, k again gives the family's own."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    apply_rotary = _family_function(module, "apply_rotary_pos_emb")
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


_last_validity: list = [None]  # (weakref to mask, offset, length, result): one per forward, shared by its layers


def key_validity(mask, offset: int, length: int) -> Optional[Tensor]:
    """(B, length) True where the call's keys at positions offset .. offset+length-1 are real
    tokens, read from the mask the family built for this call; None when all of them are.

    The mask is the original implementation's: None (causal, nothing padded), (B, KV) padding
    (flash), or (B, 1, Q, KV) boolean (keep) or additive float (0 keeps). A key masked from its
    own query is padding: causal, sliding and chunked masks all let a token see itself.
    """
    if mask is None:
        return None
    memo = _last_validity[0]
    if memo is not None and memo[0]() is mask and memo[1:3] == (offset, length):
        return memo[3]
    if not isinstance(mask, Tensor) or mask.dim() not in (2, 4):
        raise NotImplementedError(
            f"a converted layer reads padding from a 2-D or 4-D tensor mask, got {type(mask).__name__}"
            f"{'' if not isinstance(mask, Tensor) else ' of shape ' + str(tuple(mask.shape))}; "
            "load the model with attn_implementation='sdpa' or 'eager'"
        )
    width = mask.shape[-1]
    if width < offset + length:
        if offset == 0:
            raise ValueError(f"the attention mask covers {width} keys, fewer than this call's {length}")
        raise NotImplementedError(
            f"the attention mask covers {width} positions, but this layer's state has seen {offset} and the "
            f"call adds {length}: the family builds its mask over the keys its cache returns, or runs the "
            "layer more than once per forward, so it decodes only with use_cache=False"
        )
    cols = torch.arange(offset, offset + length, device=mask.device)
    if mask.dim() == 2:
        keep = mask[:, cols]
    elif mask.shape[2] == length:  # each query's own key
        keep = mask[:, 0, torch.arange(length, device=mask.device), cols]
    else:  # one row for every query: a padding mask
        keep = mask[:, 0, -1, cols]
    keep = keep.bool() if mask.dim() == 2 or mask.dtype == torch.bool else keep > torch.finfo(mask.dtype).min / 2
    result = None if bool(keep.all()) else keep
    _last_validity[0] = (weakref.ref(mask), offset, length, result)
    return result


def _rows_of(x, b: int, idx: Tensor, length: int):
    """Row b of a (B, T, ...) rotary table at positions idx, or None when it is laid out otherwise."""
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[1] != length:
        return None
    return x[b : b + 1 if x.shape[0] > 1 else 1][:, idx]


def by_row(module: nn.Module, s: Linearized, p: Projected, scaling: Optional[float], entry: Optional[RecurrentState]) -> Tensor:
    """The mixer on each row's real tokens alone (a padded batch, or rows whose decoding states
    differ in size): exactly what each sequence gives unpadded. Outputs at padding are 0; a
    row's state continues from its own and holds no pad."""
    b, _, t, _ = p.q.shape
    valid = p.valid if p.valid is not None else p.q.new_ones(b, t, dtype=torch.bool)
    states = None if entry is None else row_states(entry.state, b)
    outs, after = [], []
    for row in range(b):
        idx = valid[row].nonzero()[:, 0]
        if idx.numel() == 0:
            raise ValueError(f"row {row} of the batch is all padding: nothing for layer {s.layer_idx} to attend")
        q, k, v = (x[row : row + 1][:, :, idx] for x in (p.q, p.k, p.v))
        rope = None
        if s.rope is not None:
            rope = tuple(_rows_of(x, row, idx, t) for x in s.rope)
            if any(x is None for x in rope):
                if getattr(s.mixer, "pre_rotary", False):
                    raise NotImplementedError(
                        f"{type(module).__name__}'s rotary tables are not laid out (batch, time, ...), so "
                        f"{type(s.mixer).__name__} cannot read a padded batch row by row; call it one sequence at a time"
                    )
                rope = None  # read only by maps that act before rotary
        pr = project(module, s.mixer, q, k, v, scaling, rope)
        if states is None:
            y = s.mixer(pr)
        else:
            y, state = s.mixer.extend(pr, states[row])
            after.append(state)
        outs.append(y.new_zeros(1, y.shape[1], t, y.shape[3]).index_copy(2, idx, y))
    if entry is not None:
        entry.advance(join_states(after), t)
    return torch.cat(outs, 0)


def row_states(state, batch: int) -> list:
    """Each row's state: a batched NamedTuple split, or the per-row list it already is."""
    if isinstance(state, list):
        return state
    if state is None:
        return [None] * batch
    return [type(state)(*(None if x is None else x[r : r + 1] for x in state)) for r in range(batch)]


def join_states(states: list):
    """One batched state when every row's has the same shapes, else the list of rows' states
    (rows of a left-padded batch whose window caches are not yet full)."""
    shapes = {tuple(None if x is None else tuple(x.shape) for x in st) for st in states}
    if len(shapes) > 1:
        return list(states)
    first = states[0]
    return type(first)(*(None if x is None else torch.cat([st[i] for st in states], 0) for i, x in enumerate(first)))


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
