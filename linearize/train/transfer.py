"""Stage 1, attention transfer: train the new attention to reproduce the teacher's outputs.

``joint`` (LoLCATs): one forward per batch with every swapped layer in ``transfer`` mode.
Each layer computes the teacher's softmax output and the student's from the same q, k, v,
hands both to :class:`TransferObjective`, and passes the teacher's output on, so every layer
trains on the inputs the teacher would give it. Nothing frozen requires grad, so the only
graph is the students' own, and in training each layer's share of the loss is backpropagated
as soon as that layer has run (:meth:`TransferObjective.loss_and_backward`): one layer's graph
is held at a time, not all of them. Logits are computed for one position only.

``blockwise`` (LoLCATs' recipe for 70B/405B): see :mod:`linearize.train.blockwise`; the same
objective, fed cached teacher hidden states instead of token ids. The stage itself (swap, train,
write) is :mod:`linearize.stages.transfer`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from linearize.attention import Linearized, Projected
from linearize.log import get_logger

log = get_logger(__name__)


def forward_tokens(model: nn.Module, input_ids: Tensor) -> None:
    """A whole-model pass that computes logits for one position only (stage 1 ignores them)."""
    model(input_ids=input_ids, logits_to_keep=1, use_cache=False)


class TransferObjective:
    """Per swapped layer, MSE(student output, teacher output) and optionally Hedgehog's
    cross-entropy between the teacher's and the student's attention weights; the loss is
    mse_weight x mean MSE + xent_weight x mean cross-entropy over layers."""

    def __init__(
        self, layers: list[Linearized], mse_weight: float, xent_weight: float = 0.0,
        forward: Callable[[nn.Module, Tensor], None] = forward_tokens,
    ):  # fmt: skip
        self.mse_weight, self.xent_weight = mse_weight, xent_weight
        self.forward = forward
        self.layers = {layer.layer_idx: layer for layer in layers}
        self._terms: dict[int, dict[str, Tensor]] = {}
        self._backward: Optional[Callable[[Tensor], None]] = None
        self._seen = 0
        for layer in layers:
            if xent_weight and not hasattr(layer.mixer, "weights"):
                raise ValueError(f"{type(layer.mixer).__name__} has no attention weights for transfer.xent_weight")
            layer.collector = self._collect
            layer.mode = "transfer"

    def _collect(self, layer_idx: int, student: Tensor, teacher: Tensor, p: Projected) -> None:
        if p.valid is None:
            terms = {"mse": F.mse_loss(student.float(), teacher.float())}
        else:  # a padded batch: padding positions are not part of the loss
            keep = p.valid[:, None, :, None].to(student.dtype)
            n = keep.sum() * student.shape[1] * student.shape[3]
            terms = {"mse": ((student.float() - teacher.float()) ** 2 * keep).sum() / n}
        if self.xent_weight and p.valid is not None:
            raise NotImplementedError("transfer.xent_weight does not mask padding: train on packed rows")
        if self.xent_weight:
            layer = self.layers[layer_idx]
            target = layer.teacher_weights(p)
            log_student = layer.mixer.weights(p).clamp_min(1e-12).log()  # (B, H, T, T)
            terms["xent"] = -(target * log_student).sum(-1).mean()
        if self._backward is not None and terms["mse"].requires_grad:
            # This layer's share of the loss (see _combine); its graph is freed right here.
            share = self.mse_weight * terms["mse"] + self.xent_weight * terms.get("xent", 0.0)
            self._backward(share / len(self.layers))
            terms = {k: v.detach() for k, v in terms.items()}
        self._terms[layer_idx] = terms

    def layer_terms(self, model: nn.Module, inputs: Tensor) -> dict[int, dict[str, Tensor]]:
        """Per-layer loss terms for one batch, keyed by layer index."""
        self._terms.clear()
        self.forward(model, inputs)
        terms, self._terms = dict(sorted(self._terms.items())), {}
        self._seen = len(terms)
        return terms

    def layer_mse(self, model: nn.Module, inputs: Tensor) -> dict[int, Tensor]:
        return {i: t["mse"] for i, t in self.layer_terms(model, inputs).items()}

    def _combine(self, terms: dict[int, dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        per_layer = torch.stack([t["mse"] for t in terms.values()])
        mse = per_layer.mean()
        loss, parts = self.mse_weight * mse, {"mse": mse.item()}
        if not math.isfinite(parts["mse"]):
            bad = [i for i, v in zip(terms, per_layer.tolist()) if not math.isfinite(v)]
            raise FloatingPointError(
                f"the transfer MSE of layer(s) {bad} is not finite; the last checkpoint is intact. "
                "Lower train.lr or check the data."
            )
        if self.xent_weight:
            xent = torch.stack([t["xent"] for t in terms.values()]).mean()
            loss = loss + self.xent_weight * xent
            parts["xent"] = xent.item()
        return loss, parts

    def loss(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        return self._combine(self.layer_terms(model, inputs))

    def loss_and_backward(
        self, model: nn.Module, inputs: Tensor, labels: Tensor, backward: Callable[[Tensor], None]
    ) -> tuple[Tensor, dict]:  # fmt: skip
        """The loss (detached) after ``backward`` was called on each layer's share of it.

        The shares sum to :meth:`loss`, so the gradients equal ``backward(loss)``'s, but each
        layer's graph is freed as soon as that layer has run. Gradients are local to this
        process: the loop averages them over processes itself (no DDP wrapper, which expects
        one backward per forward).
        """
        self._backward = backward
        try:
            loss, parts = self.loss(model, inputs, labels)
        finally:
            self._backward = None
        if self._seen != len(self.layers):
            raise RuntimeError(f"{self._seen} of {len(self.layers)} transfer layers ran; the loss shares are wrong")
        return loss, parts

    def validate(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        device = next(p for p in model.parameters()).device
        totals: dict[int, float] = {}
        val_loss = 0.0
        for inputs, _ in batches:
            terms = self.layer_terms(model, inputs.to(device))
            val_loss += self._combine(terms)[0].item() / len(batches)
            for i, t in terms.items():
                totals[i] = totals.get(i, 0.0) + t["mse"].item() / len(batches)
        return {
            "val_loss": val_loss,
            "mse": sum(totals.values()) / len(totals),
            **{f"mse/layer_{i:02d}": v for i, v in totals.items()},
        }


def per_layer_mse(metrics: dict[str, float], prefix: str = "mse/layer_") -> dict[int, float]:
    return {int(k.rsplit("_", 1)[-1]): v for k, v in metrics.items() if k.startswith(prefix)}
