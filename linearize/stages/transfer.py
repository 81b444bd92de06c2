"""``stage=transfer`` (stage 1, attention transfer): swap the attention in, train the new
parameters to reproduce the teacher's attention outputs (:mod:`linearize.train.transfer`),
optionally return the worst layers to softmax, write the converted model and its report.

Checkpoints (and blockwise's cache and blocks) go to ``<run.dir>/work/transfer``; the outputs
appear in ``<run.dir>/transfer`` by one rename, manifest last.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from linearize.attention.hooks import attention_layers, set_mode
from linearize.fingerprint import stage_fingerprint
from linearize.log import get_logger
from linearize.models.convert import save_converted
from linearize.models.swap import restore_softmax, swap_attention
from linearize.plots import plot_transfer
from linearize.rundir import publish, start_work, work_dir
from linearize.stages.prepare import Prepared
from linearize.train.blockwise import train_blockwise
from linearize.train.loop import train, validate, validation_batches
from linearize.train.transfer import TransferObjective, per_layer_mse

log = get_logger(__name__)


def run(prepared: Prepared) -> Path:
    """Swap, train, keep the worst layers softmax if asked, write ``<run.dir>/transfer``."""
    cfg, accelerator = prepared.config, prepared.accelerator
    run_dir = Path(cfg.run.dir)
    work = work_dir(run_dir, "transfer")
    fingerprint = stage_fingerprint(cfg, "transfer")
    start_work(work, fingerprint)
    model = prepared.teacher
    report = swap_attention(model, cfg.attention, seed=cfg.run.seed)
    if cfg.transfer.mode == "joint":
        outcome = train_joint(prepared, model, work, fingerprint)
    else:
        outcome = train_blockwise(cfg, prepared.data, model, work, accelerator, fingerprint)
    per_layer = outcome["val_mse_per_layer"]
    kept = sorted(sorted(per_layer, key=per_layer.get, reverse=True)[: cfg.attention.keep_softmax])
    if kept:
        restore_softmax(model, kept)
        log.info("keep_softmax=%d: layers %s (worst validation MSE) set back to softmax", len(kept), kept)
    set_mode(model, "student")
    result = {
        "attention": asdict(cfg.attention),
        "mode": cfg.transfer.mode,
        "swapped": [i for i in report.swapped if i not in kept],
        "softmax_layers": sorted(report.softmax + kept),
        "kept_softmax": kept,
        **outcome,
        "val_mse_per_layer": {str(i): per_layer[i] for i in sorted(per_layer)},
        "val_mse_mean": sum(per_layer.values()) / len(per_layer),
    }

    def write(tmp: Path) -> None:
        (tmp / "result.json").write_text(json.dumps(result, indent=1))
        plot_transfer(result, tmp / "transfer_report.png")
        save_converted(
            model, tmp, teacher=cfg.model, attention=cfg.attention, softmax_layers=result["softmax_layers"],
            tokenizer=prepared.tokenizer, seed=cfg.run.seed, extra={"stage": "transfer"}, fingerprint=fingerprint,
        )  # fmt: skip

    out_dir = run_dir / "transfer"
    if accelerator.is_main_process:
        publish(run_dir, "transfer", write)
    accelerator.wait_for_everyone()
    log.info(
        "transfer done (%s): val MSE mean %.4g; results in %s",
        cfg.transfer.mode, result["val_mse_mean"], out_dir,
    )  # fmt: skip
    return out_dir


def train_joint(prepared: Prepared, model, work: Path, fingerprint: dict) -> dict:
    """LoLCATs' joint transfer: every swapped layer at once, in one loop; the validation MSE per
    layer of the weights kept (the best)."""
    cfg, accelerator = prepared.config, prepared.accelerator
    objective = TransferObjective(attention_layers(model), cfg.transfer.mse_weight, cfg.transfer.xent_weight)
    state = train(
        model, objective, prepared.data.train, prepared.data.val, cfg.train, work,
        accelerator=accelerator, seed=cfg.run.seed, resume=cfg.run.resume, tracker=prepared.tracker,
        fingerprint=fingerprint,
    )  # fmt: skip
    last = state.history[-1] if state.history else {}
    per_layer = per_layer_mse(last, "val/mse/layer_")
    if state.best_step != state.step or not per_layer:
        batches = validation_batches(prepared.data.val, cfg.train, cfg.run.seed, accelerator)
        per_layer = per_layer_mse(validate(objective, model, batches, accelerator, state.step))
    rows = cfg.train.batch_size * cfg.train.grad_accum * accelerator.num_processes
    return {
        "val_mse_per_layer": per_layer,
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "tokens": state.step * rows * cfg.data.seq_len,
        "history": state.history,
    }
