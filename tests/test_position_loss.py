"""The loss by position (``eval.ppl_buckets``): buckets partition the scored tokens, so one
bucket covering every position gives the plain mean loss, and the buckets' token-weighted mean
is the mean loss; the report shows the table and draws ``position.png``."""

from __future__ import annotations

import math

import pytest
import torch

from linearize.evaluate.long import position_edges
from linearize.evaluate.perplexity import perplexity, wikitext2_text
from linearize.evaluate.report import compare, write_report
from linearize.models.load import load_teacher
from tests.conftest import build_config, data_root

TEXT = " ".join(f"word{i % 37} and then some more text number {i}." for i in range(120))


@pytest.fixture(scope="module")
def model_and_tokenizer(tokenizer):
    cfg = build_config("model=tiny-llama")
    return load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu")), tokenizer


def test_one_bucket_over_every_position_is_the_plain_mean(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = perplexity(model, tokenizer, TEXT, seq_len=128, stride=64)
    one = perplexity(model, tokenizer, TEXT, seq_len=128, stride=64, buckets=[128])
    assert plain["by_position"] == []
    (bucket,) = one["by_position"]  # positions 0-127: every scored token; 128+ holds none
    assert bucket["tokens"] == plain["tokens"] and bucket["from"] == 0 and bucket["to"] == 128
    assert math.isclose(bucket["nll"], plain["nll"], rel_tol=1e-9)


def test_buckets_partition_the_scored_tokens(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    plain = perplexity(model, tokenizer, TEXT, seq_len=128, stride=64)
    split = perplexity(model, tokenizer, TEXT, seq_len=128, stride=64, buckets=[16, 64, 100])
    buckets = split["by_position"]
    assert [(b["from"], b["to"]) for b in buckets] == [(0, 16), (16, 64), (64, 100), (100, None)]
    assert sum(b["tokens"] for b in buckets) == plain["tokens"]
    mean = sum(b["nll"] * b["tokens"] for b in buckets) / plain["tokens"]
    assert math.isclose(mean, plain["nll"], rel_tol=1e-9)
    with pytest.raises(ValueError, match="positive and increasing"):
        perplexity(model, tokenizer, TEXT, buckets=[64, 16])


def test_the_report_shows_the_loss_by_position(tmp_path):
    by = lambda nll: [{"from": 0, "to": 64, "tokens": 10, "nll": nll}, {"from": 64, "to": None, "tokens": 5, "nll": nll + 1}]
    rows = compare({"wikitext2": {"metric": "ppl", "value": 10.0, "by_position": by(2.0)}},
                   {"wikitext2": {"metric": "ppl", "value": 20.0, "by_position": by(3.0)}})  # fmt: skip
    text = write_report(rows, tmp_path, "t", {})
    assert "| 0–64 | 10 | 2.0000 | 3.0000 | 7.389 | 20.09 |" in text and "| 64+ | 5 | 3.0000 | 4.0000 |" in text
    assert (tmp_path / "position.png").stat().st_size > 1000


def test_bad_buckets_are_refused_before_work():
    with pytest.raises(ValueError, match=r"eval.ppl_buckets=\[64, 64\] must be positive and increasing"):
        build_config("eval.ppl_buckets=[64,64]")


def test_compare_positions_tables_runs_and_refuses_other_buckets(tmp_path):
    import json
    import subprocess
    import sys

    from tests.conftest import ROOT

    def report(name, side, buckets):
        (tmp_path / name / "eval").mkdir(parents=True)
        row = {"task": "wikitext2", "metric": "ppl", side: 20.0, "by_position": {side: buckets}}
        (tmp_path / name / "eval" / "report.json").write_text(json.dumps({"rows": [row]}))

    two = lambda nll: [{"from": 0, "to": 64, "tokens": 63, "nll": nll}, {"from": 64, "to": None, "tokens": 9, "nll": nll + 1}]  # noqa: E731
    report("t", "teacher", two(2.0))
    report("c", "converted", two(3.0))
    report("other", "converted", two(3.0)[:1])
    script = [sys.executable, str(ROOT / "scripts" / "compare_positions.py")]
    out = subprocess.run([*script, f"{tmp_path / 't'}:teacher", f"{tmp_path / 'c'}:after", "--png", str(tmp_path / "p.png")],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| 0–64 | 63 | 2.0000 | 3.0000 | 7.39 | 20.09 |" in out and (tmp_path / "p.png").is_file()
    bad = subprocess.run([*script, str(tmp_path / "t"), str(tmp_path / "other")], capture_output=True, text=True)
    assert bad.returncode != 0 and "other position buckets" in bad.stderr


def test_one_bucket_over_a_disjoint_window_is_the_plain_mean(model_and_tokenizer):
    """In disjoint windows (stride = seq_len) the buckets partition the scored tokens: one bucket
    over the window gives the plain mean loss, and position_edges' buckets average back to it."""
    model, tokenizer = model_and_tokenizer
    text = wikitext2_text(data_root())[:20_000]
    plain = perplexity(model, tokenizer, text, seq_len=1024, stride=1024, max_tokens=3000)
    (one,) = perplexity(model, tokenizer, text, seq_len=1024, stride=1024, max_tokens=3000, buckets=[1024])["by_position"]
    assert one["tokens"] == plain["tokens"] and math.isclose(one["nll"], plain["nll"], rel_tol=1e-9)
    split = perplexity(model, tokenizer, text, seq_len=1024, stride=1024, max_tokens=3000, buckets=position_edges(1024))
    buckets = split["by_position"]
    assert [b["from"] for b in buckets] == [0, 64, 256]
    assert sum(b["tokens"] for b in buckets) == plain["tokens"]
    mean = sum(b["nll"] * b["tokens"] for b in buckets) / plain["tokens"]
    assert math.isclose(mean, plain["nll"], rel_tol=1e-9)
