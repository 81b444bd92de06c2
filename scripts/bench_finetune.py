"""Stage-2 cost against the teacher: a LoRA step of the converted model (``ntp``, ``kd``) beside
the same LoRA step of the softmax teacher, at the same batch: time and peak memory.

    .venv/bin/python scripts/bench_finetune.py                       # SmolLM2-135M, 1x1024, lolcats
    .venv/bin/python scripts/bench_finetune.py --seq-len 512 --objectives ntp kd kd+ntp --json out.json

Every row is one optimizer step as the stage-2 loop runs it (loss, backward into the adapter,
AdamW step), on the same random token ids, the adapter of ``adapter=`` (LoRA r 8 on q/k/v/o):
- ``teacher, ntp``: the swapped layers in ``teacher`` mode (SDPA over the same projections):
  what fine-tuning the softmax model itself with the same adapter costs;
- ``converted, <objective>``: the layers in ``student`` mode, the objective as
  ``finetune.objective`` runs it (``kd`` adds the teacher's no-grad forward in the same step).
A no-grad teacher forward is timed too, the unit ``scripts/bench_transfer.py`` uses. Rows are
timed in alternation, so that load from other processes weighs on every row alike.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what the weights hold; on CPU, the
peak resident set size sampled every millisecond above the level just before the measured
call (an approximation: the allocator may keep freed memory).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import PeakMemory, compose_config, model_arguments, release_freed_memory, timed  # noqa: E402

from linearize.config import OBJECTIVES  # noqa: E402
from linearize.models.convert import build_adapter  # noqa: E402
from linearize.models.load import load_teacher, resolve_device  # noqa: E402
from linearize.attention.hooks import set_mode  # noqa: E402
from linearize.models.swap import swap_attention  # noqa: E402
from linearize.train.objectives import NextTokenObjective, make_objective  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_arguments(parser)
    parser.add_argument("--objectives", nargs="+", default=["ntp", "kd"], choices=OBJECTIVES)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. adapter.r=16")
    args = parser.parse_args()

    cfg = compose_config(args.model, args.attention, ["stage=finetune", *args.overrides])
    device = resolve_device(args.device)
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=device)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq_len),
                        generator=torch.Generator().manual_seed(0)).to(device)  # fmt: skip
    swap_attention(model, cfg.attention)
    model = build_adapter(model, cfg.adapter)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)

    def step(mode: str, objective):
        def run():
            set_mode(model, mode)
            loss, _ = objective.loss(model, ids, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            set_mode(model, "student")

        return run

    def teacher_forward():
        set_mode(model, "teacher")
        with torch.no_grad(), model.disable_adapter():
            model(input_ids=ids, use_cache=False)
        set_mode(model, "student")

    rows = {"teacher forward (no grad)": teacher_forward, "teacher, ntp": step("teacher", NextTokenObjective())}
    for name in args.objectives:
        rows[f"converted, {name}"] = step("student", make_objective(replace(cfg.finetune, objective=name)))

    peaks = {}
    for name, fn in rows.items():
        fn()  # warm-up (also allocates AdamW's state)
        release_freed_memory(device)
        with PeakMemory(device) as mem:
            fn()
        peaks[name] = mem.peak
    times = {name: [] for name in rows}
    for _ in range(args.repeats):  # in alternation
        for name, fn in rows.items():
            times[name] += timed(fn, device, 1)

    medians = {name: statistics.median(t) for name, t in times.items()}
    unit_t, unit_m = medians["teacher, ntp"], peaks["teacher, ntp"]
    result = {
        "model": args.model, "attention": args.attention, "adapter": cfg.adapter.name, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "batch": args.batch, "seq_len": args.seq_len, "repeats": args.repeats,
        "rows": [{"row": name, "seconds": medians[name], "time_ratio": medians[name] / unit_t,
                  "tokens_per_s": args.batch * args.seq_len / medians[name], "peak_mib": peaks[name] / 2**20,
                  "memory_ratio": peaks[name] / max(unit_m, 1)} for name in rows],
    }  # fmt: skip
    print(f"{args.model} / {args.attention} + {cfg.adapter.name}, batch {args.batch} x {args.seq_len} tokens on "
          f"{result['device_name']} ({result['threads']} threads), median of {args.repeats}; ratios to 'teacher, ntp'")  # fmt: skip
    print(f"{'':28}{'s / step':>10}{'ratio':>8}{'tokens/s':>10}{'peak MiB':>10}{'ratio':>8}")
    for r in result["rows"]:
        print(f"{r['row']:28}{r['seconds']:10.3f}{r['time_ratio']:8.2f}{r['tokens_per_s']:10.0f}"
              f"{r['peak_mib']:10.0f}{r['memory_ratio']:8.2f}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
