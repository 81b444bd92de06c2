"""Convert a model's softmax attention in place, for every family that routes it through
transformers' ``AttentionInterface``.

Nothing is replaced in the module tree: each converted layer's attention module gains its mixer
(the child ``mixer``, the only new parameters) and a :class:`~linearize.attention.layer.Linearized`
slot, and the model's attention implementation becomes ``linearize_<original>``
(:mod:`linearize.attention.layer`). The family's own projections, norms, rotary and cache
handling run as they always did, so no weight is copied and the teacher stays recoverable
(``mode``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from linearize.attention import build_mixer
from linearize.attention.layer import (
    PREFIX, Linearized, after_call, before_call, original_function, register, register_as, slot,
)
from linearize.config import AttentionConfig
from linearize.log import get_logger

log = get_logger(__name__)

LOCAL_LAYER_TYPES = ("sliding_attention", "chunked_attention")


@dataclass
class SwapReport:
    swapped: list[int] = field(default_factory=list)
    softmax: list[int] = field(default_factory=list)  # kept by attention.softmax_layers
    local: list[int] = field(default_factory=list)  # already local, kept (attention.convert=global)
    new_parameters: int = 0
    trainable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        local = f", kept the teacher's local attention in {self.local}" if self.local else ""
        return (
            f"converted {len(self.swapped)} attention layers, kept softmax in "
            f"{self.softmax or 'none'}{local}; {self.new_parameters:,} new parameters "
            f"({len(self.trainable)} tensors) trainable"
        )


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


def attention_layers(model: nn.Module) -> list[Linearized]:
    """The converted layers of a model (or of a block of it), in layer order."""
    slots = (slot(m) for m in model.modules())
    return sorted((s for s in slots if s is not None), key=lambda s: s.layer_idx)


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


def set_mode(model: nn.Module, mode: str) -> None:
    """Route every converted layer through ``student``, ``teacher`` or ``transfer``."""
    for layer in attention_layers(model):
        layer.mode = mode


def _unhook(module: nn.Module) -> None:
    for hooks in (module._forward_pre_hooks, module._forward_hooks):
        for key in [k for k, fn in hooks.items() if fn in (before_call, after_call)]:
            del hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_with_kwargs.pop(key, None)


def restore_softmax(model: nn.Module, layer_indices: list[int]) -> None:
    """Give the listed (converted) layers back their teacher attention: no mixer, no slot."""
    by_index = {layer.layer_idx: layer for layer in attention_layers(model)}
    missing = [i for i in layer_indices if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} are not converted; converted: {sorted(by_index)}")
    for i in layer_indices:
        module = by_index[i].module
        del module.mixer
        del module.__dict__["_linearized"]
        _unhook(module)


def swap_attention(model: PreTrainedModel, cfg: AttentionConfig, seed: int = 0) -> SwapReport:
    """Convert every attention layer except ``cfg.softmax_layers`` (and, with
    ``cfg.convert=global``, the teacher's local ones); freeze all but the new parameters.

    New parameters are initialised from ``seed`` (and the layer index) alone, so every process
    and every rerun builds the same student.

    Raises:
        ValueError: for a model that cannot convert, ``kind=softmax``, a layer index out of
            range, a model converted already, or nothing left to convert.
    """
    if cfg.kind == "softmax":
        raise ValueError(f"attention '{cfg.name}' is softmax: there is nothing to swap in")
    c = model.config
    original = c._attn_implementation
    if original.startswith(PREFIX) or attention_layers(model):
        raise ValueError("this model is converted already; load the teacher again to convert it another way")
    found = check_convertible(model)
    n_layers = c.num_hidden_layers
    bad = [i for i in cfg.softmax_layers if i >= n_layers]
    if bad:
        raise ValueError(
            f"attention.softmax_layers={cfg.softmax_layers}: {bad} out of range for "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    report = SwapReport(softmax=sorted(cfg.softmax_layers))
    plan = []
    for f in found:
        i = f.module.layer_idx
        window = local_window(f.module, c)
        if i in cfg.softmax_layers:
            continue
        if window is not None and cfg.convert == "global":
            report.local.append(i)
            continue
        plan.append((f, window))
    if not plan and report.local:
        raise ValueError(
            f"every attention layer of this {c.model_type!r} model is kept (local layers {report.local}, "
            f"attention.softmax_layers={cfg.softmax_layers}): nothing to convert; set attention.convert=all "
            "to convert the local layers too"
        )
    model.requires_grad_(False)
    for f, window in plan:
        name, module = f.name, f.module
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + module.layer_idx)
            mixer = build_mixer(cfg, f.n_heads, f.n_kv_heads, f.head_dim)
        ref = next(module.parameters())
        module.mixer = mixer.to(device=ref.device, dtype=ref.dtype)
        module.__dict__["_linearized"] = Linearized(module, sliding_window=window)
        module.register_forward_pre_hook(before_call, with_kwargs=True)
        module.register_forward_hook(after_call, with_kwargs=True)
        report.swapped.append(module.layer_idx)
        for pname, p in mixer.named_parameters():
            p.requires_grad_(True)
            report.new_parameters += p.numel()
            report.trainable.append(f"{name}.mixer.{pname}")
    model.set_attn_implementation(register(original))
    log.info("%s (%s, attention function %s)", report.summary(), c.model_type, c._attn_implementation)
    return report
