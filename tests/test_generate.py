"""Decoding with the recurrent state: prefill + steps == one full forward, generate(), the stage."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from linearize.attention.cache import RecurrentState, recurrent_entry
from linearize.attention.hooks import attention_layers, set_mode
from linearize.config import GenerateConfig, validate
from linearize.generate import cache_bytes, format_prompt, generate
from linearize.models.convert import save_converted
from linearize.models.load import load_teacher, load_tokenizer
from linearize.models.swap import swap_attention
from linearize.stages.generate import run as run_generate
from linearize.stages.preflight import preflight
from linearize.stages.prepare import prepare
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
    "deltanet": ("attention=deltanet",),
    "gated_deltanet+window": ("attention=gated_deltanet", "attention.window=4"),
}


def converted(*overrides: str, implementation: str = "sdpa"):
    cfg = build_config("model=tiny-llama", *overrides)
    model = load_teacher(cfg.model, cache_dir=cfg.cache_dir, device=torch.device("cpu"), seed=0).float()
    model.set_attn_implementation(implementation)
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


@pytest.mark.parametrize("variant", ["lolcats", "lolcats+softmax0", "liger", "gated_deltanet+window"])
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


PAD = 0


def _prompts(lengths: tuple[int, ...], seed: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 1000, (1, n), generator=g) for n in lengths]


def _batch(prompts: list[torch.Tensor], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts padded on ``side`` to one batch, and its attention mask."""
    width = max(x.shape[1] for x in prompts)
    ids, mask = [], []
    for x in prompts:
        pad = torch.full((1, width - x.shape[1]), PAD)
        ones, zeros = torch.ones_like(x), torch.zeros_like(pad)
        ids.append(torch.cat([pad, x] if side == "left" else [x, pad], 1))
        mask.append(torch.cat([zeros, ones] if side == "left" else [ones, zeros], 1))
    return torch.cat(ids), torch.cat(mask)


# Prompts longer and shorter than the window (4) and the sinks (3): rows whose decoding states
# differ in size until their windows fill.
LENGTHS = (9, 2, 5)


@pytest.mark.parametrize("mode", ["student", "teacher"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_left_padded_batch_generates_what_each_prompt_generates_alone(variant, mode):
    model = converted(*VARIANTS[variant])
    set_mode(model, mode)
    prompts = _prompts(LENGTHS)
    ids, mask = _batch(prompts, "left")
    kw = {"max_new_tokens": 7, "do_sample": False, "pad_token_id": PAD}
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, **kw)[:, ids.shape[1] :]
        alone = [model.generate(x, attention_mask=torch.ones_like(x), **kw)[:, x.shape[1] :] for x in prompts]
    assert batched.tolist() == torch.cat(alone).tolist()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_padded_scoring_equals_unpadded_in_every_mode(variant, implementation):
    """Right padding (how lm-eval scores) and left padding give each sequence's own logits;
    in transfer mode the student outputs stage 1 compares are each row's own too."""
    model = converted(*VARIANTS[variant], implementation=implementation)
    prompts = _prompts(LENGTHS, seed=5)
    for mode in ("student", "teacher", "transfer"):
        set_mode(model, mode)
        seen: dict[int, torch.Tensor] = {}
        for layer in attention_layers(model):
            layer.collector = lambda i, student, teacher, p: seen.__setitem__(i, student)
        with torch.no_grad():
            alone, students = [], []
            for x in prompts:
                alone.append(model(x, use_cache=False).logits[0])
                students.append(dict(seen))
            for side in ("right", "left"):
                ids, mask = _batch(prompts, side)
                positions = (mask.cumsum(1) - 1).clamp_min(0)  # as generate() numbers a left-padded row
                logits = model(ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
                for row, x in enumerate(prompts):
                    real = mask[row].bool()
                    torch.testing.assert_close(logits[row, real], alone[row], rtol=1e-4, atol=1e-5)
                    for i, student in students[row].items():  # transfer mode only
                        torch.testing.assert_close(seen[i][row, :, real], student[0], rtol=1e-4, atol=1e-5)
        assert (mode == "transfer") == bool(seen), (mode, sorted(seen))


def test_a_padding_mask_it_cannot_read_is_refused():
    from linearize.attention.padding import key_validity

    with pytest.raises(NotImplementedError, match="2-D or 4-D tensor mask"):
        key_validity(object(), 0, 3)
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert key_validity(mask, 0, 3).tolist() == [[False, True, True], [True, True, True]]
    assert key_validity(mask, 1, 2) is None  # the last two keys are real in both rows
    with pytest.raises(ValueError, match="covers 3 keys, fewer than this call's 4"):
        key_validity(mask, 0, 4)
    with pytest.raises(NotImplementedError, match="decodes only with use_cache=False"):
        key_validity(mask, 2, 2)  # a mask over the new keys only, not positions from 0 (Doge)


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
