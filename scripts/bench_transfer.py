"""Stage-1 cost against the teacher: step time / teacher forward, peak memory / teacher peak.

    .venv/bin/python scripts/bench_transfer.py                      # SmolLM2-135M, 1x1024, lolcats
    .venv/bin/python scripts/bench_transfer.py --seq-len 512 --attention hedgehog --json out.json

Teacher: one no-grad forward of the unswapped model (SDPA, full logits), as inference runs it
(its memory); its time is taken through the swapped layers in ``teacher`` mode (the same SDPA
over the same projections), alternating with the stage-1 steps so that load from other
processes weighs on both alike.
Stage 1: one joint transfer step (teacher softmax + student per layer, per-layer MSE, each
layer's backward as soon as it has run, into the new parameters only, AdamW step), as the loop
runs it. Both on the same random token ids.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what the weights hold; on CPU, the
peak resident set size sampled every millisecond above the level just before the measured
call (an approximation: the allocator may keep freed memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import PeakMemory, compose_config, model_arguments, timed  # noqa: E402

from linearize.models.load import load_teacher, resolve_device  # noqa: E402
from linearize.attention.hooks import attention_layers, set_mode  # noqa: E402
from linearize.models.swap import swap_attention  # noqa: E402
from linearize.train.transfer import TransferObjective  # noqa: E402


def stage1_cost(cfg, model, ids: torch.Tensor, device: torch.device, repeats: int) -> dict:
    """Time and peak memory of a teacher forward of ``model`` (unswapped) on ``ids`` and of one
    stage-1 step after swapping its attention for ``cfg.attention``; medians of ``repeats``.
    Raises SystemExit when the attention adds no parameter (nothing to train in stage 1)."""

    def teacher_forward():
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)

    teacher_forward()  # warm-up
    with PeakMemory(device) as teacher_mem:
        teacher_forward()

    swap_attention(model, cfg.attention)
    objective = TransferObjective(attention_layers(model), cfg.transfer.mse_weight, cfg.transfer.xent_weight)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        sys.exit(f"attention={cfg.attention.name} adds no parameters, so it has no stage-1 step to time (it trains with LoRA)")
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)

    def transfer_step():
        objective.loss_and_backward(model, ids, ids, torch.Tensor.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def swapped_teacher_forward():  # the same teacher math, through the swapped layers
        set_mode(model, "teacher")
        teacher_forward()
        set_mode(model, "transfer")

    transfer_step()  # warm-up (also allocates AdamW's state)
    with PeakMemory(device) as step_mem:
        transfer_step()
    # Timed in alternation, so that load from other processes weighs on both alike.
    teacher_times, step_times = [], []
    for _ in range(repeats):
        teacher_times += timed(swapped_teacher_forward, device, 1)
        step_times += timed(transfer_step, device, 1)
    t_teacher, t_step = statistics.median(teacher_times), statistics.median(step_times)
    return {
        "device": str(device), "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": ids.shape[0], "seq_len": ids.shape[1],
        "teacher_forward_s": t_teacher, "transfer_step_s": t_step, "time_ratio": t_step / t_teacher,
        "tokens_per_s": ids.numel() / t_step,
        "teacher_peak_mib": teacher_mem.peak / 2**20, "transfer_peak_mib": step_mem.peak / 2**20,
        "memory_ratio": step_mem.peak / max(teacher_mem.peak, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. attention.chunk_size=256")
    args = parser.parse_args()

    cfg = compose_config(args.model, args.attention, args.overrides)
    device = resolve_device(args.device)
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    result = {"model": args.model, "attention": args.attention, **stage1_cost(cfg, model, ids, device, args.repeats)}
    t_teacher, t_step = result["teacher_forward_s"], result["transfer_step_s"]
    print(f"{args.model} / {args.attention}, batch {args.batch} x {args.seq_len} tokens on {result['device_name']}"
          f" ({result['threads']} threads), median of {args.repeats}")  # fmt: skip
    print(f"{'':28}{'teacher fwd':>14}{'stage-1 step':>14}{'ratio':>8}")
    print(f"{'time (s)':28}{t_teacher:14.3f}{t_step:14.3f}{result['time_ratio']:8.2f}")
    print(f"{'peak memory above start (MiB)':28}{result['teacher_peak_mib']:13.0f} "
          f"{result['transfer_peak_mib']:13.0f} {result['memory_ratio']:8.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
