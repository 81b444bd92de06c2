"""Which feature map and which source of the write strength β (and decay α) the delta-rule kinds
default to: stage 1 alone on SmolLM2-135M at the results table's budget, one run per candidate,
ranked by the mean final validation MSE over the layers (docs/results.md, "The delta rule").

    .venv/bin/python scripts/choose_delta.py --markdown docs/choose_delta.md --json docs/choose_delta.json
    .venv/bin/python scripts/choose_delta.py --candidates deltanet-hedgehog-proj --steps 2   # a smoke run

Each candidate is one `python -m linearize stage=transfer ...` in its own run dir under --out,
with reproduce_small's training budget (the same options and defaults), so the winner's MSE is
comparable to the table's stage-1 column. The runs resume like the table's: rerun the same
command and the finished candidates cost seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_small import ROOT, budget, run_linearize, transfer_mse  # noqa: E402

# name -> overrides; the feature maps on the ungated rule with projected rates, then the rates'
# source on the gated rule (where both β and α come from it)
CANDIDATES = {
    "deltanet-hedgehog-proj": ["attention=deltanet", "attention.feature_map=hedgehog", "attention.delta_rates=proj"],
    "deltanet-t2r-proj": ["attention=deltanet", "attention.feature_map=t2r", "attention.delta_rates=proj"],
    "deltanet-identity-proj": ["attention=deltanet", "attention.feature_map=identity", "attention.delta_rates=proj"],
    "gated-hedgehog-proj": ["attention=gated_deltanet", "attention.feature_map=hedgehog", "attention.delta_rates=proj"],
    "gated-hedgehog-key": ["attention=gated_deltanet", "attention.feature_map=hedgehog", "attention.delta_rates=key"],
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "choose-delta", help="run dirs go here")
    p.add_argument("--candidates", nargs="*", default=list(CANDIDATES), help="a subset, by name")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps of stage 1")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--max-examples", type=int, default=4000, help="instruction records read")
    p.add_argument("--markdown", type=Path, help="write the table here too")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every candidate")
    args = p.parse_args(argv)
    unknown = sorted(set(args.candidates) - set(CANDIDATES))
    if unknown:
        p.error(f"unknown candidates {unknown}; candidates: {', '.join(CANDIDATES)}")
    return args


def figures(name: str, run_dir: Path) -> dict:
    r = json.loads((run_dir / "transfer" / "result.json").read_text())
    per_layer = {int(i): r["val_mse_per_layer"][str(i)] for i in r["swapped"]}
    worst = max(per_layer, key=per_layer.get)
    return {"name": name, "overrides": CANDIDATES[name], "mean_mse": transfer_mse(r),
            "worst_layer": worst, "worst_mse": per_layer[worst], "per_layer": per_layer}  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = ["| candidate | overrides | mean stage-1 val MSE | worst layer (MSE) |", "|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["mean_mse"]):
        overrides = " ".join(f"`{o}`" for o in r["overrides"])
        lines.append(f"| {r['name']} | {overrides} | {r['mean_mse']:.4f} | {r['worst_layer']} ({r['worst_mse']:.4f}) |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    done, failed = [], []
    for name in args.candidates:
        run_dir = args.out / name
        overrides = ["stage=transfer", f"run.dir={run_dir}", "model=smollm2-135m", *CANDIDATES[name],
                     *budget(args), *args.extra]  # fmt: skip
        (done if run_linearize(overrides, run_dir, name) else failed).append(name)
    rows = [figures(name, args.out / name) for name in done]
    text = table(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        budget_used = {k: getattr(args, k) for k in ("steps", "batch", "grad_accum", "seq_len", "max_examples", "extra")}
        args.json.write_text(json.dumps({"budget": budget_used, "rows": rows}, indent=1))
    if failed:
        sys.exit(f"candidates failed: {', '.join(failed)}; rerun the same command to resume them")


if __name__ == "__main__":
    main()
