"""Checkpoints of a training run: write, find the latest, check it is whole, restore.

Checkpoints hold only the trainable parameters (the deltas), the optimizer, the scheduler, RNG
states and the :class:`TrainState`; each is written into a temporary directory that is renamed
into place, and ``latest`` is switched last, so a crash mid-write leaves the previous checkpoint
as the latest. Under FSDP the checkpoint holds the gathered, unsharded tensors and optimizer
state, written by the main process in the same files as without FSDP (the optimizer state keyed
by parameter name instead of index).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from linearize.models.trainable import trainable_state
from linearize.rundir import (
    FINGERPRINT,
    RunDirError,
    check_safetensors,
    honour_umask,
    read_json,
    resume_differences,
    shown,
    write_dir_atomically,
)
from linearize.train.distributed import (
    full_state_options,
    inner_optimizer,
    is_sharded,
    load_trainable,
)


@dataclass
class TrainState:
    """Everything besides tensors that a bit-exact resume needs."""

    step: int = 0
    total_steps: int = 0
    best_val: float = math.inf
    best_step: int = -1
    evals_without_improvement: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


def _rng_state() -> dict:
    # NumPy's key array as a tensor, so that the file loads with torch.load(weights_only=True).
    name, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss)
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_file_atomic(tensors: dict[str, Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, tmp)
    honour_umask(tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, model, optimizer, scheduler, state: TrainState, *,
                    tensors: Optional[dict] = None, optimizer_state: Optional[dict] = None,
                    fingerprint: Optional[dict] = None) -> Path:  # fmt: skip
    """Write a checkpoint (one writer). ``tensors`` and ``optimizer_state``, when given, are what
    to write for the model and optimizer (gathered under FSDP); by default they are read here.
    ``fingerprint``: the settings the run trains with, kept in the checkpoint for resume checks."""
    name = f"step-{state.step:07d}"
    tensors = trainable_state(model) if tensors is None else tensors
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state

    def write(tmp: Path) -> None:
        save_file(tensors, tmp / "trainable.safetensors")
        torch.save(
            {"optimizer": optimizer_state, "scheduler": scheduler.state_dict(), "rng": _rng_state()},
            tmp / "training_state.pt",
        )
        (tmp / "train_state.json").write_text(json.dumps(asdict(state), indent=1))
        if fingerprint is not None:
            (tmp / FINGERPRINT).write_text(json.dumps(fingerprint, indent=1, default=str))

    ckpt_root = out_dir / "checkpoints"
    write_dir_atomically(ckpt_root / name, write)
    pointer = ckpt_root / ".latest.tmp"
    pointer.write_text(name)
    os.replace(pointer, ckpt_root / "latest")  # switched only once the checkpoint is whole
    # Older checkpoints, and half-written ones a killed process left behind (one writer: rank 0).
    for old in [*ckpt_root.glob("step-*"), *ckpt_root.glob(".step-*.tmp-*"), *ckpt_root.glob(".step-*.old")]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return ckpt_root / name


def check_fingerprint(ckpt: Path, fingerprint: dict) -> None:
    """The checkpoint at ``ckpt`` was made with ``fingerprint`` (a resume may change only how long
    training runs: ``LENGTH_KEYS``).

    Raises:
        RunDirError: naming each differing key with the checkpoint's and this run's value.
    """
    own = ckpt / FINGERPRINT
    recorded = read_json(own, "the checkpoint fingerprint", f"delete {ckpt.parent} to start over") if own.is_file() else None
    diff = resume_differences(recorded, fingerprint)
    if diff:
        raise RunDirError(
            f"run.resume=true, but checkpoint {ckpt} was made with other settings (checkpoint -> now): "
            f"{shown(diff)}. Resume with the checkpoint's settings, or delete {ckpt.parent.parent} "
            "(or use a new run.dir) to start over with these"
        )


def load_checkpoint(path: Path, model, optimizer, scheduler, accelerator=None) -> TrainState:
    """Restore a checkpoint; nothing in it is unpickled beyond tensors and plain containers.
    Under FSDP (``accelerator`` given, model prepared) every process restores its shards."""
    name = path / "trainable.safetensors"
    try:
        tensors = load_file(name)
        name = path / "training_state.pt"
        extra = torch.load(name, weights_only=True)
        name = path / "train_state.json"
        state = TrainState(**json.loads(name.read_text()))
    except Exception as err:  # safetensors, torch and json each fail in their own way
        raise ValueError(
            f"checkpoint file {str(name)!r} is damaged ({type(err).__name__}: {err}); restore it, or "
            f"delete {path.parent} (or set run.resume=false) to start over"
        ) from err
    load_trainable(model, tensors, accelerator)
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(model, inner_optimizer(optimizer), extra["optimizer"], options=full_state_options())
    else:
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return state


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The checkpoint ``out_dir/checkpoints/latest`` names; ``None`` when there is none yet.

    Raises:
        FileNotFoundError: when ``latest`` names a checkpoint that is not there (never start over
            silently).
    """
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} points to {str(path)!r}, which is missing or incomplete; {_start_over(pointer.parent)}"
        )
    return path


def checked_step(path: Path) -> int:
    """The step of the checkpoint at ``path`` once every file of it is whole: the train state
    parses, each safetensors file ends where its header says, each ``.pt`` archive's CRCs check
    (nothing is unpickled).

    Raises:
        ValueError: naming the damaged checkpoint and file, and the way out.
    """
    try:
        step = json.loads((path / "train_state.json").read_text())["step"]
        for weights in sorted(path.glob("*.safetensors")):
            check_safetensors(weights)
        for archive in sorted(path.glob("*.pt")):
            with zipfile.ZipFile(archive) as z:
                if z.testzip() is not None:
                    raise ValueError(f"{str(archive)!r} fails its checksum")
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as err:
        raise ValueError(f"the latest checkpoint {str(path)!r} is damaged: {err}; {_start_over(path.parent)}") from None
    return step


def check_latest(out_dir: Path) -> Optional[int]:
    """The step of ``out_dir``'s latest checkpoint, checked whole (:func:`checked_step`); ``None``
    when there is none yet. Raises as :func:`latest_checkpoint` and :func:`checked_step` do."""
    path = latest_checkpoint(out_dir)
    return None if path is None else checked_step(path)


def checkpoint_roots(work: Path) -> list[Path]:
    """The training output dirs of a stage's work dir, each with its own ``checkpoints``: the
    stage's own, and blockwise transfer's per block."""
    return [work, *sorted(p.parent for p in (work / "blocks").glob("*/checkpoints"))]


def _start_over(root: Path) -> str:
    return (f"restore it, or delete {root} (or set run.resume=false) to start this stage over; "
            "run.resume=true never starts over silently")  # fmt: skip

