"""`python -m linearize` as a user runs it, in a subprocess, on tiny-llama."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT, data_root

pytestmark = pytest.mark.slow


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "linearize", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_help_lists_groups_and_options():
    out = run_cli("--help")
    assert out.returncode == 0, out.stderr
    for line in (
        "stage: all, eval, export, finetune, generate, prepare, transfer, uptrain",
        "adapter: dora, fourierft, lora, olora, pissa, vera",
        "attention: deltanet, elu, gated_deltanet, hedgehog, liger, lolcats, relu, softmax, supra, t2r",
        "data: alpaca-clean, alpaca-local, text",
        "accelerate: ddp, fsdp, fsdp-cpu, multinode, single",
        "recipe: liger, lolcats, supra",
    ):
        assert line in out.stdout
    assert "smollm2-135m" in out.stdout and "llama3.1-405b" in out.stdout


def test_prepare_tiny_llama_writes_resolved_config(tmp_path):
    run_dir = tmp_path / "run"
    out = run_cli(
        "stage=prepare", "model=tiny-llama", "data.max_examples=100", "data.seq_len=128",
        f"run.dir={run_dir}", f"data_dir={data_root()}",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name"] == "tiny-llama" and saved["data"]["seq_len"] == 128
    assert saved["run"]["dir"] == str(run_dir)
    assert "${" not in (run_dir / "config.yaml").read_text()  # interpolations resolved
    log = (run_dir / "linearize.log").read_text()
    assert "data 'alpaca-local': train" in log and "teacher 'tiny-llama'" in log


def test_bad_value_exits_before_any_work(tmp_path):
    out = run_cli("model=tiny-llama", "attention.window=-5", f"run.dir={tmp_path / 'r'}")
    assert out.returncode == 2
    assert "attention.window=-5 must be >= 0" in out.stdout + out.stderr
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_unknown_model_lists_choices():
    out = run_cli("model=llama9")
    assert out.returncode != 0
    assert "Could not find 'model/llama9'" in out.stderr
    assert "tiny-llama" in out.stderr and "mistral-7b" in out.stderr


def test_missing_data_file_fails_before_model_load(tmp_path):
    out = run_cli(
        "stage=prepare", "model=tiny-llama", f"data_dir={tmp_path}", f"run.dir={tmp_path / 'r'}"
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "instruct/gsm_8k_train.json" in text and "LINEARIZE_DATA" in text
    assert "teacher 'tiny-llama'" not in text


def test_transfer_runs_and_resumes_from_the_command_line(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "stage=transfer", "model=tiny-llama", "attention=lolcats", "attention.window=8", "data.max_examples=60",
        "data.seq_len=64", "train.grad_accum=1", "train.eval_every=2", f"run.dir={run_dir}",
        f"data_dir={data_root()}",
    ]  # fmt: skip
    first = run_cli(*args, "train.max_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    out, work = run_dir / "transfer", run_dir / "work" / "transfer"
    for name in ("attention.safetensors", "result.json", "transfer_report.png", "linearize.json"):
        assert (out / name).is_file(), name
    assert (work / "best.safetensors").is_file()
    assert (work / "checkpoints" / "latest").read_text() == "step-0000002"
    second = run_cli(*args, "train.max_steps=4", "run.resume=true")
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert "resumed from" in log and "at step 2 of 4" in log
    assert (work / "checkpoints" / "latest").read_text() == "step-0000004"


def test_stage_all_runs_transfer_finetune_export_and_resumes_between_stages(tmp_path):
    run_dir = tmp_path / "run"
    args = [
        "stage=all", "model=tiny-llama", "attention=lolcats", "attention.window=8",
        "data.max_examples=60", "data.seq_len=64", "train.grad_accum=1", "train.max_steps=2",
        "train.eval_every=1", f"run.dir={run_dir}", f"data_dir={data_root()}",
    ]  # fmt: skip
    first = run_cli(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    for stage in ("transfer", "finetune", "export"):
        assert (run_dir / stage / "linearize.json").is_file(), stage
    # as if interrupted after stage 1: the rerun skips transfer and redoes the rest
    import shutil

    shutil.rmtree(run_dir / "finetune")
    shutil.rmtree(run_dir / "export")
    second = run_cli(*args)
    log = second.stdout + second.stderr
    assert second.returncode == 0, second.stderr[-3000:]
    assert "transfer already done" in log and "running finetune" in log and "running export" in log
    import linearize

    model, tokenizer = linearize.load_converted(run_dir / "export")
    assert model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=2).shape[1] >= 2
