"""Where the teacher's softmax attention goes: the share of each head's attention weight on the
first keys of the sequence (the sinks), inside the last `window` keys, and elsewhere (what a
window hybrid's linear part has to reproduce). docs/quality.md.

    .venv/bin/python scripts/attention_mass.py                          # SmolLM2-135M, 768 tokens
    .venv/bin/python scripts/attention_mass.py --tokens 1024 --sinks 1 --window 64

The text is WikiText-2 raw test from `data_dir` (from character --offset on, so that the window
does not start at an article's beginning: the sink is a position, not a token). Weights are the
eager attention's, averaged over queries from --from-position on.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linearize.config import register_configs, validate  # noqa: E402
from linearize.evaluate.perplexity import wikitext2_text  # noqa: E402
from linearize.models.load import load_teacher, load_tokenizer  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="a configs/model name")
    p.add_argument("--tokens", type=int, default=768)
    p.add_argument("--offset", type=int, default=20000, help="first character of the text used")
    p.add_argument("--from-position", type=int, default=256, help="queries from this position on")
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data_dir=...")
    args = p.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = validate(compose("config", overrides=[f"model={args.model}", *args.overrides]))
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"))
    model.config._attn_implementation = "eager"  # the weights themselves
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    text = wikitext2_text(cfg.data_dir)[args.offset :]
    ids = tokenizer(text[: 20 * args.tokens], return_tensors="pt").input_ids[:, : args.tokens]
    if ids.shape[1] <= args.from_position:
        sys.exit(f"only {ids.shape[1]} tokens: lower --from-position or --offset")
    with torch.no_grad():
        weights = model(input_ids=ids, output_attentions=True).attentions  # per layer (1, H, T, T)
    t = ids.shape[1]
    pos = torch.arange(args.from_position, t)[:, None]
    dist = pos - torch.arange(t)[None, :]
    window = (dist >= 0) & (dist < args.window)
    sink = (torch.arange(t) < args.sinks)[None, :] & ~window
    sink_mass = torch.stack([(a[0, :, args.from_position :] * sink).sum(-1).mean(-1) for a in weights])  # (L, H)
    window_mass = torch.stack([(a[0, :, args.from_position :] * window).sum(-1).mean(-1) for a in weights])
    rest = 1 - sink_mass - window_mass
    print(f"{args.model}, {t} tokens, queries {args.from_position}..{t - 1}: mean share of attention weight per head")
    print(f"  on the first {args.sinks} keys (sinks): {sink_mass.mean():.3f}")
    print(f"  in the last {args.window} keys (window): {window_mass.mean():.3f}")
    print(f"  elsewhere (the linear part's):        {rest.mean():.3f}")
    print(f"  heads with more than half on the sinks: {(sink_mass > 0.5).sum().item()} of {sink_mass.numel()}")
    print("layer | sinks (mean over heads) | window | elsewhere")
    for i in range(sink_mass.shape[0]):
        print(f"{i:5d} | {sink_mass[i].mean():.3f} | {window_mass[i].mean():.3f} | {rest[i].mean():.3f}")


if __name__ == "__main__":
    main()
