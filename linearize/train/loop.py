"""The one training loop, used by every training stage; stages differ only in their objective.

Reads top to bottom: :func:`train` first (build the optimizer and schedule, restore a checkpoint
if resuming, then per optimizer step accumulate ``grad_accum`` micro-batches, clip, step, log;
every ``eval_every`` steps validate, keep the best weights, step the plateau schedule,
checkpoint), then the pieces it calls in the order it calls them.

Data order is a pure function of (seed, epoch): a seeded permutation of the packed rows, cut
into micro-batches of ``batch_size`` rows per process. A checkpoint therefore needs only the
step count to find its place in the data, and a resumed run sees exactly the batches the
uninterrupted one would have (:mod:`linearize.train.checkpoint` writes and restores them;
:mod:`linearize.train.distributed` holds what several processes add).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path
from typing import Optional, Protocol

import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from linearize.config import TrainConfig
from linearize.data import Split
from linearize.log import Tracker, get_logger
from linearize.rundir import RunDirError
from linearize.train.checkpoint import (
    TrainState,
    check_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_file_atomic,
)
from linearize.train.distributed import (
    average_gradients,
    broadcast_parameters,
    gathered_optimizer_state,
    gathered_trainable,
    is_sharded,
    load_trainable,
)

log = get_logger(__name__)


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
