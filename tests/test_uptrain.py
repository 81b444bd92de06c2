"""stage=uptrain (SUPRA's recipe): trainable sets, resume, outputs; recipes end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from linearize.config import validate
from linearize.models.convert import apply_converted, load_converted, read_manifest
from linearize.models.load import load_teacher
from linearize.models.swap import swap_attention
from linearize.models.trainable import set_trainable
from linearize.stages.preflight import preflight
from linearize.stages.prepare import prepare
from linearize.stages.uptrain import run as run_uptrain
from linearize.train import objectives
from linearize.train.objectives import NextTokenObjective
from tests.conftest import build_config, compose_config, data_root, kill_on_call
from tests.test_cli import run_cli

TINY = ("stage=uptrain", "model=tiny-llama", "attention=supra", "data.max_examples=60", "data.seq_len=64",
        "train.grad_accum=1", "train.batch_size=2", "train.max_steps=4", "train.eval_every=2",
        "train.eval_batches=1", "train.lr=1e-3")  # fmt: skip


def prepared(tmp_path: Path, *overrides: str):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    config = validate(dc)
    preflight(config)
    return prepare(config, dc)


def _fresh_teacher(prep):
    cfg = prep.config
    return load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=cfg.run.seed)


def initial_model(prep):
    """The model uptraining starts from: the same seeded teacher and swap, untrained."""
    cfg = prep.config
    model = _fresh_teacher(prep)
    swap_attention(model, cfg.attention, seed=cfg.run.seed)
    return model


@pytest.mark.parametrize("trainable", ["new", "attention", "all"])
def test_uptrain_changes_exactly_the_trainable_set(tmp_path, trainable):
    prep = prepared(tmp_path, f"train.trainable={trainable}", "train.max_steps=2")
    start = dict(initial_model(prep).named_parameters())
    out = run_uptrain(prep)
    model = prep.teacher
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, start[n])}
    new = {n for n, _ in model.named_parameters() if ".mixer." in n}
    proj = {n for n, _ in model.named_parameters() if any(f"self_attn.{x}_proj" in n for x in "qkvo")}
    expected = {"new": new, "attention": new | proj, "all": set(start)}[trainable]
    assert moved == expected, sorted(moved ^ expected)[:5]
    manifest = read_manifest(out)
    assert manifest["stage"] == "uptrain" and manifest["trainable"] == trainable
    assert (out / "model.safetensors").is_file() == (trainable != "new")
    # the written model reproduces the trained one, loaded alone or applied to the teacher
    # (as stage=eval and stage=generate do)
    loaded, _ = load_converted(out)
    applied = apply_converted(_fresh_teacher(prep), out)
    x = torch.randint(0, 1000, (1, 20))
    with torch.no_grad():
        expected = model(x).logits
        torch.testing.assert_close(loaded(x).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(applied(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_set_trainable_marks_the_sets():
    cfg = build_config("model=tiny-llama", "attention=supra")
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"))
    swap_attention(model, cfg.attention)
    set_trainable(model, "attention")
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".mixer." in n or "_proj" in n and "self_attn" in n for n in names)
    assert any("self_attn.o_proj" in n for n in names) and not any("mlp" in n for n in names)


def test_uptrain_resume_is_exact(tmp_path, monkeypatch):
    whole = prepared(tmp_path / "whole", "train.trainable=attention")
    run_uptrain(whole)
    expected = load_file(tmp_path / "whole" / "uptrain" / "model.safetensors")

    def killed():
        # loss calls: step-0 validation, steps 1 and 2, validation + checkpoint at 2, step 3 dies
        objective = NextTokenObjective()
        kill_on_call(objective, 5)
        return objective

    crashed = prepared(tmp_path / "crash", "train.trainable=attention")
    monkeypatch.setattr(objectives, "NextTokenObjective", killed)
    with pytest.raises(KeyboardInterrupt):
        run_uptrain(crashed)
    monkeypatch.undo()
    ckpt = tmp_path / "crash" / "work" / "uptrain" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-0000002"
    resumed = prepared(tmp_path / "crash", "train.trainable=attention", "run.resume=true")
    run_uptrain(resumed)
    got = load_file(tmp_path / "crash" / "uptrain" / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_uptrain_without_new_parameters_needs_a_wider_trainable_set(tmp_path):
    dc = compose_config(*TINY, "attention=liger", f"data_dir={data_root()}", f"run.dir={tmp_path}")
    with pytest.raises(ValueError, match="train.trainable=attention or all"):
        preflight(validate(dc))


@pytest.mark.slow
@pytest.mark.parametrize("recipe,stages", [
    ("lolcats", ("transfer", "finetune", "export")),
    ("liger", ("finetune", "export")),
    ("supra", ("uptrain", "export")),
])  # fmt: skip
def test_recipes_run_end_to_end(tmp_path, recipe, stages):
    run_dir = tmp_path / "run"
    out = run_cli(
        "stage=all", f"recipe={recipe}", "model=tiny-llama", "attention.window=8", "data.max_examples=60",
        "data.seq_len=64", "train.grad_accum=1", "train.max_steps=2", "train.eval_every=1",
        f"run.dir={run_dir}", f"data_dir={data_root()}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    for stage in stages:
        assert read_manifest(run_dir / stage)["attention"]["name"] == recipe, stage
    if recipe == "lolcats":  # each stage composed with its own recipe settings under stage=all
        lr = {s: read_manifest(run_dir / s)["fingerprint"]["train.lr"] for s in ("transfer", "finetune")}
        assert lr == {"transfer": 1e-2, "finetune": 1e-3}
    ran = {p.name for p in run_dir.iterdir() if (p / "linearize.json").is_file()}
    assert ran == set(stages)
    model, tokenizer = load_converted(run_dir / "export")
    last, _ = load_converted(run_dir / stages[-2])  # export holds exactly the last stage's model
    x = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, last(x).logits, rtol=1e-5, atol=1e-5)
    assert model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=3).shape[1] >= 3
