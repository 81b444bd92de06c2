"""Which of the installed transformers' model families convert, found by code, not typed by hand.

A family converts when its causal LM is decoder-only and its attention modules call the attention
function by name (``AttentionInterface``): :mod:`linearize.attention.layer` then sees the family's
own q, k, v. :func:`static_problem` says why a family cannot, from its code and config alone (no
model is built: preflight uses it before loading anything); :func:`tiny_config` builds a small
random config of a family, for the per-family tests and ``scripts/families.py``.
"""

from __future__ import annotations

import importlib
import inspect
from functools import lru_cache
from typing import Any, Optional

import transformers
from transformers import CONFIG_MAPPING, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# Sizes a tiny config takes wherever the family's config has the field (aliases included).
TINY = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512, "max_position_embeddings": 512,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts": 4,
    "num_local_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1,
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 16,
    "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "sliding_window": 8, "rotary_dim": 8,
    "attn_layer_period": 2, "attn_layer_offset": 1, "attn_layer_indices": [1], "expert_layer_period": 2, "expert_layer_offset": 1,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
}  # fmt: skip


def causal_lm_class(model_type: str) -> type:
    return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])


@lru_cache(maxsize=None)
def _routes_through_interface(model_type: str) -> bool:
    source = inspect.getsource(importlib.import_module(causal_lm_class(model_type).__module__))
    return "ALL_ATTENTION_FUNCTIONS" in source


def static_problem(model_type: Optional[str], config: Optional[dict[str, Any]] = None) -> Optional[str]:
    """Why a ``model_type`` (with its ``config.json`` fields, or its defaults) cannot convert, or
    None when it may (the model built, :func:`linearize.models.probe.check_convertible` checks the rest)."""
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return f"{model_type!r} has no causal-LM class in this transformers ({transformers.__version__})"
    if not _routes_through_interface(model_type):
        return (
            f"{model_type!r} computes attention in its own modeling code, not through transformers' "
            "AttentionInterface, so linearize cannot take it over"
        )
    config = {**_default_config(model_type), **(config or {})}
    if config.get("is_encoder_decoder"):
        return f"{model_type!r} is an encoder-decoder model; linearize converts decoder-only causal LMs"
    if "text_config" in config:
        return f"{model_type!r} wraps a text model in a multimodal one; convert its text model on its own"
    return None


@lru_cache(maxsize=None)
def _default_config(model_type: str) -> dict[str, Any]:
    config = CONFIG_MAPPING[model_type]()
    fields = config.to_dict()
    fields["is_encoder_decoder"] = getattr(config, "is_encoder_decoder", False)
    try:
        composite = config.get_text_config() is not config
    except ValueError:  # several text sub-models (musicgen: text encoder and decoder)
        composite = True
    if composite:
        fields["text_config"] = True
    return fields


def interface_families() -> list[str]:
    """Every causal-LM model type of the installed transformers with no :func:`static_problem`."""
    return sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if static_problem(t) is None)


def tiny_config(model_type: str) -> PretrainedConfig:
    """A small random-weight config of the family (2-3 layers, hidden 64, 4 heads, 2 KV heads);
    a family whose layers come in kinds (sliding and full attention, attention and recurrent)
    gets one layer of each of its first kinds."""
    cls = CONFIG_MAPPING[model_type]
    defaults = cls()

    def has(name: str) -> bool:
        try:
            return hasattr(defaults, name)
        except Exception:  # a per-layer attribute that refuses a global read
            return False

    kwargs = {k: v for k, v in TINY.items() if has(k)}
    if has("qk_rope_head_dim"):  # multi-head latent attention: head_dim is the rotary part
        kwargs["head_dim"] = kwargs["qk_rope_head_dim"]
    settable = not isinstance(getattr(cls, "layer_types", None), property)
    kinds = list(dict.fromkeys((getattr(defaults, "layer_types", None) if has("layer_types") else None) or []))
    if len(kinds) > 1 and settable:
        kwargs["layer_types"] = kinds[:3]
        kwargs["num_hidden_layers"] = len(kwargs["layer_types"])
    return cls(**kwargs)


TINY_PARAMETERS = 20_000_000


def tiny_model(model_type: str, seed: int = 0):
    """The family's causal LM from :func:`tiny_config`, random weights, eval mode, fp32.

    Raises:
        ValueError: when the config stays large (sizes held in fields :data:`TINY` does not
            name), so that no test builds a full-size model by accident.
    """
    import torch

    config = tiny_config(model_type)
    cls = causal_lm_class(model_type)
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(config).parameters())
    if n > TINY_PARAMETERS:
        raise ValueError(f"the tiny {model_type!r} config still has {n:,} parameters: its sizes live in fields TINY does not name")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(config).float().eval()


def convert_check(model_type: str, attention) -> tuple[str, str]:
    """Whether ``attention`` (an ``AttentionConfig``) swaps into the family's tiny model:
    ``("converts", "")`` (swapped in, and the converted model runs), ``("refused", why)``
    (swap_attention's own error), ``("fails", why)`` (swapped in, but the converted model does not
    run) or ``("unbuilt", why)`` (the tiny config could not be made small, or its model does not run)."""
    import torch

    from linearize.models.swap import swap_attention

    try:
        model = tiny_model(model_type)
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)
    except Exception as err:
        return "unbuilt", f"{type(err).__name__}: {err}"
    try:
        swap_attention(model, attention)
    except ValueError as err:
        return "refused", str(err)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[3, 4, 5, 6]]), use_cache=False)  # the converted model runs
    except Exception as err:
        return "fails", f"{type(err).__name__}: {err}"
    return "converts", ""
