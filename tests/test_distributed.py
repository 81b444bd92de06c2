"""Two CPU processes under torchrun (gloo) against one process with the same global batch.

Every comparison is between weights after a few AdamW steps from the same start. Gradients
differ only by the order of float additions (an all-reduce of two half-batch means against one
batch mean), so fp32 weights agree to a few 1e-6; the bound is 1e-5. The same holds under FSDP
(``accelerate launch`` with configs/accelerate/fsdp-cpu.yaml), where the all-reduce is a
reduce-scatter and every process holds a shard of each weight.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import ROOT, build_config, data_root

pytestmark = pytest.mark.slow

TINY = ["model=tiny-llama", "data.max_examples=80", "data.seq_len=64", "train.eval_every=1", "train.grad_accum=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs" / "accelerate" / "fsdp-cpu.yaml")]  # fmt: skip
TOLERANCE = 1e-5


def _run(prefix: list[str], *overrides: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [*prefix, "-m", "linearize", *TINY, f"data_dir={data_root()}", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _two_and_one(tmp_path: Path, *overrides: str) -> tuple[Path, Path]:
    """The same run with 2 ranks x batch 1 and with 1 process x batch 2."""
    _run(TORCHRUN, *overrides, "train.batch_size=1", f"run.dir={tmp_path / 'two'}")
    _run([sys.executable], *overrides, "train.batch_size=2", f"run.dir={tmp_path / 'one'}")
    return tmp_path / "two", tmp_path / "one"


def _assert_close(two: dict, one: dict) -> None:
    assert two.keys() == one.keys() and one
    for name in one:
        diff = (two[name] - one[name]).abs().max().item()
        assert diff < TOLERANCE, (name, diff)


def _checkpoints(stage_dir: Path) -> list[str]:
    """The checkpoints of the stage whose output is ``stage_dir`` (they live in run.dir/work/<stage>)."""
    return sorted(c.name for c in (stage_dir.parent / "work" / stage_dir.name / "checkpoints").glob("step-*"))


def test_transfer_two_ranks_equal_one_process(tmp_path):
    two, one = _two_and_one(tmp_path, "stage=transfer", "attention=lolcats", "attention.window=8", "train.max_steps=3")
    name = "transfer/attention.safetensors"
    _assert_close(load_file(two / name), load_file(one / name))
    assert len(load_file(one / name)) == 6
    # only rank 0 wrote: one checkpoint, one result, one plot
    assert _checkpoints(two / "transfer") == ["step-0000003"]
    assert (two / "transfer" / "transfer_report.png").is_file()


def test_finetune_two_ranks_equal_one_process(tmp_path):
    two, one = _two_and_one(tmp_path, "stage=finetune", "finetune.start=swap", "attention=hedgehog",
                            "train.max_steps=3", "train.lr=1e-3")  # fmt: skip
    name = "finetune/adapter.safetensors"
    _assert_close(load_file(two / name), load_file(one / name))
    assert _checkpoints(two / "finetune") == ["step-0000003"]


def test_finetune_kd_two_ranks_equal_one_process(tmp_path):
    two, one = _two_and_one(tmp_path, "stage=finetune", "finetune.start=swap", "attention=hedgehog",
                            "train.max_steps=3", "train.lr=1e-3", "finetune.objective=kd")  # fmt: skip
    name = "finetune/adapter.safetensors"
    _assert_close(load_file(two / name), load_file(one / name))


def test_uptrain_all_two_ranks_equal_one_process(tmp_path):
    two, one = _two_and_one(tmp_path, "stage=uptrain", "attention=supra", "train.trainable=all",
                            "train.max_steps=2", "train.lr=1e-3")  # fmt: skip
    name = "uptrain/model.safetensors"
    _assert_close(load_file(two / name), load_file(one / name))
    _assert_close(load_file(two / "uptrain/attention.safetensors"), load_file(one / "uptrain/attention.safetensors"))


def test_resume_under_two_ranks_equals_an_uninterrupted_run(tmp_path):
    common = ["stage=transfer", "attention=lolcats", "attention.window=8", "train.batch_size=1"]
    _run(TORCHRUN, *common, "train.max_steps=4", f"run.dir={tmp_path / 'whole'}")
    _run(TORCHRUN, *common, "train.max_steps=2", f"run.dir={tmp_path / 'parts'}")
    resumed = _run(TORCHRUN, *common, "train.max_steps=4", "run.resume=true", f"run.dir={tmp_path / 'parts'}")
    assert "resumed from" in resumed.stdout + resumed.stderr
    name = "transfer/attention.safetensors"
    whole, parts = load_file(tmp_path / "whole" / name), load_file(tmp_path / "parts" / name)
    for key in whole:  # same processes, same reduction order: bit for bit
        assert (whole[key] == parts[key]).all(), key


def test_blockwise_blocks_spread_over_ranks_match_one_rank(tmp_path):
    overrides = ["stage=transfer", "attention=lolcats", "attention.window=8", "transfer.mode=blockwise",
                 "transfer.block_size=1", "train.max_steps=2", "train.grad_accum=1", "train.batch_size=1"]  # fmt: skip
    _run(TORCHRUN, *overrides, f"run.dir={tmp_path / 'two'}")
    _run([sys.executable], *overrides, f"run.dir={tmp_path / 'one'}")
    name = "transfer/attention.safetensors"
    two, one = load_file(tmp_path / "two" / name), load_file(tmp_path / "one" / name)
    assert two.keys() == one.keys()
    for key in one:  # each block trains in one process either way: bit for bit
        assert (two[key] == one[key]).all(), key
    blocks = sorted((tmp_path / "two" / "work" / "transfer" / "blocks").iterdir())
    assert [b.name for b in blocks] == ["layers-000-000", "layers-001-001"]
    steps = [json.loads((b / "done.json").read_text())["steps"] for b in blocks]
    assert steps == [2, 2]


def test_uptrain_all_under_fsdp_two_ranks_equals_one_process_and_resumes(tmp_path):
    import torch

    from linearize.models.convert import load_converted, read_manifest
    from linearize.models.load import load_teacher
    from linearize.models.swap import swap_attention

    # constant lr: a cosine schedule planned over 2 steps ends at lr 0, so the resumed third step
    # would differ from an uninterrupted 3-step run for a reason that has nothing to do with FSDP
    common = ["stage=uptrain", "attention=supra", "train.trainable=all", "train.lr=1e-3", "train.scheduler=constant"]
    whole = _run(FSDP, *common, "train.batch_size=1", "train.max_steps=3", f"run.dir={tmp_path / 'fsdp'}")
    _run([sys.executable], *common, "train.batch_size=2", "train.max_steps=3", f"run.dir={tmp_path / 'one'}")
    _run(FSDP, *common, "train.batch_size=1", "train.max_steps=2", f"run.dir={tmp_path / 'parts'}")
    resumed = _run(FSDP, *common, "train.batch_size=1", "train.max_steps=3", "run.resume=true",
                   f"run.dir={tmp_path / 'parts'}")  # fmt: skip
    for out in (whole, resumed):  # sharded by FSDP2, not wrapped in DDP
        log = out.stdout + out.stderr
        assert "FSDP: FSDPLlamaForCausalLM sharded over 2 processes (parameters: DTensor)" in log, log[-3000:]
        assert "DistributedDataParallel" not in log
    assert "resumed from" in resumed.stdout + resumed.stderr

    fsdp, one, parts = tmp_path / "fsdp" / "uptrain", tmp_path / "one" / "uptrain", tmp_path / "parts" / "uptrain"
    trained = {**load_file(fsdp / "model.safetensors"), **load_file(fsdp / "attention.safetensors")}
    _assert_close(trained, {**load_file(one / "model.safetensors"), **load_file(one / "attention.safetensors")})
    assert read_manifest(fsdp)["trainable"] == "all" and read_manifest(fsdp)["steps"] == 3
    assert _checkpoints(fsdp) == ["step-0000003"]
    ckpt = load_file(tmp_path / "fsdp" / "work" / "uptrain" / "checkpoints" / "step-0000003" / "trainable.safetensors")
    assert {k: v.shape for k, v in ckpt.items()} == {k: v.shape for k, v in trained.items()}  # gathered, not shards

    # every weight of the model moved (train.trainable=all)
    config = build_config(*TINY, *common, f"data_dir={data_root()}")
    start = load_teacher(config.model, cache_dir=config.cache_dir, device=torch.device("cpu"), seed=config.run.seed)
    swap_attention(start, config.attention, seed=config.run.seed)
    start = dict(start.named_parameters())
    assert trained.keys() == start.keys()
    assert [n for n in start if torch.equal(trained[n], start[n])] == []

    # a run stopped after 2 steps and resumed under FSDP is the uninterrupted one, bit for bit
    for name in ("model.safetensors", "attention.safetensors"):
        expected, got = load_file(fsdp / name), load_file(parts / name)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), (name, key)

    # the written model loads on its own and carries the trained weights
    loaded, _ = load_converted(fsdp)
    params = dict(loaded.named_parameters())
    for name, tensor in trained.items():
        assert torch.equal(params[name].detach(), tensor), name
