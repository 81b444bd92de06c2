"""The one training loop, used by every training stage; stages differ only in their objective.

Reads top to bottom: build the optimizer and schedule, restore a checkpoint if resuming, then
per optimizer step accumulate ``grad_accum`` micro-batches, clip, step, log; every
``eval_every`` steps validate, keep the best weights, step the plateau schedule, checkpoint.

Data order is a pure function of (seed, epoch): a seeded permutation of the packed rows, cut
into micro-batches of ``batch_size`` rows per process. A checkpoint therefore needs only the
step count to find its place in the data, and a resumed run sees exactly the batches the
uninterrupted one would have. Checkpoints hold only the trainable parameters (the deltas),
the optimizer, the scheduler, RNG states and the :class:`TrainState`; each is written into a
temporary directory that is renamed into place, and ``latest`` is switched last, so a crash
mid-write leaves the previous checkpoint as the latest.

Under FSDP (``accelerate launch`` with a ``distributed_type: FSDP`` config) ``prepare`` shards
the model in place: its parameters become DTensors holding each process's shard. Reading them
whole (best weights, checkpoints) is then a collective every process joins, and the checkpoint
holds the gathered, unsharded tensors and optimizer state, written by the main process in the
same files as without FSDP (the optimizer state keyed by parameter name instead of index).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from linearize.config import TrainConfig
from linearize.data import Split
from linearize.log import Tracker, get_logger
from linearize.rundir import FINGERPRINT, RunDirError, honour_umask, read_json, resume_differences, shown, write_dir_atomically

log = get_logger(__name__)


class Objective(Protocol):
    """What a stage trains for: a loss on a batch, and validation metrics over batches."""

    def loss(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        """Scalar loss (with a graph) and floats to log; ``inputs`` are token ids or, for a
        block trained from cached teacher states, hidden states."""
        ...

    def validate(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        """Metrics over validation batches; must hold ``val_loss`` (lower is better)."""
        ...


def backpropagates_itself(objective: Objective) -> bool:
    """Whether ``objective`` runs its backward inside the forward, in pieces.

    Such an objective has ``loss_and_backward(model, inputs, labels, backward)``: it calls
    ``backward`` on parts of the loss as soon as each is known (stage 1: one per layer, so one
    layer's graph is held at a time) and returns the detached total. The model is then not
    wrapped in DDP, whose reducer expects exactly one backward per forward; the loop averages
    the gradients over processes itself before each optimizer step.
    """
    return callable(getattr(objective, "loss_and_backward", None))


def broadcast_parameters(params: list[Tensor], accelerator: Accelerator) -> None:
    """Start every process from rank 0's values (what DDP does when it wraps a model)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))


def average_gradients(params: list[Tensor], accelerator: Accelerator) -> None:
    """Mean of each gradient over processes, in one flat all-reduce (what DDP does)."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), "mean")
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).to(p.dtype)


def is_sharded(accelerator) -> bool:
    """Whether ``accelerator.prepare`` shards the model (FSDP)."""
    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def _full_options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def _optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper holds the torch one


def gathered_trainable(model: nn.Module, accelerator) -> dict[str, Tensor]:
    """:func:`trainable_state` on the main process, ``{}`` on the others. Under FSDP the shards
    are gathered: every process must call it."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full = get_model_state_dict(model, options=_full_options(cpu_offload=True))  # main only
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        return {n: full[n] for n in names} if accelerator.is_main_process else {}
    return trainable_state(model) if accelerator.is_main_process else {}


def gathered_optimizer_state(model: nn.Module, optimizer, accelerator) -> dict:
    """The optimizer's state dict (under FSDP gathered whole onto the main process, keyed by
    parameter name; every process must call it)."""
    if is_sharded(accelerator):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(model, _optimizer(optimizer), options=_full_options(cpu_offload=True))
    return optimizer.state_dict() if accelerator.is_main_process else {}


def load_trainable(model: nn.Module, tensors: dict[str, Tensor], accelerator) -> None:
    """:func:`load_trainable_state`; under FSDP each process keeps its shard of ``tensors``."""
    if not is_sharded(accelerator):
        load_trainable_state(model, tensors)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    unknown = [n for n in tensors if n not in params]
    if missing or unknown:
        raise ValueError(f"checkpoint does not fit the model: missing {missing[:3]}, unknown {unknown[:3]}")
    set_model_state_dict(model, tensors, options=_full_options(strict=False))


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


def micro_batch(split: Split, seed: int, index: int, rows: int, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """Micro-batch ``index`` of the endless epoch sequence: this rank's ``rows`` of it."""
    per_epoch = len(split) // (rows * world)
    epoch, pos = divmod(index, per_epoch)
    order = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    start = (pos * world + rank) * rows
    idx = order[start : start + rows]
    return split.input_ids[idx], split.labels[idx]


def validation_batches(split: Split, cfg: TrainConfig, seed: int, accelerator: Accelerator) -> list:
    """This process's share of the validation set: equal-size batches on every process."""
    world, rank = accelerator.num_processes, accelerator.process_index
    n = len(split) // (cfg.batch_size * world)
    if n < 1:
        raise ValueError(
            f"{len(split)} validation rows are fewer than one batch per process "
            f"({cfg.batch_size} x {world}); raise data.val_fraction"
        )
    n = min(n, cfg.eval_batches or n)
    return [micro_batch(split, seed, i, cfg.batch_size, rank, world) for i in range(n)]


def validate(objective: Objective, model: nn.Module, batches: list, accelerator: Accelerator, step: int) -> dict[str, float]:
    """The objective's validation metrics after ``step`` optimizer steps, averaged over processes."""
    model.eval()
    with torch.no_grad(), accelerator.autocast():  # mixed precision as in training
        try:
            val = objective.validate(model, batches)
        except FloatingPointError as err:  # an objective that names the layer
            raise FloatingPointError(f"validation after step {step}: {err}") from None
    # Every process scored a shard of equal size, so the mean of the means is the mean.
    device = accelerator.device
    return {k: accelerator.reduce(torch.tensor(v, device=device), "mean").item() for k, v in val.items()}


def plan_steps(cfg: TrainConfig, n_rows: int, world: int) -> int:
    """Optimizer steps: the epoch cap, then ``max_steps``. Raises when not even one fits."""
    rows_per_step = cfg.batch_size * cfg.grad_accum * world
    steps = int(cfg.epochs * n_rows) // rows_per_step
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    if steps < 1:
        raise ValueError(
            f"{n_rows} training rows give no optimizer step of {rows_per_step} rows "
            f"(train.batch_size x train.grad_accum x {world} processes); add data or lower them"
        )
    return steps


def make_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total: int):
    if cfg.scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience
        )
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, total) / total))
        )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)


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


def latest_checkpoint(out_dir: Path) -> Optional[Path]:
    """The checkpoint ``latest`` names; ``None`` when there is none yet.

    Raises:
        FileNotFoundError: when ``latest`` names a checkpoint that is not there (never start over
            silently).
    """
    pointer = out_dir / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = out_dir / "checkpoints" / pointer.read_text().strip()
    if not (path / "train_state.json").is_file():
        raise FileNotFoundError(
            f"{pointer} names {str(path)!r}, which is missing or incomplete; restore it, or delete "
            f"{pointer.parent} (or set run.resume=false) to start over"
        )
    return path


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

        set_optimizer_state_dict(model, _optimizer(optimizer), extra["optimizer"], options=_full_options())
    else:
        optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    _set_rng_state(extra["rng"])
    return state


def train(
    model: nn.Module, objective: Objective, train_split: Split, val_split: Split,
    cfg: TrainConfig, out_dir: Path, *, accelerator: Accelerator, seed: int, resume: bool,
    tracker: Optional[Tracker] = None, fingerprint: Optional[dict] = None,
) -> TrainState:  # fmt: skip
    """Train ``model``'s trainable parameters on ``objective``; checkpoints go to ``out_dir``.

    The best validation weights are written to ``out_dir/best.safetensors`` and loaded into
    ``model`` at the end. ``fingerprint`` (the settings that change the math) is stored in every
    checkpoint; a resume from a checkpoint with another one, or a fresh start over existing
    checkpoints, is refused.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: the model has no parameter that requires grad")
    out_dir.mkdir(parents=True, exist_ok=True)
    world, rank = accelerator.num_processes, accelerator.process_index
    total = plan_steps(cfg, len(train_split), world)
    state = TrainState(total_steps=total)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = make_scheduler(cfg, optimizer, total)
    in_pieces = backpropagates_itself(objective)
    sharded = is_sharded(accelerator)
    if in_pieces and sharded:
        raise ValueError(
            "stage 1 (transfer) backpropagates layer by layer and averages gradients itself; it does "
            "not run under FSDP. Launch it with configs/accelerate/ddp.yaml"
        )
    if in_pieces:
        wrapped, optimizer = model, accelerator.prepare(optimizer)
        broadcast_parameters(params, accelerator)
    else:
        wrapped, optimizer = accelerator.prepare(model, optimizer)
    if sharded:  # FSDP replaced the parameters (in place, same names) by sharded ones
        params = [p for p in model.parameters() if p.requires_grad]
        kinds = sorted({type(p).__name__ for p in params})
        log.info("FSDP: %s sharded over %d processes (parameters: %s)", type(wrapped).__name__, world, ", ".join(kinds))
    # Restored after prepare: under FSDP each process then loads only its shards.
    found = latest_checkpoint(out_dir)
    if found is not None and not resume:
        raise RunDirError(
            f"{out_dir} holds checkpoints of an earlier run (latest {found.name}); resume it with "
            f"run.resume=true, or delete {out_dir} to start over"
        )
    ckpt = found if resume else None
    if ckpt is not None and fingerprint is not None:
        check_fingerprint(ckpt, fingerprint)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer, scheduler, accelerator)
        state.total_steps = total  # this run's plan: a resume may extend train.max_steps
        log.info("resumed from %s at step %d of %d", ckpt, state.step, state.total_steps)
    elif resume:
        log.info("run.resume=true but %s holds no checkpoint; starting fresh", out_dir)
    if ckpt is None and accelerator.is_main_process:
        (out_dir / "best.safetensors").unlink(missing_ok=True)  # an earlier start's, never this run's
    val_batches = validation_batches(val_split, cfg, seed, accelerator)
    main = accelerator.is_main_process

    if state.step == 0 and not state.history:  # where training starts from, for the curves
        initial = validate(objective, wrapped, val_batches, accelerator, 0)
        state.history.append({"step": 0, **{f"val/{k}": v for k, v in initial.items()}})
        log.info("step 0: val_loss %.5g", initial["val_loss"])

    def backward(loss: Tensor) -> None:
        accelerator.backward(loss / cfg.grad_accum)

    bar = tqdm(total=state.total_steps, initial=state.step, desc="train", disable=not main)
    while state.step < state.total_steps and not state.stopped_early:
        wrapped.train()
        metrics: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            index = state.step * cfg.grad_accum + micro
            inputs, labels = micro_batch(train_split, seed, index, cfg.batch_size, rank, world)
            inputs, labels = inputs.to(accelerator.device), labels.to(accelerator.device)
            try:
                if in_pieces:  # the model is not prepared, so mixed precision is applied here
                    with accelerator.autocast():
                        loss, parts = objective.loss_and_backward(wrapped, inputs, labels, backward)
                else:
                    sync = micro == cfg.grad_accum - 1
                    with nullcontext() if sync else accelerator.no_sync(wrapped):
                        loss, parts = objective.loss(wrapped, inputs, labels)
                        backward(loss)
            except FloatingPointError as err:  # an objective that names the layer
                raise FloatingPointError(f"step {state.step + 1}: {err}") from None
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"loss is {loss.item()} at step {state.step + 1}; the last checkpoint is intact. "
                    "Lower train.lr or check the data."
                )
            for k, v in {"loss": loss.item(), **parts}.items():
                metrics[k] = metrics.get(k, 0.0) + v / cfg.grad_accum
        if in_pieces:
            average_gradients(params, accelerator)
        grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
        if grad_norm is None and sharded:  # accelerate clips under FSDP only when every parameter trains
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor (FSDP)
            grad_norm = grad_norm.full_tensor()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cfg.scheduler != "plateau":
            scheduler.step()
        state.step += 1
        # Each process saw its own rows: log the mean over processes.
        metrics = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), "mean").item() for k, v in metrics.items()}
        metrics.update(grad_norm=float(grad_norm), lr=optimizer.param_groups[0]["lr"])
        record = {"step": state.step, **{f"train/{k}": v for k, v in metrics.items()}}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")

        if state.step % cfg.eval_every == 0 or state.step == state.total_steps:
            val = validate(objective, wrapped, val_batches, accelerator, state.step)
            record.update({f"val/{k}": v for k, v in val.items()})
            if cfg.scheduler == "plateau":
                scheduler.step(val["val_loss"])
            if val["val_loss"] < state.best_val:
                state.best_val, state.best_step = val["val_loss"], state.step
                state.evals_without_improvement = 0
                best_tensors = gathered_trainable(model, accelerator)  # every process (FSDP gathers)
                if main:
                    save_file_atomic(best_tensors, out_dir / "best.safetensors")
            else:
                state.evals_without_improvement += 1
            patience = cfg.early_stop_patience
            if patience is not None and state.evals_without_improvement >= patience:
                state.stopped_early = True
                log.info("early stop at step %d: no improvement in %d evals", state.step, patience)
            log.info("step %d: val_loss %.5g (best %.5g at %d)", state.step, val["val_loss"], state.best_val, state.best_step)
        state.history.append(record)
        if tracker is not None:
            tracker.log(record, state.step)
        if state.step % cfg.eval_every == 0 or state.step == state.total_steps or state.stopped_early:
            tensors = gathered_trainable(model, accelerator)  # every process (FSDP gathers)
            optimizer_state = gathered_optimizer_state(model, optimizer, accelerator)
            if main:
                save_checkpoint(out_dir, model, optimizer, scheduler, state, tensors=tensors,
                                optimizer_state=optimizer_state, fingerprint=fingerprint)  # fmt: skip
            accelerator.wait_for_everyone()
    bar.close()
    best = out_dir / "best.safetensors"
    accelerator.wait_for_everyone()  # the main process wrote it
    if best.is_file():
        load_trainable(model, load_file(best), accelerator)
    return state
