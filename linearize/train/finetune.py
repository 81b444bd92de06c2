"""Stage 2 and SUPRA-style uptraining: next-token loss with the same loop as stage 1.

The trainable set is what differs. ``stage=finetune``: a peft adapter (``adapter=lora|dora|
pissa|olora|fourierft|vera``) on the converted model, plus the stage-1 parameters when
``adapter.train_new``; the model starts from the stage-1 output (``finetune.start=transfer``)
or from a fresh swap with no transfer at all (``finetune.start=swap``: Liger's recipe, and the
no-transfer baseline). ``stage=uptrain`` (SUPRA): a fresh swap, no adapter, and
``train.trainable`` = ``new`` (the new attention parameters), ``attention`` (those plus every
swapped layer's q/k/v/o projections) or ``all`` (the whole model).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path

import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn

from linearize.config import AttentionConfig, FinetuneConfig
from linearize.data import IGNORE_INDEX
from linearize.log import Tracker, get_logger
from linearize.fingerprint import check_chain, stage_fingerprint
from linearize.models.convert import apply_converted, build_adapter, save_converted
from linearize.attention.hooks import attention_layers, set_mode
from linearize.models.swap import swap_attention
from linearize.train.export import save_full
from linearize.rundir import publish, start_work, work_dir
from linearize.train.loop import is_sharded, train

log = get_logger(__name__)


class NextTokenObjective:
    """Mean cross-entropy of the next token over positions whose label is not -100.

    Under several processes the mean is over the tokens of every process's micro-batch: each
    divides its sum by the mean count per process, so the average of the processes' gradients
    (what DDP computes) is the gradient of the global token mean, as one process with the whole
    batch would compute it.
    """

    def loss(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        return self.from_logits(model(input_ids=inputs, use_cache=False).logits, labels)

    def from_logits(self, logits: Tensor, labels: Tensor, log_probs: bool = False) -> tuple[Tensor, dict]:
        """The loss of logits (B, T, V) already computed for ``labels`` (B, T); with
        ``log_probs``, ``logits`` are already log-softmaxed (fp32), and are not again."""
        logits = logits[:, :-1].flatten(0, 1)  # (B (T-1), V)
        targets = labels[:, 1:]
        if log_probs:
            total = F.nll_loss(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        else:
            total = F.cross_entropy(logits.float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        count = (targets != IGNORE_INDEX).sum().float()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(count)
            count = count / dist.get_world_size()
        # A packed row may hold only prompt tokens: count at least one so the loss stays finite.
        count = count.clamp_min(1.0)
        return total / count, {"tokens": float(count)}

    def validate(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        device = next(p for p in model.parameters()).device
        losses = [self.loss(model, x.to(device), y.to(device))[0].item() for x, y in batches]
        mean = sum(losses) / len(losses)
        return {"val_loss": mean, "ppl": math.exp(min(mean, 50.0))}


@contextmanager
def teacher_view(model: nn.Module):
    """The same model object as the teacher: adapters disabled, every swapped layer computing the
    teacher's softmax attention. (The original model only while the trainable set leaves the
    teacher's own weights as they were: ``stages.check_values`` refuses the other cases.)"""
    inner = model
    while hasattr(inner, "module"):  # DDP
        inner = inner.module
    adapters_off = inner.disable_adapter() if isinstance(inner, peft.PeftModel) else nullcontext()
    with adapters_off:
        set_mode(inner, "teacher")
        try:
            yield
        finally:
            set_mode(inner, "student")


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher ‖ student) of the distributions at ``temperature`` over the vocabulary, mean over
    every position, times T² (Hinton et al.: the gradients keep their size as T changes).
    Logits (B, T, V); exactly 0 when the two are equal."""
    log_s = F.log_softmax(student.float() / temperature, dim=-1)
    return kd_from_log_probs(log_s, teacher, temperature)


def kd_from_log_probs(log_s: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """:func:`kd_loss` from the student's log-probabilities at ``temperature`` (B, T, V)."""
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1).flatten(0, 1)  # (B*T, V)
    return F.kl_div(log_s.flatten(0, 1), log_t, log_target=True, reduction="batchmean") * temperature**2


class DistillObjective:
    """``kd``: :func:`kd_loss` to the teacher's logits; ``kd+ntp``: ``kd_weight`` × that +
    (1 − ``kd_weight``) × the next-token loss. The teacher's logits come from the same model in
    :func:`teacher_view`, in the same step, without a graph: no second copy of the weights.
    Both parts are logged (and ``ntp`` validated) whatever the weights, so objectives compare."""

    def __init__(self, kd_weight: float, temperature: float):
        self.kd_weight, self.temperature = kd_weight, temperature
        self.ntp = NextTokenObjective()

    def loss(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        with torch.no_grad(), teacher_view(model):
            teacher = model(input_ids=inputs, use_cache=False).logits  # (B, T, V)
        student = model(input_ids=inputs, use_cache=False).logits
        log_s = F.log_softmax(student.float() / self.temperature, dim=-1)
        kd = kd_from_log_probs(log_s, teacher, self.temperature)
        del teacher
        if self.temperature == 1:  # the same log-probabilities give the next-token loss
            ntp, info = self.ntp.from_logits(log_s, labels, log_probs=True)
        else:
            ntp, info = self.ntp.from_logits(student, labels)
        loss = kd if self.kd_weight == 1 else self.kd_weight * kd + (1 - self.kd_weight) * ntp
        return loss, {"kd": kd.item(), "ntp": ntp.item(), **info}

    def validate(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        device = next(p for p in model.parameters()).device
        totals: dict[str, float] = {}
        for x, y in batches:
            loss, parts = self.loss(model, x.to(device), y.to(device))
            for k, v in {"val_loss": loss.item(), "kd": parts["kd"], "ntp": parts["ntp"]}.items():
                totals[k] = totals.get(k, 0.0) + v / len(batches)
        return {**totals, "ppl": math.exp(min(totals["ntp"], 50.0))}


def make_objective(cfg: FinetuneConfig):
    """The objective ``finetune.objective`` names."""
    if cfg.objective == "ntp":
        return NextTokenObjective()
    return DistillObjective(1.0 if cfg.objective == "kd" else cfg.kd_weight, cfg.kd_temperature)


def start_model(prepared) -> tuple[nn.Module, AttentionConfig, list[int]]:
    """The converted model stage 2 starts from, its attention config and softmax layers."""
    cfg = prepared.config
    transfer_dir = Path(cfg.run.dir) / "transfer"
    if cfg.finetune.start == "transfer":
        attention = AttentionConfig(**check_chain(transfer_dir)["attention"])
        model = apply_converted(prepared.teacher, transfer_dir, seed=cfg.run.seed)
        log.info("starting from the stage-1 model in %s", transfer_dir)
        return model, attention, attention.softmax_layers
    report = swap_attention(prepared.teacher, cfg.attention, seed=cfg.run.seed)
    set_mode(prepared.teacher, "student")
    log.info("finetune.start=swap: attention=%s swapped in with no transfer", cfg.attention.name)
    return prepared.teacher, cfg.attention, report.softmax


def run_finetune(prepared, accelerator: Accelerator, tracker: Tracker | None = None) -> Path:
    """Add the adapter, train on next-token loss, write the converted model to ``<run.dir>/finetune``."""
    cfg = prepared.config
    run_dir = Path(cfg.run.dir)
    work = work_dir(run_dir, "finetune")
    fingerprint = stage_fingerprint(cfg, "finetune")
    start_work(work, fingerprint)
    plain, attention_cfg, softmax_layers = start_model(prepared)
    model = build_adapter(plain, cfg.adapter, seed=cfg.run.seed)
    if cfg.adapter.train_new:
        for layer in attention_layers(plain):
            layer.mixer.requires_grad_(True)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("stage 2 trains %s: %s of %s parameters (%.3f%%)", cfg.adapter.name, f"{n_train:,}", f"{n_all:,}", 100 * n_train / n_all)
    objective = make_objective(cfg.finetune)
    state = train(
        model, objective, prepared.data.train, prepared.data.val, cfg.train, work,
        accelerator=accelerator, seed=cfg.run.seed, resume=cfg.run.resume, tracker=tracker,
        fingerprint=fingerprint,
    )  # fmt: skip
    first_val = next((h["val/val_loss"] for h in state.history if "val/val_loss" in h), None)
    extra = {"stage": "finetune", "best_val_loss": state.best_val, "initial_val_loss": first_val,
             "steps": state.step, "best_step": state.best_step}  # fmt: skip
    out_dir = run_dir / "finetune"
    if accelerator.is_main_process:
        publish(run_dir, "finetune", lambda tmp: save_converted(
            model, tmp, teacher=cfg.model, attention=attention_cfg, softmax_layers=softmax_layers,
            adapter=cfg.adapter, tokenizer=prepared.tokenizer, seed=cfg.run.seed,
            extra={**extra, "history": state.history}, fingerprint=fingerprint,
        ))  # fmt: skip
    accelerator.wait_for_everyone()
    log.info("finetune done: val loss %.4g -> %.4g (best step %d); converted model in %s",
             first_val, state.best_val, state.best_step, out_dir)  # fmt: skip
    return out_dir


def set_trainable(model: nn.Module, trainable: str) -> None:
    """``new``: only the converted layers' mixers; ``attention``: their whole attention modules
    (the family's projections and q/k norms too); ``all``."""
    model.requires_grad_(trainable == "all")
    for layer in attention_layers(model):
        (layer.module if trainable == "attention" else layer.mixer).requires_grad_(True)


def unsharded_copy(model: nn.Module, prepared, accelerator: Accelerator) -> nn.Module | None:
    """The FSDP-sharded ``model``'s weights gathered into a fresh, plain copy on the main process
    (``None`` on the others), for writing it out. Every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from linearize.models.load import load_teacher

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not accelerator.is_main_process:
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


def run_uptrain(prepared, accelerator: Accelerator, tracker: Tracker | None = None) -> Path:
    """Swap, train ``train.trainable`` on next-token loss, write ``<run.dir>/uptrain``."""
    cfg = prepared.config
    run_dir = Path(cfg.run.dir)
    work = work_dir(run_dir, "uptrain")
    fingerprint = stage_fingerprint(cfg, "uptrain")
    start_work(work, fingerprint)
    model = prepared.teacher
    report = swap_attention(model, cfg.attention, seed=cfg.run.seed)
    set_mode(model, "student")
    set_trainable(model, cfg.train.trainable)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    log.info("uptrain (train.trainable=%s) trains %s of %s parameters", cfg.train.trainable, f"{n_train:,}", f"{n_all:,}")
    state = train(
        model, make_objective(cfg.finetune), prepared.data.train, prepared.data.val, cfg.train, work,
        accelerator=accelerator, seed=cfg.run.seed, resume=cfg.run.resume, tracker=tracker,
        fingerprint=fingerprint,
    )  # fmt: skip
    if is_sharded(accelerator):
        model = unsharded_copy(model, prepared, accelerator)
    first_val = next((h["val/val_loss"] for h in state.history if "val/val_loss" in h), None)
    extra = {"stage": "uptrain", "trainable": cfg.train.trainable, "best_val_loss": state.best_val,
             "initial_val_loss": first_val, "steps": state.step, "best_step": state.best_step,
             "history": state.history}  # fmt: skip
    attention = replace(cfg.attention, softmax_layers=report.softmax)
    out_dir = run_dir / "uptrain"

    def write(tmp: Path) -> None:
        if cfg.train.trainable == "new":  # the teacher is unchanged: deltas suffice
            save_converted(model, tmp, teacher=cfg.model, attention=attention, softmax_layers=report.softmax,
                           tokenizer=prepared.tokenizer, seed=cfg.run.seed, extra=extra, fingerprint=fingerprint)  # fmt: skip
        else:
            save_full(model, tmp, home=out_dir, teacher=cfg.model, attention=attention, tokenizer=prepared.tokenizer,
                      seed=cfg.run.seed, extra=extra, fingerprint=fingerprint)  # fmt: skip

    if accelerator.is_main_process:
        publish(run_dir, "uptrain", write)
    accelerator.wait_for_everyone()
    log.info("uptrain done: val loss %.4g -> %.4g (best step %d); converted model in %s",
             first_val, state.best_val, state.best_step, out_dir)  # fmt: skip
    return out_dir
