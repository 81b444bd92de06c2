"""Save and load a converted model as deltas over its teacher.

A converted directory holds:

- ``linearize.json``: the teacher (how to load it again: path or hub id, dtype, and for
  a local file its sha256 prefix), the attention config, the layers left as softmax, and the
  PEFT adapter config when there is one;
- ``attention.safetensors``: the new attention parameters (feature maps, window factors), by
  their names in the plain model;
- ``adapter.safetensors``: the adapter weights (peft's own state dict), when there is one;
- the tokenizer files;
- ``config.json`` + ``modeling_linearize.py``, so that transformers alone loads it with
  ``trust_remote_code=True`` (:mod:`linearize.models.remote`).

A directory written whole (``export.merge=true``, ``stage=uptrain`` with ``train.trainable``
other than ``new``) also holds the teacher-shaped weights (``model.safetensors``), which
replace the teacher's own when it is applied.

Every stage's output directory is such a directory, so the next stage (or a user) starts from
it with :func:`apply_converted` / :func:`load_converted`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import peft
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoTokenizer

from linearize.config import AdapterConfig, AttentionConfig, ModelConfig
from linearize.log import get_logger
from linearize.models.attach import attach
from linearize.models.load import file_sha256, load_teacher, load_tokenizer, resolve_source
from linearize.models.probe import layer_split
from linearize.models.remote import write_remote_code
from linearize.models.trainable import new_parameters
from linearize.rundir import MANIFEST, read_manifest, write_manifest

__all__ = ["MANIFEST", "apply_converted", "build_adapter", "load_converted", "read_manifest", "save_converted", "save_full"]

log = get_logger(__name__)


def base_model(model: nn.Module) -> nn.Module:
    """The plain transformers model under a peft wrapper (or the model itself)."""
    return model.get_base_model() if isinstance(model, peft.PeftModel) else model


def teacher_record(cfg: ModelConfig) -> dict[str, Any]:
    record = asdict(cfg)
    if cfg.path:
        source = resolve_source(cfg.path)
        if source.kind != "hub":
            path = Path(source.location)
            record["sha256_16"] = file_sha256(path) if path.is_file() else None
    return record


def peft_config(cfg: AdapterConfig):
    """The peft config the adapter settings describe (built, so peft checks every option).

    Raises:
        ValueError: naming the peft class, the options and what peft said.
    """
    config_class = getattr(peft, cfg.peft_config, None)
    if config_class is None or not isinstance(config_class, type):
        raise ValueError(f"adapter.peft_config={cfg.peft_config!r} is not a config class of peft {peft.__version__}")
    try:
        return config_class(task_type="CAUSAL_LM", target_modules=list(cfg.target_modules), **cfg.options)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"adapter={cfg.name}: peft's {cfg.peft_config} rejects adapter.options={dict(cfg.options)} "
            f"({type(err).__name__}: {err}); fix or drop the option (adapter.options.<key>=...)"
        ) from None


def build_adapter(model: nn.Module, cfg: AdapterConfig, seed: int = 0) -> peft.PeftModel:
    """Wrap ``model`` with the configured peft method; only adapter weights stay trainable.

    The adapter's random initialisation depends on ``seed`` alone (reruns and every process
    build the same one).
    """
    config = peft_config(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def save_converted(
    model: nn.Module, out_dir: Path, *, teacher: ModelConfig, attention: AttentionConfig,
    softmax_layers: list[int], adapter: Optional[AdapterConfig] = None, tokenizer=None,
    seed: int = 0, extra: Optional[dict] = None, fingerprint: Optional[dict] = None,
    home: Optional[Path] = None,
) -> Path:  # fmt: skip
    """Write the deltas of ``model`` (a swapped teacher, maybe peft-wrapped) to ``out_dir``, the
    manifest last (it lists every file of ``out_dir``, so write any other outputs first).
    ``fingerprint``: the settings the stage ran with (see :mod:`linearize.fingerprint`).
    ``home``: for a directory written whole, where it is published: the manifest names it as
    the teacher (and ``teacher_origin`` the teacher it came from)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plain = base_model(model)
    new = {n: p.detach().cpu().contiguous() for n, p in new_parameters(plain).items()}
    save_file(new, out_dir / "attention.safetensors")
    if adapter is not None:
        state = peft.get_peft_model_state_dict(model)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, out_dir / "adapter.safetensors")
    manifest = {
        "format": 1,
        "teacher": teacher_record(teacher) if home is None else
        {**asdict(teacher), "path": str(Path(home).resolve()), "init": "pretrained", "tokenizer": None},
        **({"teacher_origin": asdict(teacher)} if home is not None else {}),
        "teacher_seed": seed,  # what random-init teachers (tests) were built from
        "attention": asdict(replace(attention, softmax_layers=sorted(softmax_layers))),
        "layers": layer_split(plain),  # converted, and kept as the teacher's own attention
        "adapter": asdict(adapter) if adapter is not None else None,
        **(extra or {}),
    }
    write_remote_code(out_dir, plain.config.to_dict())
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    write_manifest(out_dir, manifest, fingerprint or {})
    return out_dir


def save_full(model, out_dir: Path, *, home: Path, teacher: ModelConfig, attention: AttentionConfig, tokenizer,
              seed: int, extra: dict, fingerprint: dict) -> None:  # fmt: skip
    """Write ``model`` (a swapped teacher, no adapter) whole into ``out_dir``: ``model.safetensors``
    holds every weight but the new attention parameters, and the manifest names ``home`` (where
    ``out_dir`` is published) as the teacher, so the directory loads without the original
    teacher; ``teacher_origin`` records that one."""
    new = new_parameters(model)
    weights = {n: p for n, p in model.state_dict().items() if n not in new}
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=weights)
    save_converted(model, out_dir, teacher=teacher, attention=attention, softmax_layers=attention.softmax_layers,
                   tokenizer=tokenizer, seed=seed, extra=extra, fingerprint=fingerprint, home=home)  # fmt: skip


def full_weight_files(path: Path) -> list[Path]:
    """The teacher-shaped weight files of a directory written whole (merged export, uptrain)."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    return [single] if single.is_file() else []


def load_full_weights(teacher: nn.Module, path: Path) -> None:
    """Replace the teacher's weights by a whole-model directory's own (none: do nothing).

    Raises:
        ValueError: when the files do not fit the teacher (other shapes or names).
    """
    files = full_weight_files(path)
    if not files:
        return
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    try:
        missing, unexpected = teacher.load_state_dict(state, strict=False)
    except RuntimeError as err:
        raise ValueError(f"the weights in {path} do not fit this teacher: {err}") from None
    # Tied weights (an LM head sharing the embedding) are stored once and count as present.
    own = {n for n, _ in teacher.named_parameters()} | {n for n, _ in teacher.named_buffers()}
    missing = [n for n in missing if n in own and n not in state]
    if missing or unexpected:
        raise ValueError(f"the weights in {path} do not fit this teacher: missing {missing[:3]}, unknown {unexpected[:3]}")


def apply_converted(teacher: nn.Module, path: Path, *, with_adapter: bool = True, seed: int = 0) -> nn.Module:
    """Turn a loaded teacher into the converted model saved at ``path`` (:func:`attach`, after
    the directory's own whole weights, if it holds them, replace the teacher's).

    Returns:
        The model: the swapped teacher, peft-wrapped when the directory holds an adapter and
        ``with_adapter``; in ``student`` mode and eval mode.
    """
    path = Path(path)
    manifest = read_manifest(path)
    load_full_weights(teacher, path)
    return attach(teacher, path, manifest, with_adapter=with_adapter, seed=seed)


def load_converted(path: str | Path, *, device: str | torch.device = "cpu", cache_dir: Optional[str] = None):
    """Load a converted model directory: ``(model, tokenizer)``, ready for forward/generate.

    The teacher is loaded from where the directory's manifest says it came from.
    """
    manifest = read_manifest(Path(path))
    cfg = ModelConfig.from_record(manifest["teacher"])
    cache = cache_dir or "~/.cache/linearize"
    teacher = load_teacher(cfg, cache_dir=cache, device=torch.device(device), seed=manifest["teacher_seed"])
    model = apply_converted(teacher, Path(path))
    tokenizer_config = Path(path) / "tokenizer_config.json"
    if tokenizer_config.is_file():
        if "auto_map" in json.loads(tokenizer_config.read_text()):
            raise ValueError(
                f"{str(tokenizer_config)!r} names a tokenizer class of its own (auto_map): loading it would "
                "run code from the directory; linearize writes no such tokenizer. Replace the tokenizer "
                "files with the teacher's (stage=export writes them)"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    else:
        tokenizer = load_tokenizer(cfg, cache)
    return model, tokenizer
