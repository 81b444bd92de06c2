"""``stage=finetune`` (stage 2) and, through :func:`tune`, ``stage=uptrain``: train a converted
model's trainable set on ``finetune.objective`` with the same loop as stage 1.

They differ only in the model they start from and the set that trains. ``stage=finetune``: a peft
adapter (``adapter=lora|dora|pissa|olora|fourierft|vera``) on the converted model, plus the
stage-1 parameters when ``adapter.train_new``; the model starts from the stage-1 output
(``finetune.start=transfer``) or from a fresh swap with no transfer at all (``finetune.start=swap``:
Liger's recipe, and the no-transfer baseline). ``stage=uptrain`` (SUPRA,
:mod:`linearize.stages.uptrain`): a fresh swap, no adapter, ``train.trainable`` = ``new``,
``attention`` or ``all``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import peft
import torch
from torch import nn

from linearize.attention.hooks import set_mode
from linearize.config import AttentionConfig
from linearize.fingerprint import check_chain, stage_fingerprint
from linearize.log import get_logger
from linearize.models.convert import apply_converted, build_adapter, save_converted, save_full
from linearize.models.load import load_teacher
from linearize.models.swap import swap_attention
from linearize.models.trainable import set_trainable
from linearize.rundir import publish, start_work, work_dir
from linearize.stages.prepare import Prepared
from linearize.train.distributed import full_state_options, is_sharded
from linearize.train.loop import train
from linearize.train.objectives import make_objective

log = get_logger(__name__)

# What a stage starts from: the model to train (in student mode) and its attention config, whose
# softmax_layers are the layers left as the teacher's.
Start = Callable[[Prepared], tuple[nn.Module, AttentionConfig]]


def run(prepared: Prepared) -> Path:
    """Add the adapter to the stage-1 model (or a fresh swap), train, write ``<run.dir>/finetune``."""
    trainable = "adapter+new" if prepared.config.adapter.train_new else "adapter"
    return tune(prepared, "finetune", start_with_adapter, trainable)


def start_with_adapter(prepared: Prepared) -> tuple[nn.Module, AttentionConfig]:
    """The converted model stage 2 starts from, with the configured adapter built on it."""
    cfg = prepared.config
    transfer_dir = Path(cfg.run.dir) / "transfer"
    if cfg.finetune.start == "transfer":
        attention = AttentionConfig(**check_chain(transfer_dir)["attention"])
        model = apply_converted(prepared.teacher, transfer_dir, seed=cfg.run.seed)
        log.info("starting from the stage-1 model in %s", transfer_dir)
    else:
        report = swap_attention(prepared.teacher, cfg.attention, seed=cfg.run.seed)
        set_mode(prepared.teacher, "student")
        log.info("finetune.start=swap: attention=%s swapped in with no transfer", cfg.attention.name)
        model, attention = prepared.teacher, replace(cfg.attention, softmax_layers=report.softmax)
    return build_adapter(model, cfg.adapter, seed=cfg.run.seed), attention


def tune(prepared: Prepared, stage: str, start: Start, trainable: str) -> Path:
    """Train ``trainable`` (see :func:`~linearize.models.trainable.set_trainable`) of the model
    ``start`` builds on ``finetune.objective``; write the converted model to ``<run.dir>/<stage>``:
    deltas (new parameters, adapter) while the teacher's own weights are untouched, else whole."""
    cfg, accelerator = prepared.config, prepared.accelerator
    run_dir = Path(cfg.run.dir)
    work = work_dir(run_dir, stage)
    fingerprint = stage_fingerprint(cfg, stage)
    start_work(work, fingerprint)
    model, attention = start(prepared)
    set_trainable(model, trainable)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    what = cfg.adapter.name if trainable.startswith("adapter") else f"train.trainable={trainable}"
    log.info("%s trains %s: %s of %s parameters (%.3f%%)", stage, what, f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    state = train(
        model, make_objective(cfg.finetune), prepared.data.train, prepared.data.val, cfg.train, work,
        accelerator=accelerator, seed=cfg.run.seed, resume=cfg.run.resume, tracker=prepared.tracker,
        fingerprint=fingerprint,
    )  # fmt: skip
    adapter = isinstance(model, peft.PeftModel)
    if is_sharded(accelerator) and not adapter:
        model = unsharded_copy(model, prepared)
    first_val = next((h["val/val_loss"] for h in state.history if "val/val_loss" in h), None)
    extra = {"stage": stage, "trainable": trainable, "best_val_loss": state.best_val, "initial_val_loss": first_val,
             "steps": state.step, "best_step": state.best_step, "history": state.history}  # fmt: skip
    out_dir = run_dir / stage

    def write(tmp: Path) -> None:
        if adapter or trainable == "new":  # the teacher's own weights are unchanged: deltas suffice
            save_converted(model, tmp, teacher=cfg.model, attention=attention, softmax_layers=attention.softmax_layers,
                           adapter=cfg.adapter if adapter else None, tokenizer=prepared.tokenizer, seed=cfg.run.seed,
                           extra=extra, fingerprint=fingerprint)  # fmt: skip
        else:
            save_full(model, tmp, home=out_dir, teacher=cfg.model, attention=attention, tokenizer=prepared.tokenizer,
                      seed=cfg.run.seed, extra=extra, fingerprint=fingerprint)  # fmt: skip

    if accelerator.is_main_process:
        publish(run_dir, stage, write)
    accelerator.wait_for_everyone()
    log.info("%s done: val loss %.4g -> %.4g (best step %d); converted model in %s",
             stage, first_val, state.best_val, state.best_step, out_dir)  # fmt: skip
    return out_dir


def unsharded_copy(model: nn.Module, prepared: Prepared) -> nn.Module | None:
    """The FSDP-sharded ``model``'s weights gathered into a fresh, plain copy on the main process
    (``None`` on the others), for writing it out. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=full_state_options(cpu_offload=True))
    if not prepared.accelerator.is_main_process:
        return None
    cfg = prepared.config
    plain = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=cfg.run.seed)
    swap_attention(plain, cfg.attention, seed=cfg.run.seed)
    set_mode(plain, "student")
    dtypes = {t.dtype for t in full.values() if t.is_floating_point()}
    if len(dtypes) == 1:  # the dtype training used (the CPU load above may pick another)
        plain.to(dtypes.pop())
    plain.load_state_dict(full)  # strict: every weight comes from training (a copy: ties are kept)
    return plain
