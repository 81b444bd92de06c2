"""The results table at our scale: every attention variant converted from SmolLM2-135M under one
token budget per stage, then scored beside the teacher (docs/results.md, issue 9).

    .venv/bin/python scripts/reproduce_small.py                 # the documented table (make reproduce-small)
    .venv/bin/python scripts/reproduce_small.py --rows teacher lolcats --steps 4 --limit 10   # a smoke run

Each row is one `python -m linearize stage=all ...` (or `stage=eval` for the teacher) in its own
run dir under --out, with the same training budget for every stage it runs (--steps optimizer
steps of --batch x --grad-accum rows of --seq-len tokens) and the same evaluation: PIQA, ARC-e,
ARC-c, HellaSwag, WinoGrande 0-shot on the first --limit items, MMLU 5-shot on --mmlu-limit
questions per subject, WikiText-2 perplexity on --ppl-tokens tokens. The runs resume: rerun the
same command after an interruption and the stages finished with these settings are skipped (by
their fingerprints: a stage made with other settings runs again; a row's wall time adds up over
its runs). At the end the table is written as markdown, json and a PNG chart. With --rows a
subset and --json an existing table of the same budget, the rows not run keep their figures from
that file, so one row can be rerun after a change without rerunning the others.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["piqa", "arc_easy", "arc_challenge", "hellaswag", "winogrande", "mmlu"]
TASK_NAMES = {"piqa": "PIQA", "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "hellaswag": "HellaSwag",
              "winogrande": "WinoGrande", "mmlu": "MMLU"}  # fmt: skip


@dataclass
class Row:
    name: str
    label: str
    overrides: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)  # trained stages, in order; [] for the teacher


ROWS = [
    Row("teacher", "teacher (softmax)"),
    Row("elu-lora", "elu, LoRA only (no transfer)", ["attention=elu", "finetune.start=swap"], ["finetune"]),
    Row("t2r", "t2r, transfer + LoRA", ["attention=t2r"], ["transfer", "finetune"]),
    Row("hedgehog", "hedgehog, transfer + LoRA", ["attention=hedgehog"], ["transfer", "finetune"]),
    Row("lolcats", "lolcats (window 64), transfer + LoRA", ["attention=lolcats", "attention.sinks=0"],
        ["transfer", "finetune"]),  # fmt: skip
    Row("lolcats-sinks", "lolcats + 4 sinks, transfer + LoRA", ["attention=lolcats", "attention.sinks=4"],
        ["transfer", "finetune"]),  # fmt: skip
    Row("liger", "liger, LoRA only", ["recipe=liger"], ["finetune"]),
    Row("lolcats-keep2", "lolcats + 2 worst layers softmax", ["attention=lolcats", "attention.sinks=0",
        "attention.keep_softmax=2"], ["transfer", "finetune"]),  # fmt: skip
    Row("supra-uptrain", "supra, uptrain (all weights)", ["recipe=supra"], ["uptrain"]),
    Row("supra-transfer", "supra, transfer + LoRA", ["attention=supra"], ["transfer", "finetune"]),
    Row("deltanet", "deltanet, transfer + LoRA", ["attention=deltanet"], ["transfer", "finetune"]),
    Row("gated-deltanet", "gated deltanet, transfer + LoRA", ["attention=gated_deltanet"], ["transfer", "finetune"]),
    Row("deltanet-window", "deltanet + window 64, transfer + LoRA", ["attention=deltanet", "attention.window=64"],
        ["transfer", "finetune"]),  # fmt: skip
    Row("gated-deltanet-window", "gated deltanet + window 64, transfer + LoRA",
        ["attention=gated_deltanet", "attention.window=64"], ["transfer", "finetune"]),  # fmt: skip
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "reproduce-small", help="run dirs go here")
    p.add_argument("--rows", nargs="*", default=[r.name for r in ROWS], help="a subset, by name")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per training stage")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per packed row")
    p.add_argument("--max-examples", type=int, default=4000, help="instruction records read")
    p.add_argument("--limit", type=int, default=100, help="items per 0-shot task")
    p.add_argument("--mmlu-limit", type=int, default=1, help="MMLU questions per subject (57 subjects)")
    p.add_argument("--ppl-tokens", type=int, default=16384, help="WikiText-2 tokens for perplexity")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--markdown", type=Path, help="write the table here too")
    p.add_argument("--json", type=Path, help="write the table's figures here")
    p.add_argument("--png", type=Path, help="write the chart here")
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every row, e.g. run.device=cuda")
    args = p.parse_args(argv)
    unknown = sorted(set(args.rows) - {r.name for r in ROWS})
    if unknown:
        p.error(f"unknown rows {unknown}; rows: {', '.join(r.name for r in ROWS)}")
    return args


def budget(args, steps: int | None = None) -> list[str]:
    """The training overrides: ``steps`` (default --steps) optimizer steps of --batch x
    --grad-accum rows of --seq-len tokens, validated 4 times."""
    steps = args.steps if steps is None else steps
    return [
        f"train.max_steps={steps}", f"train.batch_size={args.batch}", f"train.grad_accum={args.grad_accum}",
        f"data.seq_len={args.seq_len}", f"data.max_examples={args.max_examples}",
        f"train.eval_every={max(steps // 4, 1)}", "train.eval_batches=4",
    ]  # fmt: skip


def evaluation(args, tasks=None, task_limits=None) -> list[str]:
    """The eval overrides: ``tasks`` (default TASKS, MMLU at --mmlu-limit) on --limit items each,
    WikiText-2 on --ppl-tokens."""
    tasks = TASKS if tasks is None else tasks
    task_limits = {"mmlu": args.mmlu_limit} if task_limits is None else task_limits
    return [
        f"eval.tasks=[{','.join(tasks)}]", f"eval.limit={args.limit}", f"eval.ppl_tokens={args.ppl_tokens}",
        f"eval.batch_size={args.eval_batch}", *(f"+eval.task_limits.{t}={n}" for t, n in task_limits.items() if t in tasks),
    ]  # fmt: skip


def command(row: Row, args) -> list[str]:
    run = [f"run.dir={args.out / row.name}", "model=smollm2-135m", *args.extra]
    pipeline = f"pipeline=[{','.join([*row.stages, 'eval'])}]"
    if not row.stages:  # a run dir with no converted model: eval scores the teacher alone
        return ["stage=all", *run, pipeline, *evaluation(args), "eval.teacher=true"]
    return ["stage=all", *run, *row.overrides, pipeline, *budget(args), *evaluation(args), "eval.teacher=false"]


def run_linearize(overrides: list[str], run_dir: Path, tag: str) -> bool:
    """``python -m linearize <overrides>``, its wall time added to ``run_dir/wall_seconds.json``
    (so a run resumed over several calls counts all of them); False when it failed. With
    ``stage=all``, the stages already done with these settings are skipped, so rerunning a
    finished command costs a few seconds."""
    cmd = [sys.executable, "-m", "linearize", *overrides]
    print(f"[{tag}] {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT)
    wall = run_dir / "wall_seconds.json"
    before = json.loads(wall.read_text())["seconds"] if wall.is_file() else 0.0
    run_dir.mkdir(parents=True, exist_ok=True)
    wall.write_text(json.dumps({"seconds": before + time.perf_counter() - start}))
    if done.returncode != 0:
        print(f"[{tag}] failed (exit {done.returncode}); see {run_dir / 'linearize.log'}", flush=True)
    return done.returncode == 0


def run_row(row: Row, args) -> bool:
    """Run (or resume) one row; False when its command failed."""
    return run_linearize(command(row, args), args.out / row.name, row.name)


def report_scores(run_dir: Path, side: str) -> dict:
    """``{task: score}`` of one side (``teacher``/``converted``) of ``run_dir``'s eval report."""
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    return {r["task"]: r.get(side) for r in report["rows"] if "metric" in r}


def collect(row: Row, args) -> dict:
    run_dir = args.out / row.name
    scores = report_scores(run_dir, "teacher" if not row.stages else "converted")
    out = {"name": row.name, "label": row.label, "stages": row.stages, "scores": scores,
           "wall_seconds": json.loads((run_dir / "wall_seconds.json").read_text())["seconds"]}  # fmt: skip
    out["tokens_per_stage"] = args.steps * args.batch * args.grad_accum * args.seq_len if row.stages else 0
    result = run_dir / "transfer" / "result.json"
    if result.is_file():
        r = json.loads(result.read_text())
        out["transfer_mse"] = transfer_mse(r)
        out["kept_softmax"] = r["kept_softmax"]
    return out


def transfer_mse(result: dict) -> float:
    """The mean final stage-1 validation MSE over the layers left linear, from a transfer stage's
    result.json."""
    linear = [result["val_mse_per_layer"][str(i)] for i in result["swapped"]]
    return sum(linear) / len(linear)


def table(rows: list[dict]) -> str:
    teacher_avg = next((r["scores"].get("average") for r in rows if r["name"] == "teacher"), None)
    head = ["row", "tokens / stage", "wall min", "stage-1 val MSE", "WikiText-2 PPL",
            *(TASK_NAMES[t] for t in TASKS), "average", "kept"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(x, digits=3):
        return "–" if x is None else f"{x:.{digits}f}"

    for r in rows:
        s, avg = r["scores"], r["scores"].get("average")
        kept = f"{100 * avg / teacher_avg:.1f}%" if avg is not None and teacher_avg else "–"
        mse = f"{r['transfer_mse']:.4f}" if "transfer_mse" in r else "–"
        tokens = f"{r['tokens_per_stage']:,}" if r["tokens_per_stage"] else "–"
        cells = [r["label"], tokens, f"{r['wall_seconds'] / 60:.1f}", mse, f(s.get("wikitext2"), 2),
                 *(f(s.get(t)) for t in TASKS), f(avg), kept]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["name"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    avg = [r["scores"].get("average") or 0.0 for r in rows]
    ax1.bar(labels, avg, color=["#555" if r["name"] == "teacher" else "#3b7dd8" for r in rows])
    ax1.set_ylabel("average task score (6 tasks)")
    ax1.set_ylim(min(avg) * 0.9 if avg else 0, max(avg) * 1.05 if avg else 1)
    ppl = [r["scores"].get("wikitext2") or float("nan") for r in rows]
    ax2.bar(labels, ppl, color=["#555" if r["name"] == "teacher" else "#d8843b" for r in rows])
    ax2.set_yscale("log")
    ax2.set_ylabel("WikiText-2 perplexity (log)")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", rotation=45)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    fig.suptitle("SmolLM2-135M converted under one token budget per stage")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# the options that make the figures (where they are written to does not)
BUDGET_KEYS = ("steps", "batch", "grad_accum", "seq_len", "max_examples", "limit", "mmlu_limit", "ppl_tokens",
               "eval_batch", "extra")  # fmt: skip


def budget_of(args) -> dict:
    return {k: getattr(args, k) for k in BUDGET_KEYS}


def merge(figures: list[dict], path: Path | None, args) -> list[dict]:
    """figures, plus the rows not run now taken from the table at path, in the order of ROWS.

    Refuses a table made under another budget: its rows would not be comparable to the new ones.
    """
    if path is None or not path.is_file() or set(args.rows) == {r.name for r in ROWS}:
        return figures
    old = json.loads(path.read_text())
    theirs = {k: old["budget"].get(k) for k in BUDGET_KEYS}
    if theirs != budget_of(args):
        sys.exit(f"{path} was made under another budget ({theirs}) than this run ({budget_of(args)}); "
                 "write this table elsewhere (--json/--markdown/--png) or run every row")  # fmt: skip
    by_name = {r["name"]: r for r in old["rows"]} | {r["name"]: r for r in figures}
    return [by_name[r.name] for r in ROWS if r.name in by_name]


def main() -> None:
    args = parse_args()
    rows = [r for r in ROWS if r.name in args.rows]
    failed = [row.name for row in rows if not run_row(row, args)]  # a failed row does not stop the others
    figures = merge([collect(row, args) for row in rows if row.name not in failed], args.json, args)
    text = table(figures)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"budget": budget_of(args), "rows": figures}, indent=1))
    if args.png:
        chart(figures, args.png)
    if failed:
        sys.exit(f"rows failed: {', '.join(failed)}; rerun the same command to resume them")


if __name__ == "__main__":
    main()
