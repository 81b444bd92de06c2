"""The quality curve (docs/quality.md): lolcats converted from SmolLM2-135M at growing budgets of
total training tokens (stage 1 + stage 2), for each stage-2 objective, scored beside the teacher.

    .venv/bin/python scripts/quality_curve.py                  # the documented curve (hours; resumable)
    .venv/bin/python scripts/quality_curve.py --budgets 8192 --objectives ntp --limit 10 \\
        --ppl-tokens 2048 --out runs/quality-smoke              # a smoke run (minutes)

A point is (objective, total tokens): --stage1-share of the tokens go to attention transfer,
the rest to LoRA fine-tuning (lr --lr2) with ``finetune.objective=<objective>``, in steps of --batch x
--grad-accum rows of --seq-len tokens. The stage-1 model of a budget is made once, in its own run
dir (``stage1-<N>k``, where it is also scored alone on perplexity), and copied into the run dir of
every objective's point at that budget; a point's wall minutes count that stage 1 and its stage 2.
First every objective runs at the --compare budgets; the one with the lowest WikiText-2
perplexity at the largest of them (the best objective) then runs at every --budgets budget as
well. Each point is scored on the first --limit items of PIQA, ARC-Easy and HellaSwag (0-shot)
and on --ppl-tokens WikiText-2 tokens, as is the teacher.

Every run is a ``python -m linearize stage=all ...``: rerun the same command after an
interruption and the stages already done with these settings are skipped; a killed stage
resumes from its checkpoint. The options that make the figures are written to
``<out>/budget.json``; a later call with other ones is refused (its points would not be
comparable). The table (markdown, json) and the curve (PNG) are rewritten after every point, and
the --json file carries the figures to a later session: a point (or the teacher) it holds, made
with these settings, is not run again, even where its run dir is gone.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_small import ROOT, TASK_NAMES, budget, evaluation, report_scores, run_linearize  # noqa: E402

from linearize.config import OBJECTIVES  # noqa: E402
from linearize.rundir import read_manifest  # noqa: E402

TASKS = ["piqa", "arc_easy", "hellaswag"]


@dataclass(frozen=True)
class Point:
    objective: str
    tokens: int  # total training tokens, both stages

    @property
    def name(self) -> str:
        return f"{self.objective}-{self.tokens // 1000}k"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "quality-curve", help="run dirs go here")
    p.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    p.add_argument("--compare", nargs="+", type=int, default=[50_000, 100_000],
                   help="total-token budgets every objective runs at")  # fmt: skip
    p.add_argument("--budgets", nargs="+", type=int, default=[50_000, 100_000, 200_000, 500_000],
                   help="total-token budgets the best objective runs at")  # fmt: skip
    p.add_argument("--stage1-share", type=float, default=0.5, help="share of the tokens spent in stage 1")
    p.add_argument("--lr2", type=float, default=1e-3, help="stage-2 learning rate (stage 1: its default, 1e-2)")
    p.add_argument("--sinks", type=int, default=4, help="attention.sinks of the lolcats hybrid")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch")
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (the eval window: 1024)")
    p.add_argument("--max-examples", type=int, default=4000, help="instruction records read")
    p.add_argument("--limit", type=int, default=500, help="items per task")
    p.add_argument("--ppl-tokens", type=int, default=32768, help="WikiText-2 tokens for perplexity")
    p.add_argument("--eval-batch", type=int, default=16)
    p.add_argument("--extra", nargs="*", default=[], help="more overrides for every run, e.g. run.device=cuda")
    p.add_argument("--table-only", action="store_true", help="write the table from the points done; run nothing")
    p.add_argument("--markdown", type=Path, help="write the table here too")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--png", type=Path, help="write the curve here")
    args = p.parse_args(argv)
    if not 0 < args.stage1_share < 1:
        p.error(f"--stage1-share={args.stage1_share} must be in (0, 1): both stages get tokens")
    small = [b for b in [*args.compare, *args.budgets] if b < 2 * args.batch * args.grad_accum * args.seq_len]
    if small:
        p.error(f"budgets {small} are under 2 optimizer steps of {args.batch * args.grad_accum * args.seq_len} "
                "tokens: one step per stage at least")  # fmt: skip
    return args


BUDGET_KEYS = ("stage1_share", "lr2", "sinks", "batch", "grad_accum", "seq_len", "max_examples", "limit", "ppl_tokens",
               "eval_batch", "extra")  # fmt: skip


def tokens_per_step(args) -> int:
    return args.batch * args.grad_accum * args.seq_len


def steps(point: Point, args) -> tuple[int, int]:
    """Optimizer steps of stage 1 and stage 2 that spend the point's tokens (at least 1 each)."""
    total = point.tokens / tokens_per_step(args)
    first = max(round(total * args.stage1_share), 1)
    return first, max(round(total) - first, 1)


def eval_overrides(args) -> list[str]:
    return evaluation(args, tasks=TASKS, task_limits={})


def stage1_dir(point: Point, args) -> Path:
    return args.out / f"stage1-{point.tokens // 1000}k"


def run_point(point: Point, args) -> bool:
    """Stage 1 of the point's budget (once for every objective) and its perplexity alone, then
    the point's stage 2 and its full evaluation."""
    run_dir, s1_dir = args.out / point.name, stage1_dir(point, args)
    s1, s2 = steps(point, args)
    model = ["stage=all", "model=smollm2-135m", "attention=lolcats", f"attention.sinks={args.sinks}", *args.extra]
    stage1 = [*model, f"run.dir={s1_dir}", "pipeline=[transfer,eval]", *budget(args, s1), "eval.teacher=false",
              "eval.tasks=[]", f"eval.ppl_tokens={args.ppl_tokens}", f"eval.batch_size={args.eval_batch}"]  # fmt: skip
    if not run_linearize(stage1, s1_dir, s1_dir.name):
        return False
    copy_stage_output(s1_dir / "transfer", run_dir / "transfer")
    stage2 = [*model, f"run.dir={run_dir}", "pipeline=[finetune,eval]", *budget(args, s2), f"train.lr={args.lr2}",
              f"finetune.objective={point.objective}", *eval_overrides(args), "eval.teacher=false"]  # fmt: skip
    return run_linearize(stage2, run_dir, point.name)


def copy_stage_output(src: Path, dst: Path) -> None:
    """``src`` (a whole stage output) at ``dst``, unless the same one is there already; the copy
    appears by one rename, so a killed copy never looks whole."""
    made = read_manifest(src)["fingerprint_hash"]
    if (dst / "linearize.json").is_file() and read_manifest(dst).get("fingerprint_hash") == made:
        return
    tmp = dst.with_name(f".{dst.name}.copy")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def run_teacher(args) -> bool:
    run_dir = args.out / "teacher"
    cmd = ["stage=all", f"run.dir={run_dir}", "model=smollm2-135m", *args.extra, "pipeline=[eval]",
           *eval_overrides(args), "eval.teacher=true"]  # fmt: skip
    return run_linearize(cmd, run_dir, "teacher")


def wall_minutes(*run_dirs: Path) -> float:
    return sum(json.loads((d / "wall_seconds.json").read_text())["seconds"] for d in run_dirs if (d / "wall_seconds.json").is_file()) / 60


def collect(point: Point, args, recorded: dict | None = None) -> dict | None:
    """The point's figures (from its run dirs, else from ``recorded``), or None while it is not done."""
    run_dir, s1_dir = args.out / point.name, stage1_dir(point, args)
    try:
        scores = report_scores(run_dir, "converted")
        s1_ppl = report_scores(s1_dir, "converted")["wikitext2"]
        if read_manifest(run_dir / "eval")["fingerprint"].get("upstream.finetune") is None:
            return None  # its eval scored the stage-1 model: stage 2 has not run yet
    except (FileNotFoundError, KeyError):
        return (recorded or {}).get("rows", {}).get(point.name)
    s1, s2 = steps(point, args)
    return {"name": point.name, "objective": point.objective, "tokens": point.tokens,
            "stage1_tokens": s1 * tokens_per_step(args), "stage2_tokens": s2 * tokens_per_step(args),
            "wall_minutes": wall_minutes(run_dir, s1_dir), "stage1_ppl": s1_ppl, "scores": scores}  # fmt: skip


def best_objective(done: list[dict], args) -> str | None:
    """The objective with the lowest perplexity at the largest --compare budget, once every
    objective has run there."""
    at = max(args.compare)
    rows = {r["objective"]: r for r in done if r["tokens"] == at}
    if set(rows) != set(args.objectives):
        return None
    return min(rows.values(), key=lambda r: r["scores"]["wikitext2"])["objective"]


def comparison_points(args) -> list[Point]:
    return [Point(o, t) for t in args.compare for o in args.objectives]


def curve_points(best: str, args) -> list[Point]:
    return [Point(best, t) for t in args.budgets if Point(best, t) not in comparison_points(args)]


def table(teacher: dict, rows: list[dict]) -> str:
    head = ["objective", "stage-1 tokens", "stage-2 tokens", "wall min", "PPL after stage 1", "PPL",
            "PPL / teacher", *(TASK_NAMES[t] for t in TASKS), "average", "share of teacher's"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t_ppl, t_avg = teacher.get("wikitext2"), teacher.get("average")
    lines.append("| teacher | – | – | – | – | " + f"{t_ppl:.2f} | 1.00 | "
                 + " | ".join(f"{teacher.get(t, math.nan):.3f}" for t in TASKS) + f" | {t_avg:.3f} | 100.0% |")  # fmt: skip
    for r in sorted(rows, key=lambda r: (r["tokens"], r["objective"])):
        s = r["scores"]
        cells = [r["objective"], f"{r['stage1_tokens']:,}", f"{r['stage2_tokens']:,}", f"{r['wall_minutes']:.0f}",
                 f"{r['stage1_ppl']:.2f}", f"{s['wikitext2']:.2f}", f"{s['wikitext2'] / t_ppl:.2f}",
                 *(f"{s[t]:.3f}" for t in TASKS), f"{s['average']:.3f}", f"{100 * s['average'] / t_avg:.1f}%"]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(teacher: dict, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for objective in dict.fromkeys(r["objective"] for r in rows):
        line = sorted((r for r in rows if r["objective"] == objective), key=lambda r: r["tokens"])
        x = [r["tokens"] for r in line]
        ax1.plot(x, [r["scores"]["wikitext2"] / teacher["wikitext2"] for r in line], "o-", label=objective)
        ax2.plot(x, [100 * r["scores"]["average"] / teacher["average"] for r in line], "o-", label=objective)
    ax1.axhline(2.0, color="#999", ls="--", lw=1, label="goal: 2.0")
    ax1.set_ylabel("WikiText-2 perplexity / teacher's")
    ax2.axhline(97, color="#999", ls="--", lw=1, label="goal: 97%")
    ax2.set_ylabel(f"{'/'.join(TASK_NAMES[t] for t in TASKS)} average, % of teacher's")
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xlabel("total training tokens (stage 1 + stage 2)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("lolcats from SmolLM2-135M: quality against training tokens")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_budget(args) -> dict:
    """Write ``<out>/budget.json``, or refuse when it holds other settings than these; the same
    check for the figures --json carries over. Returns those figures (``{}`` when none):
    ``teacher`` and ``rows`` by point name."""
    mine = {k: getattr(args, k) for k in BUDGET_KEYS}

    def refuse_other(theirs: dict, where: Path, fix: str) -> None:
        if theirs != mine:
            diff = {k: (theirs.get(k), mine[k]) for k in mine if theirs.get(k) != mine[k]}
            sys.exit(f"{where} holds points made with other settings (theirs, these): {diff}; {fix}")

    path = args.out / "budget.json"
    if path.is_file():
        refuse_other(json.loads(path.read_text()), args.out, "use another --out, or the same settings")
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1))
    if not (args.json and args.json.is_file()):
        return {}
    carried = json.loads(args.json.read_text())
    refuse_other(carried["budget"], args.json, "use another --json, or the same settings")
    return {"teacher": carried["teacher"], "rows": {r["name"]: r for r in carried["rows"]}}


def done_points(args, recorded: dict) -> tuple[list[dict], str | None]:
    """The figures of every point done so far, and the best objective once it is known."""
    done = [r for r in (collect(p, args, recorded) for p in comparison_points(args)) if r]
    best = best_objective(done, args)
    if best is not None:
        done += [r for r in (collect(p, args, recorded) for p in curve_points(best, args)) if r]
    return done, best


def teacher_scores(args, recorded: dict) -> dict | None:
    try:
        return report_scores(args.out / "teacher", "teacher")
    except FileNotFoundError:
        return recorded.get("teacher")


def write_outputs(args, recorded: dict) -> None:
    """The table, its figures and the curve from every point done so far."""
    teacher = teacher_scores(args, recorded)
    if teacher is None:
        return
    done, best = done_points(args, recorded)
    text = table(teacher, done)
    print(text, flush=True)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"budget": {k: getattr(args, k) for k in BUDGET_KEYS}, "best": best,
                                         "teacher": teacher, "rows": done}, indent=1))  # fmt: skip
    if args.png and done:
        chart(teacher, done, args.png)


def main() -> None:
    args = parse_args()
    recorded = check_budget(args)
    failed = []

    def run(points: list[Point]) -> None:
        for point in points:
            if point.name in recorded.get("rows", {}):
                continue  # done in an earlier session (its run dirs may be gone)
            if run_point(point, args):
                write_outputs(args, recorded)
            else:
                failed.append(point.name)

    if not args.table_only:
        if "teacher" not in recorded and not run_teacher(args):
            sys.exit("the teacher's evaluation failed; see its linearize.log")
        run(comparison_points(args))
        best = done_points(args, recorded)[1]
        if best is not None:
            print(f"best objective at {max(args.compare):,} tokens: {best}", flush=True)
            run(curve_points(best, args))
    write_outputs(args, recorded)
    if failed:
        sys.exit(f"points failed: {', '.join(failed)}; rerun the same command to resume them")


if __name__ == "__main__":
    main()
