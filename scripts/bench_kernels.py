"""Attention kernels: time and peak memory of the forward and of forward + backward, per length.

    .venv/bin/python scripts/bench_kernels.py                                  # GPU, T = 1K .. 32K, bf16
    .venv/bin/python scripts/bench_kernels.py --seq-lens 4096 --dtype fp32 --png k.png --json k.json
    TRITON_INTERPRET=1 .venv/bin/python scripts/bench_kernels.py --device cpu --seq-lens 256 --repeats 1

Rows, all on the same random inputs of shape (--batch, --heads, T, --head-dim), feature maps of
width --feature-dim (non-negative), GQA with --kv-heads:

    sdpa-softmax          torch SDPA, causal: the teacher's attention, the cost to beat
    {linear,window,gated,delta,gated_delta}-triton     our kernels (linearize.ops.<kind>.triton)
    {linear,window,gated,delta,gated_delta}-reference  the PyTorch reference's chunked forms
    fla-linear, fla-gla, fla-delta, fla-gated-delta   flash-linear-attention's chunk_linear_attn,
                          chunk_gla, chunk_delta_rule, chunk_gated_delta_rule, when `fla` imports
                          (a note says so otherwise); layout (B, T, H, D), no GQA

On CUDA: CUDA-event timing after --warmup calls, median of --repeats; memory is the peak
allocated above the level before the call (inputs excluded). On CPU: wall clock and resident
memory (sampled); Triton rows there need TRITON_INTERPRET=1 (the interpreter: a smoke check of
the script, not a measurement). A call that runs out of memory is reported as OOM.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import PeakMemory  # noqa: E402

from linearize.ops.common import expand_kv  # noqa: E402
from linearize.ops.delta import reference as delta_reference  # noqa: E402
from linearize.ops.gated import reference as gated_reference  # noqa: E402
from linearize.ops.linear import reference as linear_reference  # noqa: E402
from linearize.ops.window import reference as window_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
MIB = 2**20
REFERENCE = {"linear": linear_reference, "window": window_reference, "gated": gated_reference, "delta": delta_reference}
# name -> the call of one kind's chunked form: (module, inputs, softmax scale, window) -> output
CALLS = {
    "linear": lambda m, x, scale, w: m.linear_attn_chunked(x["fq"], x["fk"], x["v"], chunk_size=64),
    "window": lambda m, x, scale, w: m.window_attn_chunked(
        x["q"], x["k"], x["v"], x["fq"], x["fk"], window=w, window_factor=x["window_factor"], scale=scale
    ),
    "gated": lambda m, x, scale, w: m.gated_attn_chunked(x["fq"], x["fk"], x["v"], x["g"], scale=scale),
    "delta": lambda m, x, scale, w: m.delta_attn_chunked(x["uq"], x["uk"], x["v"], x["beta"]),
    "gated_delta": lambda m, x, scale, w: m.delta_attn_chunked(x["uq"], x["uk"], x["v"], x["beta"], x["gh"]),
}
KIND_OF = {"gated_delta": "delta"}  # the ops package of a call, where its name is not it


def make_inputs(args, t: int, device: torch.device) -> dict:
    """Leaf tensors for every method; feature maps are softmaxes (non-negative, as hedgehog's)."""
    b, h, hk, d, f = args.batch, args.heads, args.kv_heads or args.heads, args.head_dim, args.feature_dim
    dt = DTYPES[args.dtype]

    def leaf(*shape, fn=None):
        x = torch.randn(*shape, device=device, dtype=torch.float32)
        return (fn(x) if fn else x).to(dt).requires_grad_()

    feat = lambda x: torch.softmax(x, -1)  # noqa: E731
    unit = lambda x: F.normalize(x, dim=-1)  # noqa: E731 - the delta rule's keys and queries
    return dict(
        q=leaf(b, h, t, d), k=leaf(b, hk, t, d), v=leaf(b, hk, t, d),
        fq=leaf(b, h, t, f, fn=feat), fk=leaf(b, hk, t, f, fn=feat),
        g=leaf(b, hk, t, f, fn=lambda x: F.logsigmoid(x) / 16),  # Liger's gate scale
        window_factor=torch.full((h,), 0.1, device=device, requires_grad=True),
        uq=leaf(b, h, t, f, fn=unit), uk=leaf(b, hk, t, f, fn=unit),
        beta=leaf(b, hk, t, fn=torch.sigmoid), gh=leaf(b, hk, t, fn=lambda x: F.logsigmoid(x + 4)),
    )  # fmt: skip


def methods(args, kernels: dict | None) -> tuple[dict, list[str]]:
    """name -> fn(inputs) returning the output to time, and notes on what is left out; kernels:
    kind -> its Triton module, as REFERENCE, or None."""
    scale, w, notes = args.head_dim**-0.5, args.window, []
    expand = lambda x, x_ref: expand_kv(x, x_ref.shape[1])  # noqa: E731
    out = {
        "sdpa-softmax": lambda x: F.scaled_dot_product_attention(
            x["q"], expand(x["k"], x["q"]), expand(x["v"], x["q"]), is_causal=True, scale=scale
        ),
    }
    impls = [("reference", REFERENCE)] + ([("triton", kernels)] if kernels is not None else [])
    for name, impl in impls:
        for kind, call in CALLS.items():
            out[f"{kind}-{name}"] = lambda x, m=impl[KIND_OF.get(kind, kind)], call=call: call(m, x, scale, w)
    if kernels is None:
        notes.append("Triton rows skipped: on CPU they need TRITON_INTERPRET=1 (the interpreter)")
    try:
        from fla.ops.delta_rule import chunk_delta_rule
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
        from fla.ops.gla import chunk_gla
        from fla.ops.linear_attn import chunk_linear_attn
    except Exception as e:  # noqa: BLE001 - not installed, or no GPU to import onto
        notes.append(f"flash-linear-attention rows skipped: `fla` does not import ({type(e).__name__}: {e})")
        return out, notes

    def fla(fn, *names):
        def run(x):
            xs = [expand(x[n], x["q"]).transpose(1, 2) for n in names]  # (B, T, H, .)
            kw = {"head_first": False} if "head_first" in inspect.signature(fn).parameters else {}
            return fn(*xs, **kw)[0]

        return run

    out["fla-linear"] = fla(chunk_linear_attn, "fq", "fk", "v")
    out["fla-gla"] = fla(chunk_gla, "fq", "fk", "v", "g")
    out["fla-delta"] = fla(chunk_delta_rule, "uq", "uk", "v", "beta")
    out["fla-gated-delta"] = fla(chunk_gated_delta_rule, "uq", "uk", "v", "gh", "beta")
    return out, notes


def measure(fn, device: torch.device, repeats: int, warmup: int) -> tuple[float, int]:
    """Median milliseconds of fn() and its peak memory above the level before it, in bytes."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    with PeakMemory(device) as mem:
        fn()
    return statistics.median(times), mem.peak


def run_one(fn, inputs: dict, device, args) -> dict:
    def forward():
        with torch.no_grad():
            fn(inputs)

    def forward_backward():
        for x in inputs.values():
            x.grad = None
        y = fn(inputs)
        y.backward(torch.ones_like(y))

    row = {}
    for key, call in (("fwd", forward), ("fwd_bwd", forward_backward)):
        try:
            row[f"{key}_ms"], row[f"{key}_peak_mib"] = measure(call, device, args.repeats, args.warmup)
            row[f"{key}_peak_mib"] /= MIB
        except torch.OutOfMemoryError:
            row[f"{key}_ms"] = row[f"{key}_peak_mib"] = "OOM"
            torch.cuda.empty_cache()
    return row


def table(rows: list[dict]) -> str:
    fmt = lambda v: v if isinstance(v, str) else f"{v:.2f}"  # noqa: E731
    lines = ["| method | T | fwd ms | fwd+bwd ms | fwd peak MiB | fwd+bwd peak MiB |", "|---|---:|---:|---:|---:|---:|"]
    keys = ("fwd_ms", "fwd_bwd_ms", "fwd_peak_mib", "fwd_bwd_peak_mib")
    for r in rows:
        cells = [r["method"], str(r["T"])] + [fmt(r[k]) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in dict.fromkeys(r["method"] for r in rows):
        pts = [(r["T"], r["fwd_bwd_ms"], r["fwd_bwd_peak_mib"]) for r in rows if r["method"] == name]
        pts = [p for p in pts if not isinstance(p[1], str)]
        if pts:
            axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=name)
    for ax, label in zip(axes, ("forward + backward, ms", "forward + backward peak, MiB")):
        ax.set(xscale="log", yscale="log", xlabel="sequence length T", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=None, help="GQA key/value heads (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--feature-dim", type=int, default=64, help="width of the feature maps fq, fk")
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--methods", nargs="+", help="only these rows (names as in the table)")
    parser.add_argument("--png", type=Path, help="write a chart here")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    kernels = None
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        # Triton only when it can run
        kernels = {kind: importlib.import_module(f"linearize.ops.{kind}.triton") for kind in REFERENCE}
    fns, notes = methods(args, kernels)
    if args.methods:
        fns = {k: v for k, v in fns.items() if k in args.methods}
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    title = (f"{where}; B={args.batch} H={args.heads} H_kv={args.kv_heads or args.heads} D={args.head_dim} "
             f"F={args.feature_dim} window={args.window} {args.dtype}")  # fmt: skip
    rows = []
    for t in args.seq_lens:
        torch.manual_seed(0)
        inputs = make_inputs(args, t, device)
        for name, fn in fns.items():
            rows.append({"method": name, "T": t, **run_one(fn, inputs, device, args)})
            print(f"T={t} {name}: {rows[-1]}", file=sys.stderr, flush=True)
        del inputs
    print(f"{title}\n\n{table(rows)}\n")
    for note in notes:
        print(f"- {note}")
    if args.png:
        plot(rows, args.png, title)
    if args.json:
        record = {"setup": title, "args": vars(args), "rows": rows, "notes": notes}
        args.json.write_text(json.dumps(record, indent=1, default=str))


if __name__ == "__main__":
    main()
