"""Find a model's attention modules by asking the model itself: two tokens run through it with a
recording attention function in place of its own, so nothing about a family is assumed. Its own
code reports which modules call attention, their head counts and whether they are causal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from linearize.attention.hooks import attention_layers, set_mode
from linearize.attention.layer import original_function, register_as

LOCAL_LAYER_TYPES = ("sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class Found:
    """An attention module as the model itself called it, with its q, k, v shapes."""

    name: str
    module: nn.Module
    n_heads: int
    n_kv_heads: int
    head_dim: int  # of queries and keys (values may differ: multi-head latent attention)
    causal: bool


def find_attention(model: nn.Module) -> list[Found]:
    """Every module that calls the attention function by name, found by running two tokens
    through the model with a recording function in its place (so nothing about a family is
    assumed: its own code reports its attention modules and their head counts)."""
    config = model.config
    original = config._attn_implementation
    seen: dict[int, tuple] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        seen.setdefault(id(module), (query.shape, key.shape, getattr(module, "is_causal", True)))
        return original_function(module, original)(module, query, key, value, attention_mask, **kwargs)

    register_as("linearize_probe", record, original)
    device = next(model.parameters()).device
    config._attn_implementation_internal = "linearize_probe"
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[0, 1]], device=device), use_cache=False)
    except Exception as err:
        raise ValueError(
            f"running two tokens through this {config.model_type!r} model to find its attention modules "
            f"failed ({type(err).__name__}: {err}); linearize converts decoder-only causal LMs that take input_ids"
        ) from err
    finally:
        config._attn_implementation_internal = original
    found = []
    for name, m in model.named_modules():
        if id(m) in seen:
            q, k, causal = seen[id(m)]
            if q[-1] != k[-1]:
                raise ValueError(f"{name}: queries of width {q[-1]} but keys of width {k[-1]}")
            if q[2] != k[2]:
                raise ValueError(
                    f"{name} attends over {k[2]} keys for {q[2]} tokens (keys of its own beside the sequence's); "
                    "linearize converts attention over the sequence's own keys only"
                )
            found.append(Found(name, m, q[1], k[1], q[-1], bool(causal)))
    return found


def check_convertible(model: nn.Module) -> list[Found]:
    """The attention modules to convert, or one error saying why this model cannot convert."""
    c = getattr(model, "config", None)
    kind = getattr(c, "model_type", type(model).__name__)
    if c is None or getattr(c, "is_encoder_decoder", False):
        raise ValueError(
            f"{kind!r} is an encoder-decoder model; linearize converts decoder-only causal LMs "
            "(a *ForCausalLM whose attention goes through transformers' AttentionInterface)"
        )
    found = find_attention(model)
    if not found:
        raise ValueError(
            f"no module of this {kind!r} model called transformers' AttentionInterface on two tokens (its "
            "modeling code computes attention itself, or it has no attention layers): nothing to convert; "
            "decoder-only *ForCausalLM families that route attention through the interface convert"
        )
    unnumbered = [f.name for f in found if not isinstance(getattr(f.module, "layer_idx", None), int)]
    if unnumbered:
        raise ValueError(f"attention modules {unnumbered[:3]} of this {kind!r} model carry no layer_idx; linearize needs one per layer")
    bidirectional = [f.module.layer_idx for f in found if not f.causal]
    if bidirectional:
        raise ValueError(
            f"this {kind!r} model attends both ways in layers {bidirectional} (an encoder, or a model "
            "configured as one); linearize converts causal attention only"
        )
    return found


def local_window(module: nn.Module, config) -> Optional[int]:
    """The teacher layer's own attention window when it is local (sliding), else None."""
    window = getattr(module, "sliding_window", None)
    if window:
        return window
    try:
        types = getattr(config, "layer_types", None)
    except Exception:  # configs whose layers each have their own (per-layer configs)
        types = None
    if types is not None and types[module.layer_idx] in LOCAL_LAYER_TYPES:
        return getattr(config, "sliding_window", None) or getattr(config, "attention_chunk_size", None)
    return None


def layer_split(model: nn.Module) -> dict[str, list[int]]:
    """Which attention layers of a converted model are converted and which kept their own
    attention (``softmax``: kept by choice; the rest of the kept ones were already local)."""
    slots = attention_layers(model)
    modes = [s.mode for s in slots]
    set_mode(model, "teacher")  # the probe's forward must not reach a collector
    try:
        found = find_attention(model)
    finally:
        for s, mode in zip(slots, modes):
            s.mode = mode
    converted = [s.layer_idx for s in slots]
    return {"converted": converted, "kept": sorted(f.module.layer_idx for f in found if f.module.layer_idx not in converted)}
