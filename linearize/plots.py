"""Figures a person would rather look at than read: transfer error per layer, loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_transfer(result: dict, path: Path) -> Path:
    """Two panels: final validation MSE per layer (kept-softmax layers marked) and the curves."""
    fig, (ax_layers, ax_curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    per_layer = {int(k): v for k, v in result["val_mse_per_layer"].items()}
    kept = set(result.get("kept_softmax", []))
    layers = sorted(per_layer)
    colors = ["tab:red" if i in kept else "tab:blue" for i in layers]
    ax_layers.bar(layers, [per_layer[i] for i in layers], color=colors)
    ax_layers.set(xlabel="layer", ylabel="validation MSE", title="attention transfer error per layer")
    if kept:
        ax_layers.legend(handles=[plt.Rectangle((0, 0), 1, 1, color="tab:red")], labels=["set back to softmax"])

    history = result["history"]
    train = [(h["step"], h["train/loss"]) for h in history if "train/loss" in h]
    val = [(h["step"], h["val/val_loss"]) for h in history if "val/val_loss" in h]
    if train:
        ax_curves.plot(*zip(*train), label="train loss", alpha=0.7)
    if val:
        ax_curves.plot(*zip(*val), marker="o", label="validation loss")
    ax_curves.set(xlabel="optimizer step", ylabel="loss (mse_weight x MSE)", title="loss curves")
    if train or val:
        ax_curves.set_yscale("log")
        ax_curves.legend()
    else:
        ax_curves.text(0.5, 0.5, "no joint loss curve\n(blockwise: one per block)", ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
