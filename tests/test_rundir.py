"""The run directory's contract (linearize/rundir.py, linearize/fingerprint.py): every everyday
sequence that used to give a wrong model or a wrong resume silently now either does the right
thing or refuses, naming what differs. Runs go through the same path as the command line
(``checked_config`` then ``run_stage``), in process, on tiny-llama; one pipeline is trained once
per module and copied for each test."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from linearize.config import register_configs
from linearize.models.convert import load_converted
from linearize.rundir import RunDirError, lock_run_dir, read_manifest, stage_status
from linearize.stages import checked_config, run_stage
from linearize.stages.preflight import preflight
from tests.conftest import CONFIGS, ROOT, build_config, data_root

BASE = ("model=tiny-llama", "attention=lolcats", "attention.window=8", "data.max_examples=60", "data.seq_len=96",
        "train.batch_size=1", "train.grad_accum=1", "train.max_steps=2", "train.eval_every=1",
        "train.eval_batches=2")  # fmt: skip


def run(*overrides: str) -> None:
    """What ``python -m linearize <overrides>`` does, in this process."""
    register_configs()
    overrides = (*overrides, f"data_dir={data_root()}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
        run_stage(checked_config(cfg, list(overrides)), cfg, list(overrides))


def config(*overrides: str):
    return build_config(*overrides, f"data_dir={data_root()}")


def logits(path: Path) -> torch.Tensor:
    model, _ = load_converted(path)
    with torch.no_grad():
        return model(input_ids=torch.arange(1, 17)[None]).logits


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """transfer -> finetune -> export on tiny-llama, made once."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "run"
    run("stage=all", *BASE, f"run.dir={run_dir}")
    return run_dir


@pytest.fixture
def run_dir(pipeline, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(pipeline, copy, ignore=shutil.ignore_patterns(".lock"))
    return copy


def test_generate_leaves_the_config_and_resume_checks_the_checkpoint(run_dir):
    recorded = (run_dir / "config.yaml").read_text()
    run("stage=generate", "prompt=hi", "generate.max_new_tokens=2", f"run.dir={run_dir}")
    assert (run_dir / "config.yaml").read_text() == recorded  # only training stages write it
    no_window = [o for o in BASE if not o.startswith("attention.window")]  # lolcats' default: 64
    text = str(_raises(RunDirError, preflight, config("stage=transfer", *no_window, "run.resume=true", f"run.dir={run_dir}")))
    assert "attention.window: 8 -> 64" in text and "work/transfer" in text
    preflight(config("stage=transfer", *BASE, "run.resume=true", "train.max_steps=4", f"run.dir={run_dir}"))


def test_a_fresh_run_over_an_earlier_runs_work_refuses(run_dir):
    text = str(_raises(RunDirError, preflight, config("stage=transfer", *BASE, f"run.dir={run_dir}")))
    assert "already holds an earlier stage=transfer run's work" in text
    assert "run.resume=true" in text and f"delete {run_dir / 'work' / 'transfer'}" in text
    shutil.rmtree(run_dir / "work" / "transfer")  # what the message says starts over
    preflight(config("stage=transfer", *BASE, f"run.dir={run_dir}"))


@pytest.mark.parametrize("override,shown", [
    ("data.seq_len=80", "data.seq_len: 96 -> 80"),
    ("train.grad_accum=2", "train.grad_accum: 1 -> 2"),
    ("train.lr=0.5", "train.lr: 0.01 -> 0.5"),
    ("run.seed=3", "run.seed: 0 -> 3"),
])  # fmt: skip
def test_resume_with_other_math_is_refused_naming_both_values(run_dir, override, shown):
    overrides = ("stage=transfer", *BASE, "run.resume=true", f"run.dir={run_dir}", override)
    assert shown in str(_raises(RunDirError, preflight, config(*overrides)))


def test_export_merged_then_deltas_leaves_no_stale_weights(run_dir):
    reference = logits(run_dir / "finetune")
    run("stage=export", "export.merge=true", f"run.dir={run_dir}")
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert torch.allclose(logits(run_dir / "export"), reference, atol=1e-5)
    run("stage=export", "export.merge=false", f"run.dir={run_dir}")
    assert not (run_dir / "export" / "model.safetensors").exists()
    assert torch.equal(logits(run_dir / "export"), reference)  # LoRA applied once


def test_a_publish_sweeps_what_a_killed_one_left(run_dir):
    left = run_dir / ".export.tmp-killed"
    left.mkdir()
    (left / "model.safetensors").write_bytes(b"half")
    run("stage=export", f"run.dir={run_dir}")
    assert not left.exists() and (run_dir / "export" / "linearize.json").is_file()


def test_stage_all_redoes_an_export_whose_manifest_is_empty(run_dir):
    reference = logits(run_dir / "export")
    (run_dir / "export" / "linearize.json").write_text("")  # as a SIGTERM mid-write left it
    assert not stage_status(run_dir, "export", {})[0]
    run("stage=all", *BASE, f"run.dir={run_dir}")
    assert torch.equal(logits(run_dir / "export"), reference)


def test_stage_all_redoes_truncated_transfer_outputs_from_the_checkpoint(run_dir, caplog):
    weights = run_dir / "transfer" / "attention.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])  # a disk that filled while transfer wrote it
    with caplog.at_level("INFO"):
        run("stage=all", *BASE, f"run.dir={run_dir}")
    assert weights.read_bytes() == whole
    assert "resumed from" in caplog.text and "finetune already done" in caplog.text


def test_stage_all_exports_finetune_after_an_export_of_transfer(tmp_path):
    run_dir = tmp_path / "run"
    run("stage=transfer", *BASE, f"run.dir={run_dir}")
    run("stage=export", f"run.dir={run_dir}")
    assert read_manifest(run_dir / "export")["source"] == str(run_dir / "transfer")
    run("stage=all", *BASE, f"run.dir={run_dir}")
    assert read_manifest(run_dir / "export")["source"] == str(run_dir / "finetune")


def test_stage_all_with_another_attention_reruns_every_stage(run_dir):
    run("stage=all", *BASE, "attention.window=4", f"run.dir={run_dir}")
    for stage in ("transfer", "finetune"):
        assert read_manifest(run_dir / stage)["attention"]["window"] == 4, stage
    export = read_manifest(run_dir / "export")["fingerprint"]
    assert export["upstream.finetune"] == read_manifest(run_dir / "finetune")["fingerprint_hash"]


def test_read_only_stages_take_the_model_from_the_run(run_dir):
    text = str(_raises(RunDirError, checked_config_of, "stage=export", "run.seed=1", f"run.dir={run_dir}"))
    assert "run.seed: 0 -> 1" in text
    text = str(_raises(RunDirError, checked_config_of, "stage=eval", "model=smollm2-135m", f"run.dir={run_dir}"))
    assert "model.init: 'random' -> 'pretrained'" in text
    text = str(_raises(RunDirError, checked_config_of, "stage=generate", "prompt=x", "attention.window=4", f"run.dir={run_dir}"))
    assert "attention.window: 8 -> 4" in text
    adopted = checked_config_of("stage=export", f"run.dir={run_dir}")  # the composed default is smollm2
    assert adopted.model.name == "tiny-llama" and adopted.attention.window == 8
    # stage 2 from stage 1 trains stage 1's attention: another one on the command line is refused
    text = str(_raises(RunDirError, checked_config_of, "stage=finetune", *BASE, "attention.sinks=2", f"run.dir={run_dir}"))
    assert "attention.sinks: 4 -> 2" in text and "finetune.start=swap" in text
    from linearize.fingerprint import adopt_source

    plain = config("stage=finetune", "model=tiny-llama", f"run.dir={run_dir}")
    assert plain.attention.window == 64 and adopt_source(plain, ["model=tiny-llama"]).attention.window == 8


def test_a_stale_downstream_output_is_refused(run_dir):
    shutil.rmtree(run_dir / "work" / "transfer")
    run("stage=transfer", *BASE, "train.lr=0.02", f"run.dir={run_dir}")  # transfer made again
    text = str(_raises(RunDirError, checked_config_of, "stage=export", f"run.dir={run_dir}"))
    assert "finetune is stale" in text and "stage=finetune" in text


def checked_config_of(*overrides: str):
    register_configs()
    overrides = (*overrides, f"data_dir={data_root()}")
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return checked_config(compose(config_name="config", overrides=list(overrides)), list(overrides))


@pytest.mark.parametrize("stage", ["transfer", "uptrain"])
def test_a_window_covering_every_position_is_refused(tmp_path, stage):
    overrides = (f"stage={stage}", "model=tiny-llama", "attention=lolcats", "data.seq_len=64", f"run.dir={tmp_path}")
    text = str(_raises(ValueError, preflight, config(*overrides)))
    assert "attention.window=64 covers every position of the data.seq_len=64" in text and "Raise data.seq_len" in text


def test_bad_values_for_later_stages_fail_before_the_first_starts(tmp_path):
    run_dir = tmp_path / "run"
    text = str(_raises(ValueError, checked_config_of, "stage=all", *BASE, "+adapter.options.no_such_option=1",
                       f"run.dir={run_dir}"))  # fmt: skip
    assert "peft's LoraConfig rejects adapter.options={'r': 8" in text and "no_such_option" in text
    assert not (run_dir / "work").exists()


def test_backend_and_logging_the_machine_cannot_serve(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    overrides = ("stage=transfer", *BASE, f"run.dir={tmp_path}", "run.device=cpu")
    if not torch.cuda.is_available():
        text = str(_raises(ValueError, preflight, config(*overrides, "attention.backend=triton", "attention.sinks=0")))
        assert "attention.backend=triton cannot run here" in text and "TRITON_INTERPRET" in text
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    text = str(_raises(ValueError, preflight, config(*overrides, "logging.wandb=online")))
    assert "logging.wandb=online needs a wandb login" in text


def test_a_second_process_on_the_run_dir_is_refused_and_a_dead_ones_lock_taken_over(tmp_path, caplog):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from linearize.rundir import lock_run_dir; lock_run_dir({str(tmp_path)!r}); "
         "print('held', flush=True); import time; time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        text = str(_raises(RunDirError, lock_run_dir, tmp_path))
        assert f"in use by PID {holder.pid} on host" in text and "one process per run directory" in text
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level("INFO"):
        lock_run_dir(tmp_path)  # the holder was killed: its lock is free, its name still in the file
    assert f"took over the lock left by PID {holder.pid}" in caplog.text


@pytest.mark.parametrize("damage", ["truncated adapter", "empty manifest", "partial manifest", "missing file"])
def test_a_damaged_converted_dir_names_the_file_and_the_rebuild(run_dir, damage):
    export = run_dir / "export"
    if damage == "truncated adapter":
        data = (export / "adapter.safetensors").read_bytes()
        (export / "adapter.safetensors").write_bytes(data[:-10])
        named = "adapter.safetensors"
    elif damage == "missing file":
        (export / "attention.safetensors").unlink()
        named = "attention.safetensors"
    else:
        text = (export / "linearize.json").read_text()
        (export / "linearize.json").write_text("" if damage == "empty manifest" else text[: len(text) // 2])
        named = "linearize.json"
    message = str(_raises(RunDirError, load_converted, export))
    assert named in message and f"stage=export run.dir={run_dir}" in message


def test_a_tokenizer_with_its_own_code_is_refused(run_dir):
    import json

    config_file = run_dir / "export" / "tokenizer_config.json"
    tok = json.loads(config_file.read_text())
    tok["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    config_file.write_text(json.dumps(tok))
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        load_converted(run_dir / "export")


def test_outputs_honour_the_umask(run_dir):
    old = os.umask(0o027)
    try:
        run("stage=export", "export.merge=true", f"run.dir={run_dir}")
    finally:
        os.umask(old)
    assert (run_dir / "export").stat().st_mode & 0o777 == 0o750
    assert (run_dir / "export" / "model.safetensors").stat().st_mode & 0o777 == 0o640


def _raises(exc, call, *args):
    with pytest.raises(exc) as err:
        call(*args)
    return err.value


def test_lock_file_names_the_holder(tmp_path):
    lock_run_dir(tmp_path)
    text = (tmp_path / ".lock").read_text()
    assert text.startswith(f"PID {os.getpid()} on host ") and time.strftime("%Y-") in text


def test_a_teacher_only_eval_is_fingerprinted_by_its_eval_settings(tmp_path):
    """With no converted model, eval scores the teacher: stage=all must rerun it when the eval
    settings change (its fingerprint holds them), and skip it when they do not."""
    from linearize.fingerprint import stage_fingerprint

    def fingerprint(*overrides):
        return stage_fingerprint(build_config("stage=eval", "model=tiny-llama", f"run.dir={tmp_path}", *overrides), "eval")

    base = fingerprint()
    assert base["teacher_only"] is True and not any(k.startswith("upstream.") for k in base)
    assert fingerprint() == base
    assert fingerprint("eval.limit=5")["eval.limit"] == 5 != base["eval.limit"]
    assert fingerprint("eval.ppl_tokens=64") != base
