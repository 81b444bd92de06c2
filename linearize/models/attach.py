"""The one loader of a converted directory's parts onto a loaded teacher: the attention swapped
in, the new parameters loaded (refused unless they fit exactly), the adapter applied. Both
:func:`linearize.models.convert.apply_converted` and the generated ``modeling_linearize.py``
(transformers alone, :mod:`linearize.models.remote`, which bundles this file) call it."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file
from torch import nn

from linearize.attention.hooks import set_mode
from linearize.config import AttentionConfig
from linearize.models.swap import swap_attention
from linearize.models.trainable import new_parameters


def attach(teacher: nn.Module, path, manifest: dict, *, with_adapter: bool = True, seed: int = 0) -> nn.Module:
    """``teacher`` (its weights already the directory's, when it holds them whole) turned into
    the converted model at ``path``: swapped, new parameters loaded, in ``student`` and eval mode,
    peft-wrapped when the directory holds an adapter and ``with_adapter``."""
    swap_attention(teacher, AttentionConfig(**manifest["attention"]), seed=seed)
    new = load_file(os.path.join(path, "attention.safetensors"))
    params = new_parameters(teacher)
    if set(new) != set(params):
        raise ValueError(
            f"{path}/attention.safetensors does not fit this model: "
            f"missing {sorted(set(params) - set(new))[:3]}, unknown {sorted(set(new) - set(params))[:3]}"
        )
    with torch.no_grad():
        for name, tensor in new.items():
            params[name].copy_(tensor)
    set_mode(teacher, "student")
    model = teacher
    if manifest["adapter"] is not None and with_adapter:
        model = with_saved_adapter(teacher, manifest["adapter"], path)
    return model.eval()


def with_saved_adapter(model: nn.Module, record: dict, path) -> nn.Module:
    """``model`` wrapped with the peft adapter ``record`` (a manifest's ``adapter``) describes,
    its weights read from ``path/adapter.safetensors``."""
    try:  # peft is needed only for directories that hold an adapter
        import peft
    except ImportError as err:
        raise ImportError("this directory holds a peft adapter: pip install peft, or export with export.merge=true") from err
    config = getattr(peft, record["peft_config"])(
        task_type="CAUSAL_LM", target_modules=list(record["target_modules"]), **record["options"]
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the adapter's initial values are replaced by the saved ones
        model = peft.get_peft_model(model, config)
    result = peft.set_peft_model_state_dict(model, load_file(os.path.join(path, "adapter.safetensors")))
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{path}/adapter.safetensors has unexpected keys {result.unexpected_keys[:3]}")
    return model
