"""Blockwise attention transfer, for models whose joint pass does not fit (LoLCATs 70B/405B).

1. Cache: the teacher runs once over the data; the hidden states entering each block
   (``transfer.block_size`` layers) are written to ``hidden_cache/<split>/shard-NNNNN``
   safetensors shards of ``transfer.shard_rows`` rows. A shard is written to a temporary file
   and renamed, so a killed run keeps only whole shards and a rerun computes only the missing
   ones. Processes take shards round-robin.
2. Train: each block is trained on its own from the cached states entering it, with the same
   objective and loop as the joint mode, as a single process (blocks are independent, so
   processes take blocks round-robin and never synchronise gradients). A finished block leaves
   ``done.json`` and is skipped on a rerun.
3. Merge: every block's best weights are loaded into the one model.

Caveat: one boundary's cached states are loaded into memory whole while its block trains.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from linearize.attention.hooks import attention_layers, set_mode
from linearize.config import Config
from linearize.data import PackedData, Split
from linearize.log import get_logger
from linearize.models.trainable import load_trainable_state
from linearize.rundir import honour_umask
from linearize.train.loop import train, validate, validation_batches
from linearize.train.transfer import TransferObjective, per_layer_mse

log = get_logger(__name__)


class LocalAccelerator:
    """The surface of ``accelerate.Accelerator`` the loop uses, for one process on its own."""

    num_processes, process_index, is_main_process = 1, 0, True

    def __init__(self, device: torch.device):
        self.device = device

    def prepare(self, *objects):
        return objects[0] if len(objects) == 1 else objects

    def no_sync(self, model):
        return nullcontext()

    def autocast(self):
        return nullcontext()

    def backward(self, loss: Tensor) -> None:
        loss.backward()

    def clip_grad_norm_(self, params, max_norm: float) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, tensor: Tensor, reduction: str = "mean") -> Tensor:
        return tensor

    def wait_for_everyone(self) -> None:
        pass


class Block(nn.Module):
    """Decoder layers [start, end) of a model, run on hidden states with the model's rotary."""

    def __init__(self, model: nn.Module, start: int, end: int):
        super().__init__()
        self.start = start
        self.layers = nn.ModuleList(model.model.layers[start:end])
        self.rotary = model.model.rotary_emb

    def forward(self, hidden: Tensor) -> Tensor:
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]  # (1, T)
        embeddings = self.rotary(hidden, positions)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
        return hidden

    def full_name(self, name: str) -> str:
        """A block parameter's name in the whole model."""
        _, j, rest = name.split(".", 2)
        return f"model.layers.{self.start + int(j)}.{rest}"


def check_blocks(model: nn.Module, bounds: list[tuple[int, int]], sample: Tensor) -> None:
    """Refuse, before any work, a model whose blocks do not reproduce its own layers: each
    :class:`Block` run in teacher mode from the hidden states entering it must give the hidden
    states the whole model passes on (one sample row). A family whose layers need more than
    hidden states and LLaMA's rotary (per-layer masks or rotaries, extra inputs) fails here."""
    advice = "use transfer.mode=joint (layer by layer in one pass), which converts every family"
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or getattr(model.model, "rotary_emb", None) is None:
        raise NotImplementedError(
            f"blockwise transfer runs decoder layers on their own and needs model.model.layers and "
            f"model.model.rotary_emb, which {type(model).__name__} lacks; {advice}"
        )
    entering: dict[int, Tensor] = {}

    def keep(index):
        def hook(module, args, kwargs, output=None):
            hidden = output if output is not None else (args[0] if args else kwargs["hidden_states"])
            entering[index] = (hidden[0] if isinstance(hidden, tuple) else hidden).detach()

        return hook

    handles = [layers[s].register_forward_pre_hook(keep(s), with_kwargs=True) for s, _ in bounds]
    handles.append(layers[-1].register_forward_hook(keep(len(layers)), with_kwargs=True))
    set_mode(model, "teacher")
    try:
        with torch.no_grad():
            model(input_ids=sample.to(next(model.parameters()).device), use_cache=False)
            for start, end in bounds:
                try:
                    got, want = Block(model, start, end)(entering[start]), entering[end]
                except Exception as err:  # a layer or rotary that wants other arguments
                    raise NotImplementedError(
                        f"blockwise transfer cannot run layers {start}..{end - 1} of {type(model).__name__} on "
                        f"their own ({type(err).__name__}: {err}); {advice}"
                    ) from err
                if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item()):
                    raise NotImplementedError(
                        f"blockwise transfer: layers {start}..{end - 1} of {type(model).__name__} run as a block "
                        f"give other hidden states than inside the model (max abs diff "
                        f"{(got - want).abs().max().item():.3g}): its layers need inputs a block does not pass "
                        f"(sliding-window masks, their own rotary); {advice}"
                    )
    finally:
        for h in handles:
            h.remove()


def block_bounds(n_layers: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n_layers)) for s in range(0, n_layers, size)]


def _fingerprint(split: Split, starts: list[int]) -> str:
    digest = hashlib.sha256(split.input_ids.numpy().tobytes())
    digest.update(json.dumps(starts).encode())
    return digest.hexdigest()[:16]


def cache_hidden_states(model: nn.Module, split: Split, starts: list[int], cache_dir: Path,
                        shard_rows: int, batch_size: int, rank: int = 0, world: int = 1) -> None:  # fmt: skip
    """Write this process's missing shards of the hidden states entering layers ``starts``."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = {"rows": len(split), "starts": starts, "shard_rows": shard_rows,
                "fingerprint": _fingerprint(split, starts)}  # fmt: skip
    path = cache_dir / "manifest.json"
    if path.is_file() and json.loads(path.read_text()) != manifest:
        raise ValueError(
            f"{cache_dir} caches other data or boundaries than this run's; delete it or use a new run.dir"
        )
    if rank == 0:
        path.write_text(json.dumps(manifest))
    captured: dict[int, list[Tensor]] = {}

    def hook(index):
        def capture(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured.setdefault(index, []).append(hidden.detach().cpu())

        return capture

    layers = model.model.layers
    handles = [layers[s].register_forward_pre_hook(hook(s), with_kwargs=True) for s in starts]
    set_mode(model, "teacher")
    n_shards = -(-len(split) // shard_rows)
    device = next(model.parameters()).device
    try:
        mine = [i for i in range(n_shards) if i % world == rank]
        for i in tqdm(mine, desc=f"cache {cache_dir.name}", disable=rank != 0):
            target = cache_dir / f"shard-{i:05d}.safetensors"
            if target.is_file():
                continue  # finished by an earlier run
            captured.clear()
            rows = split.input_ids[i * shard_rows : (i + 1) * shard_rows]
            with torch.no_grad():
                for b in range(0, len(rows), batch_size):
                    model(input_ids=rows[b : b + batch_size].to(device), logits_to_keep=1, use_cache=False)
            tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
            try:
                save_file({f"layer_{s:03d}": torch.cat(captured[s]) for s in starts}, tmp)
                honour_umask(tmp)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)
    finally:
        for h in handles:
            h.remove()


def load_boundary(cache_dir: Path, start: int) -> Tensor:
    """Cached hidden states entering layer ``start``: (rows, T, hidden)."""
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    return torch.cat([load_file(s)[f"layer_{start:03d}"] for s in shards])


def train_blockwise(cfg: Config, data: PackedData, model: nn.Module, out_dir: Path, accelerator,
                    fingerprint: dict | None = None) -> dict:  # fmt: skip
    """Cache, train every block (this process's share), merge; returns the per-layer outcome.
    ``out_dir`` is the stage's work dir; ``fingerprint`` goes into every block's checkpoints."""
    world, rank = accelerator.num_processes, accelerator.process_index
    bounds = block_bounds(model.config.num_hidden_layers, cfg.transfer.block_size)
    starts = [s for s, _ in bounds]
    check_blocks(model, bounds, data.train.input_ids[:1])
    for name, split in (("train", data.train), ("val", data.val)):
        cache_hidden_states(model, split, starts, out_dir / "hidden_cache" / name,
                            cfg.transfer.shard_rows, cfg.train.batch_size, rank, world)  # fmt: skip
    accelerator.wait_for_everyone()
    local = LocalAccelerator(accelerator.device)
    for i, (start, end) in enumerate(bounds):
        block = Block(model, start, end)
        layers = attention_layers(block)
        block_dir = out_dir / "blocks" / f"layers-{start:03d}-{end - 1:03d}"
        if i % world != rank or not layers or (block_dir / "done.json").is_file():
            continue
        log.info("block %d/%d: layers %d..%d", i + 1, len(bounds), start, end - 1)
        splits = []
        for name, split in (("train", data.train), ("val", data.val)):
            hidden = load_boundary(out_dir / "hidden_cache" / name, start)
            splits.append(Split(hidden, torch.zeros(len(hidden), 1, dtype=torch.long), split.examples))
        objective = TransferObjective(
            layers, cfg.transfer.mse_weight, cfg.transfer.xent_weight, forward=lambda m, x: m(x)
        )
        state = train(block, objective, splits[0], splits[1], cfg.train, block_dir,
                      accelerator=local, seed=cfg.run.seed, resume=cfg.run.resume, fingerprint=fingerprint)  # fmt: skip
        val = validate(objective, block, validation_batches(splits[1], cfg.train, cfg.run.seed, local), local, state.step)
        save_file({block.full_name(n): p.detach().cpu() for n, p in block.named_parameters() if p.requires_grad},
                  block_dir / "block.safetensors")  # fmt: skip
        (block_dir / "done.json").write_text(json.dumps(
            {"val_mse_per_layer": per_layer_mse(val), "steps": state.step, "best_step": state.best_step}
        ))  # fmt: skip
    accelerator.wait_for_everyone()
    merged, per_layer, steps = {}, {}, 0
    for start, end in bounds:
        block_dir = out_dir / "blocks" / f"layers-{start:03d}-{end - 1:03d}"
        if not (block_dir / "done.json").is_file():
            continue  # a block of kept softmax layers only
        merged.update(load_file(block_dir / "block.safetensors"))
        done = json.loads((block_dir / "done.json").read_text())
        per_layer.update({int(k): v for k, v in done["val_mse_per_layer"].items()})
        steps += done["steps"]
    load_trainable_state(model, merged)
    rows = cfg.train.batch_size * cfg.train.grad_accum
    return {"val_mse_per_layer": per_layer, "steps": steps, "best_step": None, "stopped_early": False,
            "tokens": steps * rows * cfg.data.seq_len, "history": []}  # fmt: skip
