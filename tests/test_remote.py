"""A converted directory loads with transformers alone (trust_remote_code), without linearize."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from linearize.config import validate
from linearize.models.convert import build_adapter, load_converted, save_converted
from linearize.models.swap import swap_attention
from linearize.stages.export import run as run_export
from linearize.stages.finetune import run as run_finetune
from linearize.stages.prepare import prepare
from tests.conftest import compose_config, data_root

TINY = ("model=tiny-llama", "attention=lolcats", "attention.window=8", "data.max_examples=60",
        "data.seq_len=64", "train.grad_accum=1", "train.max_steps=2", "train.eval_every=1",
        "train.lr=1e-2")  # fmt: skip

# Runs in a fresh interpreter in which `import linearize` fails.
LOAD = """
import sys, torch
sys.modules["linearize"] = None
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
x = torch.load(sys.argv[2])
with torch.no_grad():
    torch.save(model(input_ids=x, use_cache=False).logits, sys.argv[3])
    # generate() decodes with the recurrent state by default, as with linearize installed
    prompt = x[:1, :10]
    out = model.generate(prompt, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    plain = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
assert torch.equal(out.sequences, plain), (out.sequences, plain)
kinds = {type(layer).__name__ for layer in out.cache.layers}
assert "RecurrentState" in kinds, kinds
"""


def prepared(tmp_path: Path, *overrides: str):
    dc = compose_config(*TINY, f"data_dir={data_root()}", f"run.dir={tmp_path}", *overrides)
    return prepare(validate(dc), dc)


def remote_logits(directory: Path, x: torch.Tensor, tmp_path: Path) -> torch.Tensor:
    torch.save(x, tmp_path / "x.pt")
    out = subprocess.run(
        [sys.executable, "-c", LOAD, str(directory), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    return torch.load(tmp_path / "y.pt")


def test_merged_export_loads_with_transformers_alone(tmp_path):
    prep = prepared(tmp_path, "finetune.start=swap", "attention.sinks=2")  # the sinks travel in the file too
    run_finetune(prep)
    out = run_export(prepared(tmp_path, "stage=export", "export.merge=true"))
    assert (out / "modeling_linearize.py").is_file()
    expected, _ = load_converted(out)
    x = torch.randint(0, 1000, (2, 30))
    with torch.no_grad():
        want = expected(input_ids=x).logits
    torch.testing.assert_close(remote_logits(out, x, tmp_path), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["lolcats", "gated_deltanet"])  # each kind's math travels in the file
def test_deltas_over_a_local_teacher_load_with_transformers_alone(tmp_path, attention):
    prep = prepared(tmp_path)
    teacher_dir = tmp_path / "teacher"
    prep.teacher.save_pretrained(teacher_dir)
    local = replace(prep.config.model, init="pretrained", path=str(teacher_dir), tokenizer=None)
    if attention != "lolcats":  # the delta rule beside a window
        prep.config.attention = validate(compose_config("model=tiny-llama", f"attention={attention}", "attention.window=8")).attention
    swap_attention(prep.teacher, prep.config.attention)
    model = build_adapter(prep.teacher, prep.config.adapter)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    out = save_converted(model, tmp_path / "converted", teacher=local, attention=prep.config.attention,
                         softmax_layers=[], adapter=prep.config.adapter)  # fmt: skip
    assert not (out / "model.safetensors").exists()
    x = torch.randint(0, 1000, (1, 25))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    torch.testing.assert_close(remote_logits(out, x, tmp_path), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_deltas_over_the_packaged_gguf_teacher_load_with_transformers_alone(tmp_path):
    from linearize.models.load import load_teacher

    cfg = validate(compose_config("model=smollm2-135m", "attention=lolcats"))
    teacher = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"))
    swap_attention(teacher, cfg.attention)
    out = save_converted(teacher, tmp_path / "converted", teacher=cfg.model, attention=cfg.attention,
                         softmax_layers=[])  # fmt: skip
    x = torch.randint(0, 49152, (1, 20))
    with torch.no_grad():
        want = teacher(input_ids=x).logits
    # the subprocess dequantizes the GGUF file itself, as a user without linearize would
    torch.testing.assert_close(remote_logits(out, x, tmp_path), want, rtol=1e-4, atol=1e-4)
