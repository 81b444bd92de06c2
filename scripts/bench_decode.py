"""Decoding after a long prompt: teacher (key/value cache) against the converted model (state).

    .venv/bin/python scripts/bench_decode.py                                  # SmolLM2-135M, lolcats
    .venv/bin/python scripts/bench_decode.py --contexts 1024 4096 --new-tokens 16 --png decode.png

For each context length: a prompt of that many random tokens is absorbed (the converted model:
one chunked forward; the teacher: one SDPA forward filling its key/value cache), then
``--new-tokens`` tokens are decoded greedily one at a time with the cache. Reported: decode
tokens/s; the bytes the cache holds after decoding (exact, from its tensors); memory held after
the prompt above the level before it, and the decode loop's own peak above that. On CPU memory
is the resident set size (sampled every millisecond), measured after ``malloc_trim`` has
returned what the allocator kept from earlier calls, so it counts live tensors.

The teacher's prefill is quadratic in the context. With ``--teacher-prefill-max N`` teacher
prompts longer than N tokens are replaced by a cache of random keys and values of the right
shape (marked ``synthetic``); a decode step costs the same whatever the cached values are. The converted model
always runs its real prefill. Speed and memory do not depend on trained weights, so the
converted model is the teacher with freshly initialised attention unless ``--converted`` names
a converted directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib import PeakMemory, memory_now, release_freed_memory  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from linearize.config import register_configs, validate  # noqa: E402
from linearize.generate import cache_bytes  # noqa: E402
from linearize.models.convert import apply_converted  # noqa: E402
from linearize.models.load import load_teacher, resolve_device  # noqa: E402
from linearize.models.swap import swap_attention  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def synthetic_kv_cache(model, context: int, device: torch.device) -> DynamicCache:
    """A teacher cache holding ``context`` random keys and values per layer."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    dtype = next(model.parameters()).dtype
    cache = DynamicCache(config=c)
    for i in range(c.num_hidden_layers):
        kv = torch.randn(1, c.num_key_value_heads, context, head_dim, dtype=dtype, device=device)
        cache.update(kv, kv.clone(), layer_idx=i)
    return cache


def measure(model, context: int, new_tokens: int, device: torch.device, synthetic: bool) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    _sync(device)
    release_freed_memory(device)
    before = memory_now(device)
    with torch.no_grad():
        start = time.perf_counter()
        if synthetic:
            cache = synthetic_kv_cache(model, context, device)
            logits = model(ids[:, -1:], cache=cache, logits_to_keep=1).logits
        else:
            cache = DynamicCache(config=model.config)
            logits = model(ids, cache=cache, logits_to_keep=1).logits
        _sync(device)
        prefill = time.perf_counter() - start
        token = logits[:, -1:].argmax(-1)
        del logits
        release_freed_memory(device)  # what the prompt left alive: the cache (and the token)
        with PeakMemory(device) as mem:
            start = time.perf_counter()
            for _ in range(new_tokens):
                token = model(token, cache=cache).logits[:, -1:].argmax(-1)
            _sync(device)
            decode = time.perf_counter() - start
    return {
        "context": context, "prefill": "synthetic" if synthetic else "real",
        "prefill_s": prefill, "decode_tokens_per_s": new_tokens / decode,
        "cache_mib": cache_bytes(cache) / 2**20,
        "held_mib": (mem.base - before) / 2**20,  # after the prompt, before decoding
        "decode_peak_mib": mem.peak / 2**20,  # the decode loop's own peak above that
    }  # fmt: skip


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in ("teacher", "converted"):
        mine = [r for r in rows if r["model"] == name]
        x = [r["context"] for r in mine]
        axes[0].plot(x, [r["decode_tokens_per_s"] for r in mine], marker="o", label=name)
        axes[1].plot(x, [r["cache_mib"] for r in mine], marker="o", label=name)
    for ax, title in zip(axes, ("decode tokens/s", "cache after decoding (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="a configs/model name")
    parser.add_argument("--attention", default="lolcats", help="a configs/attention name")
    parser.add_argument("--converted", type=Path, help="a converted directory to use instead")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--teacher-prefill-max", type=int, default=None,
                        help="longer teacher prompts get a synthetic key/value cache (default: none)")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--png", type=Path, help="write the chart here")
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = validate(compose("config", overrides=[f"model={args.model}", f"attention={args.attention}"]))
    device = resolve_device(args.device)
    teacher = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=device).eval()
    converted = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=device)
    if args.converted:
        converted = apply_converted(converted, args.converted)
    else:
        swap_attention(converted, cfg.attention)
    converted.eval()

    for model in (teacher, converted):  # warm-up: first calls allocate and initialise lazily
        measure(model, 64, 2, device, synthetic=False)
    rows = []
    for context in args.contexts:
        for name, model in (("teacher", teacher), ("converted", converted)):
            limit = args.teacher_prefill_max
            synthetic = name == "teacher" and limit is not None and context > limit
            row = {"model": name, **measure(model, context, args.new_tokens, device, synthetic)}
            rows.append(row)
            print(f"  {name:9} {context:6} tokens: {row['decode_tokens_per_s']:.1f} tokens/s, "
                  f"cache {row['cache_mib']:.1f} MiB", flush=True)  # fmt: skip

    where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{args.model}: teacher (KV cache) vs {args.converted or args.attention} (recurrent state), "
          f"{args.new_tokens} new tokens after each prompt, on {where}\n")  # fmt: skip
    print("| prompt tokens | model | prefill | prefill s | decode tokens/s | cache MiB | held after prompt MiB | decode peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['context']} | {r['model']} | {r['prefill']} | {r['prefill_s']:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['cache_mib']:.1f} | {r['held_mib']:.0f} | "
              f"{r['decode_peak_mib']:.0f} |")  # fmt: skip
    if args.png:
        plot(rows, args.png)
    if args.json:
        args.json.write_text(json.dumps({"device": where, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
