"""Find a model's softmax attention modules by a per-family table and replace them.

The peft way: find targets by class, build the new module from the old one, ``setattr`` it on
the parent, then mark only the new parameters trainable. The new layer holds the teacher's own
projection modules, so no weight is copied and the teacher stays recoverable (``mode``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
from transformers import PreTrainedModel

from linearize.attention import AttentionLayer, build_mixer
from linearize.config import FAMILIES, AttentionConfig
from linearize.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Family:
    """How to recognise and rebuild one model family's attention."""

    modeling: str  # module holding the attention class and its rotary function
    attention_class: str
    sliding_window: Callable[[nn.Module], Optional[int]] = lambda module: None


FAMILY_TABLE: dict[str, Family] = {
    "llama": Family("transformers.models.llama.modeling_llama", "LlamaAttention"),
    "mistral": Family(
        "transformers.models.mistral.modeling_mistral", "MistralAttention",
        lambda m: getattr(m.config, "sliding_window", None),
    ),  # fmt: skip
    "qwen2": Family(
        "transformers.models.qwen2.modeling_qwen2", "Qwen2Attention",
        lambda m: getattr(m, "sliding_window", None),
    ),  # fmt: skip
}
assert set(FAMILY_TABLE) == set(FAMILIES), "config.FAMILIES must list the families swap supports"


@dataclass
class SwapReport:
    swapped: list[int] = field(default_factory=list)
    softmax: list[int] = field(default_factory=list)
    new_parameters: int = 0
    trainable: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"swapped {len(self.swapped)} attention layers, kept softmax in "
            f"{self.softmax or 'none'}; {self.new_parameters:,} new parameters "
            f"({len(self.trainable)} tensors) trainable"
        )


def family_of(model: PreTrainedModel) -> Family:
    model_type = model.config.model_type
    if model_type not in FAMILY_TABLE:
        raise ValueError(
            f"model type {model_type!r} has no attention swap; supported families: "
            f"{', '.join(FAMILY_TABLE)} (add a row to FAMILY_TABLE in linearize/models/swap.py "
            "for a family with the same q/k/v/o + rotary layout)"
        )
    return FAMILY_TABLE[model_type]


def attention_layers(model: nn.Module) -> list[AttentionLayer]:
    """The swapped layers of a model, in layer order."""
    return sorted(
        (m for m in model.modules() if isinstance(m, AttentionLayer)), key=lambda m: m.layer_idx
    )


def set_mode(model: nn.Module, mode: str) -> None:
    """Route every swapped layer through ``student``, ``teacher`` or ``transfer``."""
    for layer in attention_layers(model):
        layer.mode = mode


def restore_softmax(model: nn.Module, layer_indices: list[int]) -> None:
    """Put the teacher's own attention module back in the listed (swapped) layers."""
    by_index = {layer.layer_idx: layer for layer in attention_layers(model)}
    missing = [i for i in layer_indices if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} are not swapped; swapped: {sorted(by_index)}")
    for name, module in list(model.named_modules()):
        if isinstance(module, AttentionLayer) and module.layer_idx in layer_indices:
            parent_name, _, child = name.rpartition(".")
            module.mixer.requires_grad_(False)
            setattr(model.get_submodule(parent_name), child, module.teacher)


def swap_attention(model: PreTrainedModel, cfg: AttentionConfig, seed: int = 0) -> SwapReport:
    """Replace every softmax attention except ``cfg.softmax_layers``; freeze all but the new.

    New parameters are initialised from ``seed`` (and the layer index) alone, so every process
    and every rerun builds the same student.

    Raises:
        ValueError: for an unsupported family, ``kind=softmax``, or a layer index out of range.
    """
    if cfg.kind == "softmax":
        raise ValueError(f"attention '{cfg.name}' is softmax: there is nothing to swap in")
    family = family_of(model)
    modeling = importlib.import_module(family.modeling)
    attn_class = getattr(modeling, family.attention_class)
    c = model.config
    n_layers = c.num_hidden_layers
    bad = [i for i in cfg.softmax_layers if i >= n_layers]
    if bad:
        raise ValueError(
            f"attention.softmax_layers={cfg.softmax_layers}: {bad} out of range for "
            f"{n_layers} layers (0..{n_layers - 1})"
        )
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, attn_class)]
    if not targets:
        raise ValueError(f"no {family.attention_class} modules found in this {c.model_type} model")

    model.requires_grad_(False)
    report = SwapReport(softmax=sorted(cfg.softmax_layers))
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    for name, old in targets:
        if old.layer_idx in cfg.softmax_layers:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + old.layer_idx)
            mixer = build_mixer(cfg, c.num_attention_heads, c.num_key_value_heads, head_dim)
        ref = next(old.parameters())
        mixer.to(device=ref.device, dtype=ref.dtype)
        new = AttentionLayer(
            old, mixer, modeling.apply_rotary_pos_emb, n_heads=c.num_attention_heads,
            n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
            sliding_window=family.sliding_window(old),
        )  # fmt: skip
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
        report.swapped.append(old.layer_idx)
        for pname, p in mixer.named_parameters():
            p.requires_grad_(True)
            report.new_parameters += p.numel()
            report.trainable.append(f"{name}.mixer.{pname}")
    log.info("%s", report.summary())
    return report
