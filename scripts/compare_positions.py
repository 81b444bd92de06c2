"""Loss by position of several evaluated run dirs on one chart and in one table (docs/quality.md).

    .venv/bin/python scripts/compare_positions.py runs/pos-teacher:teacher runs/a:before runs/b:after \\
        --png docs/quality_position.png

Each argument is ``<run dir>[:<label>]``; its ``eval/report.json`` must hold the WikiText-2 loss
by position (``eval.ppl_buckets``). A run dir that scored the teacher alone gives the teacher's
curve; any other gives its converted model's. Compare runs scored with the same eval settings
(the script refuses buckets that differ); ``eval.ppl_stride=eval.ppl_seq_len`` puts the same
text in every bucket.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from linearize.evaluate.report import bucket_label, position_chart  # noqa: E402


def curve(run_dir: Path) -> list[dict]:
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    row = next((r for r in report["rows"] if r.get("by_position")), None)
    if row is None:
        sys.exit(f"{run_dir}/eval/report.json holds no loss by position: evaluate with eval.ppl_buckets set")
    side = "converted" if "converted" in row["by_position"] else "teacher"
    return row["by_position"][side]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="<run dir>[:<label>]")
    p.add_argument("--png", type=Path, help="write the chart here")
    p.add_argument("--title", default="WikiText-2 loss by position")
    args = p.parse_args()
    curves = {}
    for spec in args.runs:
        path, _, label = spec.partition(":")
        curves[label or Path(path).name] = curve(Path(path))
    edges = {label: [(b["from"], b["to"]) for b in c] for label, c in curves.items()}
    if len({tuple(e) for e in edges.values()}) > 1:
        sys.exit(f"the runs were scored with other position buckets: {edges}")
    labels = list(curves)
    print("| positions | tokens | " + " | ".join(f"{lab} loss" for lab in labels) + " | "
          + " | ".join(f"{lab} ppl" for lab in labels) + " |")  # fmt: skip
    print("|---|---|" + "---|" * (2 * len(labels)))
    for i, b in enumerate(curves[labels[0]]):
        nll = [curves[lab][i]["nll"] for lab in labels]
        cells = [bucket_label(b), str(b["tokens"]), *(f"{v:.4f}" for v in nll), *(f"{math.exp(v):.2f}" for v in nll)]
        print("| " + " | ".join(cells) + " |")
    if args.png:
        position_chart(curves, args.png, args.title)


if __name__ == "__main__":
    main()
