"""Stage 2's objectives (``finetune.objective``): next-token loss, distillation from the teacher's
logits (KL over the vocabulary), or a mix. Used by ``stage=finetune`` and ``stage=uptrain``
(:mod:`linearize.stages.finetune`), with the same loop as stage 1."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext

import peft
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.attention.hooks import set_mode
from linearize.config import FinetuneConfig
from linearize.data import IGNORE_INDEX
from linearize.log import get_logger

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
    teacher's own weights as they were: ``stages.preflight.check_values`` refuses the other cases.)"""
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
