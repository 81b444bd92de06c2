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

import torch
from torch import nn
from transformers import PreTrainedModel

from linearize.attention import build_mixer
from linearize.attention.hooks import after_call, attention_layers, before_call, unhook
from linearize.attention.layer import PREFIX, Linearized, register
from linearize.config import AttentionConfig
from linearize.log import get_logger
from linearize.models.probe import check_convertible, local_window
from linearize.models.trainable import new_parameters, set_trainable

log = get_logger(__name__)


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
        unhook(module)


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
    for f, window in plan:
        module = f.module
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1_000_003 + module.layer_idx)
            mixer = build_mixer(cfg, f.n_heads, f.n_kv_heads, f.head_dim)
        ref = next(module.parameters())
        module.mixer = mixer.to(device=ref.device, dtype=ref.dtype)
        module.__dict__["_linearized"] = Linearized(module, sliding_window=window)
        module.register_forward_pre_hook(before_call, with_kwargs=True)
        module.register_forward_hook(after_call, with_kwargs=True)
        report.swapped.append(module.layer_idx)
    set_trainable(model, "new")
    new = new_parameters(model)
    report.new_parameters, report.trainable = sum(p.numel() for p in new.values()), list(new)
    model.set_attn_implementation(register(original))
    log.info("%s (%s, attention function %s)", report.summary(), c.model_type, c._attn_implementation)
    return report
