"""Which weights are new and which train (the one place either is decided), and the trained ones'
values.

The new parameters are found by structure (each converted attention module's ``mixer`` child),
never by name: a family may have modules of its own called ``mixer`` (Mamba hybrids do).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from linearize.attention.hooks import attention_layers, slot
from linearize.config import TRAINABLE

TRAINABLE_SETS = (*TRAINABLE, "adapter", "adapter+new")  # train.trainable's, and stage 2's


def new_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The converted layers' new attention parameters, named as in ``model`` (peft-wrapped or
    not), in layer order."""
    return {
        f"{name}.mixer.{p_name}": p
        for name, module in model.named_modules()
        if slot(module) is not None
        for p_name, p in module.mixer.named_parameters()
    }


def set_trainable(model: nn.Module, which: str) -> None:
    """Make exactly ``which`` require grad.

    ``new``: the new attention parameters; ``attention``: the converted layers' whole attention
    modules (the family's projections and q/k norms too); ``all``: every weight; ``adapter``:
    a peft model's adapter weights (those peft marked trainable when it built the model) and
    nothing else; ``adapter+new``: those and the new attention parameters.
    """
    if which not in TRAINABLE_SETS:
        raise ValueError(f"trainable set {which!r} is not one of {', '.join(TRAINABLE_SETS)}")
    if which.startswith("adapter"):
        if not hasattr(model, "disable_adapter"):  # a peft model (peft is not imported: remote code bundles this file)
            raise ValueError(f"trainable set {which!r} needs a peft model; build the adapter first")
        for p in new_parameters(model).values():
            p.requires_grad_(which == "adapter+new")
        return
    model.requires_grad_(which == "all")
    for layer in attention_layers(model):
        (layer.module if which == "attention" else layer.mixer).requires_grad_(True)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The deltas: parameters that require grad, by name."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
    with torch.no_grad():
        for n, t in tensors.items():
            params[n].copy_(t)
