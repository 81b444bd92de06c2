"""scripts/quality_curve.py: every point's commands are valid runs spending the point's tokens,
the best objective is chosen as documented, stale points are refused, and the table adds up."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.conftest import ROOT, build_config
from linearize.stages import preflight

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
    stage1, alone, stage2 = (build_config(*c) for c in commands(point, args, monkeypatch))
    for cfg in (stage1, alone, stage2):
        preflight(cfg)  # what the CLI checks before loading anything
        assert cfg.stage == "all" and cfg.model.name == "smollm2-135m"
    assert list(stage1.pipeline) == ["transfer"] and stage1.train.lr == 1e-2 and stage1.attention.name == "lolcats"
    assert list(alone.pipeline) == ["eval"] and list(alone.eval.tasks) == [] and alone.eval.ppl_tokens == 32768
    assert alone.run.dir.endswith(f"{point.name}.stage1") and stage1.run.dir == stage2.run.dir
    assert list(stage2.pipeline) == ["finetune", "eval"] and stage2.finetune.objective == objective
    assert stage2.train.lr == 1e-3 and list(stage2.eval.tasks) == qc.TASKS and stage2.eval.limit == 500
    assert stage1.attention.sinks == 4
    per_step = stage1.train.batch_size * stage1.train.grad_accum * stage1.data.seq_len
    assert per_step == 2048 and stage1.data.seq_len == stage2.data.seq_len == stage2.eval.ppl_seq_len
    assert (stage1.train.max_steps, stage2.train.max_steps) == (24, 25)  # 49 steps: 100,352 tokens
    assert qc.steps(qc.Point(objective, 500_000), args) == (122, 122)


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
    for run_dir, upstream in ((tmp_path / point.name, "upstream.transfer"), (tmp_path / f"{point.name}.stage1", "upstream.transfer")):
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
