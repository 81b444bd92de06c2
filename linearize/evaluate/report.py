"""The side-by-side report: teacher vs converted model, as a table, json and a bar chart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def compare(teacher: dict[str, Any], converted: Optional[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task (and perplexity): both values, the difference, the share kept.

    ``share`` is converted / teacher for scores, teacher / converted for perplexity (lower is
    better), so 1.0 means fully kept either way. Skipped tasks keep their reason.
    """
    rows = []
    for task, t in teacher.items():
        c = (converted or {}).get(task)
        row: dict[str, Any] = {"task": task}
        if "skipped" in t:
            rows.append({**row, "skipped": t["skipped"]})
            continue
        row.update(metric=t["metric"], teacher=t["value"])
        if c is not None and "skipped" not in c:
            row["converted"] = c["value"]
            row["difference"] = c["value"] - t["value"]
            lower_better = t["metric"] == "ppl"
            row["share"] = (t["value"] / c["value"]) if lower_better else (c["value"] / t["value"] if t["value"] else None)
        rows.append(row)
    scored = [r for r in rows if "teacher" in r and r.get("metric") != "ppl"]
    if scored:
        avg: dict[str, Any] = {"task": "average", "metric": "mean score",
                               "teacher": sum(r["teacher"] for r in scored) / len(scored)}  # fmt: skip
        if all("converted" in r for r in scored):
            avg["converted"] = sum(r["converted"] for r in scored) / len(scored)
            avg["difference"] = avg["converted"] - avg["teacher"]
            avg["share"] = avg["converted"] / avg["teacher"] if avg["teacher"] else None
        rows.append(avg)
    return rows


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
                f"| {r['task']} | {r['metric']} | {fmt(r['teacher'])} | {fmt(r.get('converted'))} | "
                f"{fmt(r.get('difference'))} | {fmt(r.get('share'), pct=True)} |"
            )
    return "\n".join(lines) + "\n"


def bar_chart(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    scored = [r for r in rows if "teacher" in r and r["metric"] != "ppl"]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(scored) + 2), 4))
    xs = range(len(scored))
    ax.bar([x - 0.2 for x in xs], [r["teacher"] for r in scored], width=0.4, label="teacher")
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
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    bar_chart(rows, out_dir / "report.png", title)
    return text
