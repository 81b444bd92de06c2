"""scripts/quality_curve.py: every point's commands are valid runs spending the point's tokens,
the best objective is chosen as documented, stale points are refused, and the table adds up."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from linearize.stages.preflight import preflight
from tests.conftest import ROOT, build_config

sys.path.insert(0, str(ROOT / "scripts"))
spec = importlib.util.spec_from_file_location("quality_curve", ROOT / "scripts" / "quality_curve.py")
qc = importlib.util.module_from_spec(spec)
sys.modules["quality_curve"] = qc  # its dataclasses look themselves up there
spec.loader.exec_module(qc)


def commands(point, args, monkeypatch) -> list[list[str]]:
    """The overrides ``run_point`` runs, in order (nothing is run; the stage-1 copy is skipped)."""
    seen = []
    monkeypatch.setattr(qc, "run_linearize", lambda overrides, run_dir, tag: seen.append(overrides) or True)
    monkeypatch.setattr(qc, "copy_stage_output", lambda src, dst: None)
    assert qc.run_point(point, args)
    return seen


@pytest.mark.parametrize("objective", qc.OBJECTIVES)
def test_a_point_spends_its_tokens_in_valid_runs(objective, tmp_path, monkeypatch):
    args = qc.parse_args(["--out", str(tmp_path)])  # the documented settings
    point = qc.Point(objective, 100_000)
    stage1, stage2 = (build_config(*c) for c in commands(point, args, monkeypatch))
    for cfg in (stage1, stage2):
        preflight(cfg)  # what the CLI checks before loading anything
        assert cfg.stage == "all" and cfg.model.name == "smollm2-135m"
    assert list(stage1.pipeline) == ["transfer", "eval"] and stage1.train.lr == 1e-2 and stage1.attention.name == "lolcats"
    assert list(stage1.eval.tasks) == [] and stage1.eval.ppl_tokens == 32768 and not stage1.eval.teacher
    assert stage1.run.dir.endswith("stage1-100k") and stage2.run.dir.endswith(point.name)  # stage 1 shared per budget
    assert list(stage2.pipeline) == ["finetune", "eval"] and stage2.finetune.objective == objective
    assert stage2.train.lr == 1e-3 and list(stage2.eval.tasks) == qc.TASKS and stage2.eval.limit == 500
    assert stage1.attention.sinks == stage2.attention.sinks == 4
    per_step = stage1.train.batch_size * stage1.train.grad_accum * stage1.data.seq_len
    assert per_step == 2048 and stage1.data.seq_len == stage2.data.seq_len == stage2.eval.ppl_seq_len
    assert (stage1.train.max_steps, stage2.train.max_steps) == (24, 25)  # 49 steps: 100,352 tokens
    assert qc.steps(qc.Point(objective, 500_000), args) == (122, 122)


def test_every_objective_at_a_budget_shares_one_stage_1(tmp_path, monkeypatch):
    args = qc.parse_args(["--out", str(tmp_path)])
    first = {o: commands(qc.Point(o, 50_000), args, monkeypatch)[0] for o in qc.OBJECTIVES}
    assert len({tuple(c) for c in first.values()}) == 1
    assert first["kd"] != commands(qc.Point("kd", 100_000), args, monkeypatch)[0]


def test_the_best_objective_is_the_lowest_perplexity_at_the_largest_comparison(tmp_path):
    args = qc.parse_args(["--out", str(tmp_path)])
    done = [{"objective": o, "tokens": t, "scores": {"wikitext2": ppl}}
            for o, t, ppl in [("ntp", 50_000, 10.0), ("kd", 50_000, 30.0), ("ntp", 100_000, 40.0),
                              ("kd", 100_000, 35.0)]]  # fmt: skip
    assert qc.best_objective(done, args) is None  # kd+ntp has not run at 100K yet
    done.append({"objective": "kd+ntp", "tokens": 100_000, "scores": {"wikitext2": 36.0}})
    assert qc.best_objective(done, args) == "kd"
    assert [p.name for p in qc.curve_points("kd", args)] == ["kd-200k", "kd-500k"]  # 50K, 100K ran already


def test_points_made_with_other_settings_are_refused(tmp_path):
    qc.check_budget(qc.parse_args(["--out", str(tmp_path)]))
    qc.check_budget(qc.parse_args(["--out", str(tmp_path)]))  # the same settings: fine
    with pytest.raises(SystemExit, match=r"other settings.*'limit': \(500, 100\)"):
        qc.check_budget(qc.parse_args(["--out", str(tmp_path), "--limit", "100"]))
    with pytest.raises(SystemExit):
        qc.parse_args(["--out", str(tmp_path), "--budgets", "1000"])  # under one step per stage


def test_a_point_counts_only_once_stage_2_was_scored(tmp_path):
    args = qc.parse_args(["--out", str(tmp_path)])
    point = qc.Point("kd", 50_000)
    assert qc.collect(point, args) is None
    for run_dir, upstream in ((tmp_path / point.name, "upstream.transfer"), (qc.stage1_dir(point, args), "upstream.transfer")):
        (run_dir / "eval").mkdir(parents=True)
        rows = [{"task": "wikitext2", "metric": "ppl", "converted": 40.0}]
        (run_dir / "eval" / "report.json").write_text(json.dumps({"rows": rows}))
        (run_dir / "eval" / "linearize.json").write_text(json.dumps({"fingerprint": {upstream: "x"}, "files": {}}))
    assert qc.collect(point, args) is None  # the point's eval scored its stage-1 model
    manifest = tmp_path / point.name / "eval" / "linearize.json"
    manifest.write_text(json.dumps({"fingerprint": {"upstream.finetune": "y"}, "files": {}}))
    assert qc.collect(point, args)["stage1_ppl"] == 40.0


def test_table_ratios_and_shares():
    teacher = {"wikitext2": 20.0, "piqa": 0.6, "arc_easy": 0.5, "hellaswag": 0.4, "average": 0.5}
    row = {"objective": "kd", "tokens": 100_000, "stage1_tokens": 49_152, "stage2_tokens": 51_200, "wall_minutes": 31.4,
           "stage1_ppl": 90.0, "scores": {"wikitext2": 50.0, "piqa": 0.6, "arc_easy": 0.45, "hellaswag": 0.3,
                                           "average": 0.45}}  # fmt: skip
    lines = qc.table(teacher, [row]).splitlines()
    assert len(lines) == 4 and {line.count("|") for line in lines} == {13}
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:7] == ["kd", "49,152", "51,200", "31", "90.00", "50.00", "2.50"]
    assert cells[-2:] == ["0.450", "90.0%"]


def test_figures_carried_in_the_json_are_not_run_again(tmp_path, monkeypatch):
    """A later session (its run dirs gone) skips the teacher and the points --json holds, runs the
    rest, and keeps the carried figures in the table; a --json of other settings is refused."""
    figures = tmp_path / "curve.json"
    argv = ["--out", str(tmp_path / "runs"), "--json", str(figures), "--objectives", "ntp", "kd",
            "--compare", "50000", "--budgets", "50000", "100000"]  # fmt: skip
    args = qc.parse_args(argv)
    teacher = {"wikitext2": 20.0, "piqa": 0.6, "arc_easy": 0.5, "hellaswag": 0.4, "average": 0.5}
    row = {"name": "ntp-50k", "objective": "ntp", "tokens": 50_000, "stage1_tokens": 24_576, "stage2_tokens": 24_576,
           "wall_minutes": 19.0, "stage1_ppl": 52.0, "scores": {**teacher, "wikitext2": 43.0}}  # fmt: skip
    figures.write_text(json.dumps({"budget": {k: getattr(args, k) for k in qc.BUDGET_KEYS}, "best": None,
                                   "teacher": teacher, "rows": [row]}))  # fmt: skip
    ran = []

    def fake_point(point, args):  # the kd point ends worse than ntp, so ntp runs on at 100K
        ran.append(point.name)
        return False

    monkeypatch.setattr(qc, "run_point", fake_point)
    monkeypatch.setattr(qc, "run_teacher", lambda args: pytest.fail("the teacher's figures were carried over"))
    monkeypatch.setattr(sys, "argv", ["quality_curve.py", *argv])
    with pytest.raises(SystemExit, match="points failed: kd-50k"):
        qc.main()
    assert ran == ["kd-50k"]  # ntp-50k was carried; kd-50k had to run (and failed here)
    carried = json.loads(figures.read_text())
    assert carried["teacher"] == teacher and [r["name"] for r in carried["rows"]] == ["ntp-50k"]
    monkeypatch.setattr(sys, "argv", ["quality_curve.py", *argv, "--limit", "100", "--out", str(tmp_path / "other")])
    with pytest.raises(SystemExit, match=r"curve.json holds points made with other settings.*'limit': \(500, 100\)"):
        qc.main()
