"""Stage 2: adapters via peft, the converted-model format, and loading it back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

from linearize.config import validate
from linearize.models.convert import (
    apply_converted,
    base_model,
    build_adapter,
    load_converted,
    save_converted,
)
from linearize.models.swap import swap_attention
from linearize.models.trainable import trainable_state
from linearize.stages.finetune import run as run_finetune
from linearize.stages.preflight import preflight
from linearize.stages.prepare import prepare
from linearize.stages.transfer import run as run_transfer
from linearize.train import loop
from linearize.train.objectives import NextTokenObjective, make_objective
from tests.conftest import build_config, compose_config, data_root, kill_on_call

TINY = ("model=tiny-llama", "attention=lolcats", "attention.window=8", "data.max_examples=120",
        "data.seq_len=64", "data.val_fraction=0.1", "train.grad_accum=1")  # fmt: skip
ADAPTERS = ("lora", "dora", "pissa", "olora", "fourierft", "vera")


def prepared(tmp_path: Path, *overrides: str):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    return prepare(validate(dc), dc)


def perturb_adapter(model) -> None:
    """Adapters start as a no-op (LoRA's B = 0); make them matter for the equality tests."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", ADAPTERS)
def test_every_adapter_trains_only_its_own_parameters(tmp_path, name):
    prep = prepared(tmp_path, f"adapter={name}")
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(".mixer." in n for n in trainable)
    frozen_base = [n for n, p in base_model(model).named_parameters() if p.requires_grad and "base_layer" in n]
    assert frozen_base == []
    objective = NextTokenObjective()
    loss, _ = objective.loss(model, prep.data.train.input_ids[:2], prep.data.train.labels[:2])
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_train_new_also_trains_the_stage1_parameters(tmp_path):
    prep = prepared(tmp_path, "adapter.train_new=true", "finetune.start=swap", "train.max_steps=1")
    run_finetune(prep)
    manifest = json.loads((tmp_path / "finetune" / "linearize.json").read_text())
    assert manifest["adapter"]["train_new"] is True


def test_merged_equals_unmerged_and_round_trip_is_exact(tmp_path):
    prep = prepared(tmp_path)
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter)
    perturb_adapter(model)
    with torch.no_grad():  # and move the stage-1 parameters off their initial values
        for n, p in base_model(model).named_parameters():
            if ".mixer." in n:
                p.add_(0.1)
    x = prep.data.val.input_ids[:2]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=x).logits
    out = save_converted(model, tmp_path / "converted", teacher=prep.config.model,
                         attention=prep.config.attention, softmax_layers=[],
                         adapter=prep.config.adapter, tokenizer=prep.tokenizer)  # fmt: skip
    loaded, tokenizer = load_converted(out, cache_dir=prep.config.cache_dir)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, logits)
    assert tokenizer.decode(x[0]) == prep.tokenizer.decode(x[0])
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, logits, rtol=1e-5, atol=1e-5)
    # a generate() on the loaded model runs (the constant-state cache is issue 8)
    assert loaded.generate(input_ids=x[:1, :5], max_new_tokens=3, do_sample=False).shape == (1, 8)


def test_deltas_are_checked_against_the_model(tmp_path):
    prep = prepared(tmp_path)
    swap_attention(prep.teacher, prep.config.attention)
    out = save_converted(prep.teacher, tmp_path / "c", teacher=prep.config.model,
                         attention=prep.config.attention, softmax_layers=[])  # fmt: skip
    other = prepared(tmp_path / "o", "attention=hedgehog").teacher
    manifest = json.loads((out / "linearize.json").read_text())
    manifest["attention"]["feature_dim"] = 32  # the saved tensors no longer fit
    (out / "linearize.json").write_text(json.dumps(manifest))
    with pytest.raises((ValueError, RuntimeError)):
        apply_converted(other, out)
    with pytest.raises(FileNotFoundError, match="no linearize.json"):
        apply_converted(other, tmp_path)


def test_finetune_needs_stage1_unless_told_to_swap(tmp_path):
    with pytest.raises(FileNotFoundError, match="finetune.start=swap"):
        preflight(build_config("stage=finetune", *TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}"))
    preflight(build_config("stage=finetune", "finetune.start=swap", *TINY, f"data_dir={data_root()}",
                           f"run.dir={tmp_path}"))  # fmt: skip


def _finetune(tmp_path, out, *overrides, resume=False, crash_at_call=None):
    """6 steps of stage 2 through the loop (``overrides``: e.g. another finetune.objective)."""
    prep = prepared(tmp_path, "train.max_steps=6", "train.eval_every=1", "train.grad_accum=2",
                    "train.batch_size=2", "train.eval_batches=1", "train.lr=1e-2", *overrides)  # fmt: skip
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter)
    objective = make_objective(prep.config.finetune)
    if crash_at_call is not None:
        kill_on_call(objective, crash_at_call)
    state = loop.train(model, objective, prep.data.train, prep.data.val, prep.config.train, out,
                       accelerator=Accelerator(cpu=True), seed=0, resume=resume)  # fmt: skip
    return state, trainable_state(model)


def test_finetune_kill_and_resume_equals_uninterrupted(tmp_path):
    _, full = _finetune(tmp_path / "a", tmp_path / "a" / "out")
    out = tmp_path / "b" / "out"
    with pytest.raises(KeyboardInterrupt):
        _finetune(tmp_path / "b", out, crash_at_call=7)
    state, resumed = _finetune(tmp_path / "b", out, resume=True)
    assert state.step == 6 and resumed.keys() == full.keys()
    assert all("lora_" in n for n in full)
    for name in full:
        assert torch.equal(resumed[name], full[name]), name


@pytest.mark.slow
def test_real_smollm2_transfer_then_finetune(tmp_path):
    common = ("model=smollm2-135m", "attention=lolcats", f"data_dir={data_root()}",
              f"run.dir={tmp_path}", "data.max_examples=400", "data.seq_len=128",
              "train.batch_size=2", "train.grad_accum=1", "train.eval_batches=3")  # fmt: skip
    dc = compose_config("stage=transfer", *common, "train.max_steps=8", "train.eval_every=8")
    prep = prepare(validate(dc), dc)
    run_transfer(prep)
    dc = compose_config("stage=finetune", *common, "train.max_steps=10", "train.eval_every=5",
                        "train.lr=1e-3")  # fmt: skip
    prep = prepare(validate(dc), dc)
    out = run_finetune(prep)
    manifest = json.loads((out / "linearize.json").read_text())
    vals = [h["val/val_loss"] for h in manifest["history"] if "val/val_loss" in h]
    delta = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    cache = Path(prep.config.cache_dir).expanduser() / "teachers"
    teacher = sum(f.stat().st_size for f in cache.glob("*/model.safetensors"))
    print(f"stage-2 val loss by eval: {vals}; delta files {delta / 2**20:.1f} MiB vs teacher "
          f"{teacher / 2**20:.1f} MiB ({100 * delta / teacher:.1f}%)")
    assert vals[-1] < vals[0] - 0.05, vals
    assert delta < 0.05 * teacher


def test_export_merged_equals_deltas(tmp_path):
    from linearize.stages.export import run as run_export

    prep = prepared(tmp_path, "finetune.start=swap", "train.max_steps=2", "train.eval_every=1",
                    "train.lr=1e-2")  # fmt: skip
    run_finetune(prep)
    deltas, _ = load_converted(tmp_path / "finetune", cache_dir=prep.config.cache_dir)
    prep = prepared(tmp_path, "stage=export", "export.merge=true")
    out = run_export(prep)
    merged, _ = load_converted(out, cache_dir=prep.config.cache_dir)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, deltas(input_ids=x).logits, rtol=1e-5, atol=1e-5)
