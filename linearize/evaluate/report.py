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
        rows.append(_mean_row(scored, sides, task="average", metric="mean score"))
    return rows


def _mean_row(rows: list[dict[str, Any]], sides, **fields: Any) -> dict[str, Any]:
    """``fields`` plus each side's mean over ``rows`` (for the sides every row has), with the
    difference and share kept."""
    mean: dict[str, Any] = dict(fields)
    for side in sides:
        if all(side in r for r in rows):
            mean[side] = sum(r[side] for r in rows) / len(rows)
    return _with_share(mean)


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


def _cell(value: Optional[float], pct: bool = False, spec: str = ".4g") -> str:
    """A table cell: "–" for no value, a percentage, or the value in ``spec``."""
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if pct else format(value, spec)


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    lines = [f"### {title}", "", "| task | metric | teacher | converted | difference | kept |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['task']} | skipped: {r['skipped']} | | | | |")
        else:
            lines.append(
                f"| {r['task']} | {r['metric']} | {_cell(r.get('teacher'))} | {_cell(r.get('converted'))} | "
                f"{_cell(r.get('difference'))} | {_cell(r.get('share'), pct=True)} |"
            )
    for r in rows:
        if r.get("by_position"):
            lines += ["", *position_table(r["by_position"], r["task"]), "", STRIDE_NOTE]
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
    return lines


STRIDE_NOTE = ("(With eval.ppl_stride < eval.ppl_seq_len only the first window scores positions below "
               "seq_len - stride, so those buckets hold other text than the later ones; compare teacher and "
               "converted within a bucket, or set eval.ppl_stride=eval.ppl_seq_len for the same text in every bucket.)")  # fmt: skip


def position_chart(by_position: dict[str, list[dict[str, Any]]], path: Path, title: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    draw_positions(ax, by_position, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_positions(ax, by_position: dict[str, list[dict[str, Any]]], title: str) -> None:
    for side, buckets in by_position.items():
        ax.plot([bucket_label(b) for b in buckets], [b["nll"] for b in buckets], marker="o", label=side)
    ax.set(xlabel="position in the window (tokens of context)", ylabel="mean next-token loss (nats)", title=title)
    ax.legend()


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
    if scored:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare_long(teacher: Optional[dict[str, Any]], converted: Optional[dict[str, Any]]) -> dict[str, Any]:
    """The long-context section (:func:`linearize.evaluate.long.long_score` of each side): one
    RULER row per task and length plus each length's mean over the tasks, each model's value and
    the share kept; the loss by position of both sides."""
    sides = {side: v for side, v in (("teacher", teacher), ("converted", converted)) if v}
    ruler = {side: v.get("ruler", {}) for side, v in sides.items()}
    lengths = list(dict.fromkeys(n for v in sides.values() for n in v["lengths"]))
    tasks = list(dict.fromkeys(t for r in ruler.values() for t in r))
    rows = []
    for task in tasks:
        for n in lengths:
            row: dict[str, Any] = {"task": task, "length": n, "metric": "recall"}
            for side, r in ruler.items():
                found = r.get(task, {}).get(str(n))
                if found is not None:
                    row[side], row["n"] = found["value"], found["n"]
            rows.append(_with_share(row))
    for n in lengths:
        at = [r for r in rows if r["length"] == n]
        if at:
            rows.append(_mean_row(at, sides, task="mean", length=n, metric="recall"))
    position = {side: v["position"] for side, v in sides.items() if "position" in v}
    skipped = next((p["skipped"] for p in position.values() if "skipped" in p), None)
    by_position = {side: p["by_position"] for side, p in position.items() if "by_position" in p}
    window = next((p["seq_len"] for p in position.values() if "seq_len" in p), None)
    return {"lengths": lengths, "ruler": rows, "by_position": {} if skipped else by_position,
            "position_skipped": skipped, "window": window}  # fmt: skip


def long_markdown(long: dict[str, Any]) -> str:
    lines = ["### Recall and long context", ""]
    if long["ruler"]:
        lines += ["RULER (lm-eval), greedy answers; recall = share of the expected strings found in the answer.",
                  "", "| task | length | samples | teacher | converted | kept |", "|---|---|---|---|---|---|"]  # fmt: skip
        for r in long["ruler"]:
            lines.append(f"| {r['task']} | {r['length']} | {r.get('n', '–')} | {_cell(r.get('teacher'), spec='.3f')} | "
                         f"{_cell(r.get('converted'), spec='.3f')} | {_cell(r.get('share'), pct=True)} |")  # fmt: skip
    if long["position_skipped"]:
        lines += ["", f"Loss by position: skipped: {long['position_skipped']}"]
    elif long["by_position"]:
        task = f"WikiText-2 in disjoint {long['window']}-token windows"
        lines += ["", *position_table(long["by_position"], task)]
    return "\n".join(lines) + "\n"


def long_chart(long: dict[str, Any], path: Path, title: str) -> Path:
    """Recall by length (each task thin, the mean thick; teacher solid, converted dashed) beside
    the loss by position in the longest windows."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    styles = {"teacher": "-", "converted": "--"}
    for i, task in enumerate(dict.fromkeys(r["task"] for r in long["ruler"])):
        at = [r for r in long["ruler"] if r["task"] == task]
        for side, style in styles.items():
            if all(side in r for r in at):
                left.plot([r["length"] for r in at], [r[side] for r in at], style, marker="o", color=f"C{i}",
                          linewidth=3 if task == "mean" else 1, label=f"{task} ({side})")  # fmt: skip
    left.set_xscale("log", base=2)
    left.set_xticks(long["lengths"], [str(n) for n in long["lengths"]])
    left.set(xlabel="context length (tokens)", ylabel="RULER recall", ylim=(-0.02, 1.02), title="recall by length")
    if long["ruler"]:
        left.legend(fontsize=6)
    if long["by_position"]:
        draw_positions(right, long["by_position"], "loss by position (long windows)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(rows: list[dict[str, Any]], out_dir: Path, title: str, meta: dict[str, Any],
                 long: Optional[dict[str, Any]] = None) -> str:
    """``report.md``, ``report.json`` and ``report.png`` in ``out_dir`` (and ``long.png`` with the
    long-context section, :func:`compare_long`'s result); returns the markdown."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = markdown(rows, title)
    if long:
        text += "\n" + long_markdown(long)
        long_chart(long, out_dir / "long.png", title)
    layers = meta.get("layers")
    if layers:
        text += (f"\nConverted attention layers: {layers['converted']}; kept as the teacher's own: "
                 f"{layers['kept'] or 'none'}.\n")  # fmt: skip
    (out_dir / "report.md").write_text(text)
    (out_dir / "report.json").write_text(json.dumps({"meta": meta, "rows": rows, **({"long": long} if long else {})}, indent=1))
    bar_chart(rows, out_dir / "report.png", title)
    for r in rows:
        if r.get("by_position"):
            position_chart(r["by_position"], out_dir / "position.png", f"{title}: loss by position")
    return text
