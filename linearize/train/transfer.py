"""Stage 1, attention transfer: train the new attention to reproduce the teacher's outputs.

``joint`` (LoLCATs): one forward per batch with every swapped layer in ``transfer`` mode.
Each layer computes the teacher's softmax output and the student's from the same q, k, v,
hands both to :class:`TransferObjective`, and passes the teacher's output on, so every layer
trains on the inputs the teacher would give it. Nothing frozen requires grad, so the only
graph kept is the students' own. Logits are computed for one position only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import Tensor, nn

from linearize.attention import AttentionLayer
from linearize.log import Tracker, get_logger
from linearize.models.swap import attention_layers, restore_softmax, set_mode, swap_attention
from linearize.plots import plot_transfer
from linearize.train.loop import train, trainable_state, validate, validation_batches

log = get_logger(__name__)


class TransferObjective:
    """Loss = mse_weight x mean over swapped layers of MSE(student output, teacher output)."""

    def __init__(self, layers: list[AttentionLayer], mse_weight: float):
        self.layers = layers
        self.mse_weight = mse_weight
        self._outputs: dict[int, tuple[Tensor, Tensor]] = {}
        for layer in layers:
            layer.collector = self._collect
            layer.mode = "transfer"

    def _collect(self, layer_idx: int, student: Tensor, teacher: Tensor) -> None:
        self._outputs[layer_idx] = (student, teacher)

    def layer_mse(self, model: nn.Module, input_ids: Tensor) -> dict[int, Tensor]:
        """Per-layer MSE for one batch, keyed by layer index."""
        self._outputs.clear()
        model(input_ids=input_ids, logits_to_keep=1, use_cache=False)
        mse = {i: F.mse_loss(s.float(), t.float()) for i, (s, t) in sorted(self._outputs.items())}
        self._outputs.clear()
        return mse

    def loss(self, model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, dict]:
        mse = torch.stack(list(self.layer_mse(model, input_ids).values())).mean()
        return self.mse_weight * mse, {"mse": mse.item()}

    def validate(self, model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> dict[str, float]:
        device = next(p for p in model.parameters()).device
        totals: dict[int, float] = {}
        for input_ids, _ in batches:
            for i, mse in self.layer_mse(model, input_ids.to(device)).items():
                totals[i] = totals.get(i, 0.0) + mse.item() / len(batches)
        mean = sum(totals.values()) / len(totals)
        return {
            "val_loss": self.mse_weight * mean,
            "mse": mean,
            **{f"mse/layer_{i:02d}": v for i, v in totals.items()},
        }


def run_transfer(prepared, accelerator: Accelerator, tracker: Tracker | None = None) -> Path:
    """Swap, train, optionally return the worst layers to softmax, write results and report.

    Returns:
        The stage's output directory (``<run.dir>/transfer``).
    """
    cfg = prepared.config
    if cfg.transfer.mode != "joint":
        raise NotImplementedError("transfer.mode=blockwise is not built yet; use transfer.mode=joint")
    out_dir = Path(cfg.run.dir) / "transfer"
    out_dir.mkdir(parents=True, exist_ok=True)
    model = prepared.teacher
    report = swap_attention(model, cfg.attention, seed=cfg.run.seed)
    objective = TransferObjective(attention_layers(model), cfg.transfer.mse_weight)
    state = train(
        model, objective, prepared.data.train, prepared.data.val, cfg.train, out_dir,
        accelerator=accelerator, seed=cfg.run.seed, resume=cfg.run.resume, tracker=tracker,
    )  # fmt: skip
    final = state.history[-1] if state.history else {}
    per_layer = {int(k.split("_")[-1]): v for k, v in final.items() if k.startswith("val/mse/layer_")}
    if state.best_step != state.step or not per_layer:  # the model now holds the best weights
        batches = validation_batches(prepared.data.val, cfg.train, cfg.run.seed, accelerator)
        val = validate(objective, model, batches, accelerator)
        per_layer = {int(k.split("_")[-1]): v for k, v in val.items() if k.startswith("mse/layer_")}
    kept = sorted(sorted(per_layer, key=per_layer.get, reverse=True)[: cfg.attention.keep_softmax])
    if kept:
        restore_softmax(model, kept)
        log.info("keep_softmax=%d: layers %s (worst validation MSE) set back to softmax", len(kept), kept)
    set_mode(model, "student")
    result = {
        "attention": asdict(cfg.attention),
        "swapped": [i for i in report.swapped if i not in kept],
        "softmax_layers": sorted(report.softmax + kept),
        "kept_softmax": kept,
        "val_mse_per_layer": {str(i): per_layer[i] for i in sorted(per_layer)},
        "val_mse_mean": sum(per_layer.values()) / len(per_layer),
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "tokens": state.step * cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes * cfg.data.seq_len,
        "history": state.history,
    }
    if accelerator.is_main_process:
        save_file(trainable_state(model), out_dir / "attention.safetensors")
        (out_dir / "result.json").write_text(json.dumps(result, indent=1))
        plot_transfer(result, out_dir / "transfer_report.png")
    log.info(
        "transfer done: %d steps, val MSE mean %.4g (best step %d); results in %s",
        state.step, result["val_mse_mean"], state.best_step, out_dir,
    )  # fmt: skip
    return out_dir

