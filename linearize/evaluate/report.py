"""The side-by-side report: teacher vs converted model, as a table, json and a bar chart."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def compare(teacher: Optional[dict[str, Any]], converted: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task (and perplexity): each model's value, the difference, the share kept.

    Either side may be absent (``eval.teacher=false``, or no converted model yet); difference
    and share need both. ``share`` is converted / teacher for scores, teacher / converted for
    perplexity (lower is better), so 1.0 means fully kept either way. Skipped tasks keep their
    reason.
    """
    sides = {"teacher": teacher or {}, "converted": converted or {}}
    rows = []
    for task in dict.fromkeys([*sides["teacher"], *sides["converted"]]):
        results = {side: scores[task] for side, scores in sides.items() if task in scores}
        skipped = next((r["skipped"] for r in results.values() if "skipped" in r), None)
        if skipped is not None:
            rows.append({"task": task, "skipped": skipped})
            continue
        row: dict[str, Any] = {"task": task, "metric": next(iter(results.values()))["metric"]}
        row.update({side: r["value"] for side, r in results.items()})
        by_position = {side: r["by_position"] for side, r in results.items() if r.get("by_position")}
        if by_position:
            row["by_position"] = by_position
        rows.append(_with_share(row))
    scored = [r for r in rows if "metric" in r and r["metric"] != "ppl"]
    if scored:
        avg: dict[str, Any] = {"task": "average", "metric": "mean score"}
        for side in sides:
            if all(side in r for r in scored):
                avg[side] = sum(r[side] for r in scored) / len(scored)
        rows.append(_with_share(avg))
    return rows


def _with_share(row: dict[str, Any]) -> dict[str, Any]:
    """Add the difference and the share kept when the row has both models' values."""
    t, c = row.get("teacher"), row.get("converted")
    if t is None or c is None:
        return row
    row["difference"] = c - t
    if row["metric"] == "ppl":
        row["share"] = t / c if c else None
    else:
        row["share"] = c / t if t else None
    return row


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    def fmt(value, pct=False):
        if value is None:
            return "–"
        return f"{100 * value:.1f}%" if pct else f"{value:.4g}"

    lines = [f"### {title}", "", "| task | metric | teacher | converted | difference | kept |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['task']} | skipped: {r['skipped']} | | | | |")
        else:
            lines.append(
                f"| {r['task']} | {r['metric']} | {fmt(r.get('teacher'))} | {fmt(r.get('converted'))} | "
                f"{fmt(r.get('difference'))} | {fmt(r.get('share'), pct=True)} |"
            )
    for r in rows:
        if r.get("by_position"):
            lines += ["", *position_table(r["by_position"], r["task"])]
    return "\n".join(lines) + "\n"


def bucket_label(bucket: dict[str, Any]) -> str:
    return f"{bucket['from']}–{bucket['to']}" if bucket["to"] is not None else f"{bucket['from']}+"


def position_table(by_position: dict[str, list[dict[str, Any]]], task: str) -> list[str]:
    """Mean next-token loss (nats) per position bucket, teacher beside the converted model."""
    sides = list(by_position)
    labels = list(dict.fromkeys(bucket_label(b) for side in sides for b in by_position[side]))
    lines = [f"Loss by position ({task}, mean nats per token; position = tokens of context)", "",
             "| positions | tokens | " + " | ".join(sides) + " | ppl " + " | ppl ".join(sides) + " |",
             "|---|---|" + "---|" * (2 * len(sides))]  # fmt: skip
    for label in labels:
        found = [next((b for b in by_position[side] if bucket_label(b) == label), None) for side in sides]
        nll = [b["nll"] if b else None for b in found]
        cells = [str(next((b["tokens"] for b in found if b), "–"))]
        cells += [f"{v:.4f}" if v is not None else "–" for v in nll]
        cells += [f"{math.exp(v):.4g}" if v is not None else "–" for v in nll]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "(With eval.ppl_stride < eval.ppl_seq_len only the first window scores positions below "
              "seq_len - stride, so those buckets hold other text than the later ones; compare teacher and "
              "converted within a bucket, or set eval.ppl_stride=eval.ppl_seq_len for the same text in every bucket.)"]  # fmt: skip
    return lines


def position_chart(by_position: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for side, buckets in by_position.items():
        ax.plot([bucket_label(b) for b in buckets], [b["nll"] for b in buckets], marker="o", label=side)
    ax.set(xlabel="position in the window (tokens of context)", ylabel="mean next-token loss (nats)", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    scored = [r for r in rows if "metric" in r and r["metric"] != "ppl"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(scored) + 2), 4))
    xs = range(len(scored))
    if any("teacher" in r for r in scored):
        ax.bar([x - 0.2 for x in xs], [r.get("teacher", 0.0) for r in scored], width=0.4, label="teacher")
    if any("converted" in r for r in scored):
        ax.bar([x + 0.2 for x in xs], [r.get("converted", 0.0) for r in scored], width=0.4, label="converted")
    ax.set_xticks(list(xs), [f"{r['task']}\n({r['metric']})" for r in scored], fontsize=8)
    ax.set(ylabel="score", title=title, ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str, meta: dict[str, Any]) -> str:
    """``report.md``, ``report.json`` and ``report.png`` in ``out_dir``; returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, title)
    layers = meta.get("layers")
    if layers:
        text += (f"\nConverted attention layers: {layers['converted']}; kept as the teacher's own: "
                 f"{layers['kept'] or 'none'}.\n")  # fmt: skip
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bar_chart(rows, out_dir / "report.png", title)
    for r in rows:
        if r.get("by_position"):
            position_chart(r["by_position"], out_dir / "position.png", f"{title}: loss by position")
    return text
