"""Decoding with the recurrent state: prefill + steps == one full forward, generate(), the stage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from linearize.attention.cache import RecurrentState, recurrent_entry
from linearize.config import GenerateConfig, validate
from linearize.generate import cache_bytes, format_prompt, generate, run_generate
from linearize.models.convert import save_converted
from linearize.models.load import load_teacher, load_tokenizer
from linearize.models.swap import set_mode, swap_attention
from linearize.stages import prepare, preflight
from tests.conftest import build_config, compose_config, data_root

VARIANTS = {
    "lolcats": ("attention=lolcats", "attention.window=4", "attention.sinks=0"),
    "lolcats+softmax0": ("attention=lolcats", "attention.window=4", "attention.softmax_layers=[0]", "attention.sinks=0"),
    "lolcats+sinks": ("attention=lolcats", "attention.window=4", "attention.sinks=3"),
    "hedgehog": ("attention=hedgehog",),
    "t2r": ("attention=t2r",),
    "elu": ("attention=elu",),
    "relu": ("attention=relu",),
    "liger": ("attention=liger", "attention.window=4"),
    "liger-no-window": ("attention=liger", "attention.window=0"),
    "supra": ("attention=supra",),
}


def converted(*overrides: str):
    cfg = build_config("model=tiny-llama", *overrides)
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=0).float()
    swap_attention(model, cfg.attention, seed=0)
    with torch.no_grad():  # move every new parameter off its initialisation
        for name, p in model.named_parameters():
            if ".mixer." in name:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prefill_then_steps_equal_a_full_forward(variant):
    model = converted(*VARIANTS[variant])
    ids = torch.randint(0, model.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        parts = [model(ids[:, :9], cache=cache, use_cache=True).logits]  # prefill: chunked form
        parts.append(model(ids[:, 9:14], cache=cache, use_cache=True).logits)  # chunked, from a state
        for t in range(14, 23):  # one recurrent step per token
            parts.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-5)
    assert cache.get_seq_length() == 23
    kinds = [type(entry) for entry in cache.layers]
    expected = DynamicLayer if "softmax0" in variant else RecurrentState
    assert kinds == [expected, RecurrentState], kinds


@pytest.mark.parametrize("variant", ["lolcats", "lolcats+sinks"])
def test_decoding_state_does_not_grow_with_context(variant):
    model = converted(*VARIANTS[variant])
    sizes = {}
    for context in (16, 64, 256):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, context)), cache=cache, use_cache=True)
            model(torch.randint(0, 1000, (1, 1)), cache=cache, use_cache=True)
        sizes[context] = cache_bytes(cache)
    assert sizes[16] == sizes[64] == sizes[256] > 0, sizes


@pytest.mark.parametrize("variant", ["lolcats", "lolcats+softmax0", "liger"])
def test_generate_decodes_with_the_recurrent_state_by_default(variant):
    model = converted(*VARIANTS[variant])
    prompt = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
        plain = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(out.sequences, plain)
    assert isinstance(out.cache.layers[1], RecurrentState) and out.cache.get_seq_length() == 19


def test_beam_search_reorders_the_states():
    model = converted(*VARIANTS["lolcats"])
    prompt = torch.randint(0, 1000, (1, 10), generator=torch.Generator().manual_seed(3))
    kw = {"max_new_tokens": 6, "do_sample": False, "num_beams": 3}
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


def test_a_cache_already_holding_keys_is_refused():
    model = converted(*VARIANTS["lolcats"])
    cache = DynamicCache(config=model.config)
    cache.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), layer_idx=0)
    with pytest.raises(ValueError, match="slot 0 already holds 3 tokens"):
        recurrent_entry(cache, 0)


def test_teacher_mode_decodes_with_keys_and_values_and_transfer_mode_refuses_a_cache():
    model = converted(*VARIANTS["lolcats"])
    set_mode(model, "teacher")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DynamicCache(config=model.config)
        steps = [model(ids[:, :8], cache=cache).logits] + [model(ids[:, t : t + 1], cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    assert all(type(entry) is DynamicLayer for entry in cache.layers)
    set_mode(model, "transfer")  # stage 1 never decodes: a filled cache is refused
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids[:, :1], cache=cache, use_cache=True)


def test_crop_is_refused_clearly():
    entry = RecurrentState()
    entry.crop(0)
    with pytest.raises(NotImplementedError, match="cannot forget"):
        entry.crop(2)


def _tokenizer():
    cfg = build_config("model=tiny-llama")
    return load_tokenizer(cfg.model, cfg.cache_dir)


def _run_with_transfer_output(tmp_path: Path) -> None:
    """A run dir holding a stage-1 converted model (untrained weights suffice here)."""
    cfg = build_config("model=tiny-llama", "attention=lolcats", "attention.window=4", f"run.dir={tmp_path}")
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=0)
    swap_attention(model, cfg.attention, seed=0)
    save_converted(model, tmp_path / "transfer", teacher=cfg.model, attention=cfg.attention, softmax_layers=[])


def _generate_config(tmp_path: Path, *overrides: str):
    dc = compose_config("stage=generate", "model=tiny-llama", "attention=lolcats", "attention.window=4",
                        f"run.dir={tmp_path}", f"data_dir={data_root()}", "generate.max_new_tokens=5",
                        *overrides)  # fmt: skip
    return validate(dc), dc


def test_generate_stage_streams_the_answer(tmp_path):
    _run_with_transfer_output(tmp_path)
    config, dc = _generate_config(tmp_path, "prompt=Name a colour.")
    preflight(config)
    out = io.StringIO()
    assert run_generate(prepare(config, dc), out=out) == tmp_path / "transfer"
    assert out.getvalue(), "nothing was streamed"


def test_streamed_text_is_the_generated_text():
    model = converted(*VARIANTS["lolcats"])
    tokenizer = _tokenizer()
    out = io.StringIO()
    result = generate(model, tokenizer, "Once upon a time", GenerateConfig(max_new_tokens=7), stream=out)
    assert result["new_tokens"] == 7 and result["prompt_tokens"] > 0 and result["state_bytes"] > 0
    assert out.getvalue() == result["text"] + "\n"


def test_generate_stage_interactive_reads_until_eof(tmp_path):
    _run_with_transfer_output(tmp_path)
    config, dc = _generate_config(tmp_path, "generate.interactive=true")
    lines = iter(["first question", "second question"])

    def read(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_generate(prepare(config, dc), read=read, out=out)
    assert out.getvalue().count("\n") >= 2  # one streamed answer per prompt


def test_generate_stage_checks_before_loading(tmp_path):
    config, _ = _generate_config(tmp_path)
    with pytest.raises(ValueError, match='prompt="..." or generate.interactive=true'):
        preflight(config)
    config, _ = _generate_config(tmp_path, "prompt=hi")
    with pytest.raises(FileNotFoundError, match="no converted model yet"):
        preflight(config)


def test_prompts_use_the_training_template():
    assert "### Instruction:\nName a colour." in format_prompt("Name a colour.", "alpaca")
    assert format_prompt("Once upon", "text") == "Once upon"
