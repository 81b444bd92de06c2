"""A converted attention module's slot, and its forward hooks: before each call, keep its position
embeddings and, in ``student`` mode, put the layer's recurrent state into the cache slot the
module is about to write keys and values to; after it, let go of both."""

from __future__ import annotations

from typing import Optional

from torch import nn
from transformers.cache_utils import (
    DynamicLayer,
    DynamicSlidingWindowLayer,
    StaticLayer,
    StaticSlidingWindowLayer,
)

from linearize.attention.cache import RecurrentState, recurrent_entry

# Cache layers that hold keys and values only: a converted layer's recurrent state takes their place.
PLAIN_CACHE_LAYERS = (DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer, RecurrentState)


# "Linearized" lives in linearize.attention.layer, which imports this module.
def slot(module: nn.Module) -> Optional["Linearized"]:  # noqa: F821
    return module.__dict__.get("_linearized")


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


def attention_layers(model: nn.Module) -> list["Linearized"]:  # noqa: F821
    """The converted layers of a model (or of a block of it), in layer order."""
    slots = (slot(m) for m in model.modules())
    return sorted((s for s in slots if s is not None), key=lambda s: s.layer_idx)


def set_mode(model: nn.Module, mode: str) -> None:
    """Route every converted layer through ``student``, ``teacher`` or ``transfer``."""
    for layer in attention_layers(model):
        layer.mode = mode


def unhook(module: nn.Module) -> None:
    """Take :func:`before_call` and :func:`after_call` off a module."""
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (before_call, after_call)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)
