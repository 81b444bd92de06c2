"""scripts/reproduce_small.py: every row's command is a valid pipeline, and the table adds up."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from linearize.stages.preflight import preflight
from tests.conftest import ROOT, build_config

spec = importlib.util.spec_from_file_location("reproduce_small", ROOT / "scripts" / "reproduce_small.py")
rs = importlib.util.module_from_spec(spec)
sys.modules["reproduce_small"] = rs  # its dataclasses look themselves up there
spec.loader.exec_module(rs)


def args(tmp_path: Path) -> Namespace:
    return rs.parse_args(["--out", str(tmp_path)])  # the documented budget: the script's defaults


@pytest.mark.parametrize("row", rs.ROWS, ids=lambda r: r.name)
def test_each_row_is_a_valid_run(row, tmp_path):
    cfg = build_config(*rs.command(row, args(tmp_path)))
    preflight(cfg)  # what the CLI checks before loading anything
    assert cfg.model.name == "smollm2-135m" and cfg.eval.task_limits == {"mmlu": 1}
    assert list(cfg.eval.tasks) == rs.TASKS and cfg.eval.limit == 100
    assert cfg.stage == "all" and list(cfg.pipeline) == [*row.stages, "eval"]  # finished stages are skipped
    if not row.stages:
        assert cfg.eval.teacher
        return
    assert (cfg.train.max_steps, cfg.train.batch_size, cfg.train.grad_accum, cfg.data.seq_len) == (24, 1, 2, 512)
    assert cfg.attention.name != "softmax"


def test_table_shares_and_columns():
    rows = [
        {"name": "teacher", "label": "teacher", "stages": [], "tokens_per_stage": 0, "wall_seconds": 60.0,
         "scores": {"piqa": 0.6, "average": 0.4, "wikitext2": 18.0}},
        {"name": "lolcats", "label": "lolcats", "stages": ["transfer", "finetune"], "tokens_per_stage": 30720,
         "wall_seconds": 600.0, "transfer_mse": 0.01234, "scores": {"piqa": 0.5, "average": 0.3, "wikitext2": 90.0}},
    ]  # fmt: skip
    lines = rs.table(rows).splitlines()
    assert len(lines) == 4 and lines[0].count("|") == lines[2].count("|") == lines[3].count("|")
    cells = [c.strip() for c in lines[3].strip("|").split("|")]
    assert cells[:5] == ["lolcats", "30,720", "10.0", "0.0123", "90.00"]
    assert cells[-2:] == ["0.300", "75.0%"]  # 0.3 of the teacher's 0.4
    assert cells[6] == "–"  # a task the run did not score


def test_rerunning_one_row_keeps_the_others_from_a_table_of_the_same_budget(tmp_path):
    table = tmp_path / "table.json"
    full = rs.parse_args(["--out", str(tmp_path), "--json", str(table)])
    old = [{"name": n, "label": n, "scores": {"average": 0.1}} for n in ("supra-transfer", "teacher", "liger")]
    table.write_text(rs.json.dumps({"budget": rs.budget_of(full), "rows": old}))

    one = rs.parse_args(["--out", str(tmp_path), "--json", str(table), "--rows", "liger"])
    new = {"name": "liger", "label": "liger", "scores": {"average": 0.2}}
    merged = rs.merge([new], table, one)
    assert [r["name"] for r in merged] == ["teacher", "liger", "supra-transfer"]  # the order of ROWS
    assert merged[1] is new  # the row run now replaces the old one

    assert rs.merge([new], table, full) == [new]  # every row run: nothing taken from the old table
    other = rs.parse_args(["--out", str(tmp_path), "--json", str(table), "--rows", "liger", "--steps", "8"])
    with pytest.raises(SystemExit, match="another budget"):
        rs.merge([new], table, other)


cd_spec = importlib.util.spec_from_file_location("choose_delta", ROOT / "scripts" / "choose_delta.py")
cd = importlib.util.module_from_spec(cd_spec)
cd_spec.loader.exec_module(cd)


@pytest.mark.parametrize("name", list(cd.CANDIDATES))
def test_each_delta_candidate_is_a_transfer_run_on_the_tables_budget(name, tmp_path):
    a = cd.parse_args(["--out", str(tmp_path)])
    cfg = build_config("stage=transfer", "model=smollm2-135m", *cd.CANDIDATES[name], *cd.budget(a))
    preflight(cfg)
    assert cfg.attention.kind == "delta" and cfg.attention.window == 0
    assert cfg.attention.gated == name.startswith("gated")
    assert (cfg.attention.feature_map, cfg.attention.delta_rates) == tuple(name.split("-")[-2:])
    table_args = args(tmp_path)  # the results table's stage-1 budget, so the MSEs compare
    assert cd.budget(a) == rs.budget(table_args)


def test_delta_candidates_rank_by_mean_mse_over_the_linear_layers(tmp_path):
    for name, per_layer, swapped in (("deltanet-t2r-proj", {"0": 0.3, "1": 0.1, "2": 9.0}, [0, 1]),
                                     ("deltanet-identity-proj", {"0": 0.2, "1": 0.1}, [0, 1])):  # fmt: skip
        (tmp_path / name / "transfer").mkdir(parents=True)
        result = {"val_mse_per_layer": per_layer, "swapped": swapped}
        (tmp_path / name / "transfer" / "result.json").write_text(rs.json.dumps(result))
    rows = [cd.figures(n, tmp_path / n) for n in ("deltanet-t2r-proj", "deltanet-identity-proj")]
    assert [r["mean_mse"] for r in rows] == pytest.approx([0.2, 0.15])  # layer 2 kept softmax: not counted
    assert (rows[0]["worst_layer"], rows[0]["worst_mse"]) == (0, 0.3)
    lines = cd.table(rows).splitlines()
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["deltanet-identity-proj", "deltanet-t2r-proj"]
