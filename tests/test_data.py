"""Data pipeline: template, masking, packing, split, determinism and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from linearize.config import DataConfig
from linearize.data import (
    ALPACA_NO_INPUT,
    ALPACA_WITH_INPUT,
    IGNORE_INDEX,
    pack,
    prepare_data,
    prompt_and_response,
    read_records,
    tokenize,
)
from tests.conftest import data_root


def _alpaca_file(tmp_path, n=40, name="a.json"):
    records = [
        {"instruction": f"Add {i} and {i + 1}.", "input": "" if i % 2 else f"x={i}", "output": str(2 * i + 1)}
        for i in range(n)
    ]
    (tmp_path / name).write_text(json.dumps(records))
    return records


def _cfg(**kw) -> DataConfig:
    base = dict(name="t", format="alpaca", files=["a.json"], seq_len=32, val_fraction=0.1)
    return DataConfig(**{**base, **kw})


def test_alpaca_template_with_and_without_input():
    p, r = prompt_and_response({"instruction": "Sum.", "input": "1 2", "output": "3"})
    assert p == ALPACA_WITH_INPUT.format(instruction="Sum.", input="1 2") and r == "3"
    assert p.endswith("### Input:\n1 2\n\n### Response:\n")
    p, _ = prompt_and_response({"instruction": "Hi.", "input": "  ", "output": "Hello"})
    assert p == ALPACA_NO_INPUT.format(instruction="Hi.")
    assert "### Input" not in p


def test_prompt_tokens_masked_response_kept(tokenizer):
    cfg = _cfg()
    record = {"instruction": "Say yes.", "input": "", "output": "Yes"}
    [(ids, labels)] = tokenize([record], tokenizer, cfg)
    response = tokenizer("Yes", add_special_tokens=False)["input_ids"]
    n_prompt = len(ids) - len(response) - 1
    assert ids[-1] == tokenizer.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == response + [tokenizer.eos_token_id]
    [(_, unmasked)] = tokenize([record], tokenizer, _cfg(mask_prompt=False))
    assert unmasked == ids


def test_pack_concatenates_and_drops_tail():
    examples = [([1, 2, 3], [-100, 2, 3]), ([4, 5], [4, 5]), ([6, 7, 8, 9], [6, 7, 8, 9])]
    ids, labels = pack(examples, seq_len=4)
    assert ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert labels.tolist() == [[-100, 2, 3, 4], [5, 6, 7, 8]]


def test_prepare_is_deterministic_and_split_is_disjoint(tmp_path, tokenizer):
    _alpaca_file(tmp_path, n=60)
    a = prepare_data(_cfg(), tokenizer, tmp_path, seed=1)
    b = prepare_data(_cfg(), tokenizer, tmp_path, seed=1)
    c = prepare_data(_cfg(), tokenizer, tmp_path, seed=2)
    assert torch.equal(a.train.input_ids, b.train.input_ids)
    assert torch.equal(a.val.labels, b.val.labels)
    assert not torch.equal(a.train.input_ids, c.train.input_ids)
    assert a.train.input_ids.shape[1] == 32 and a.val.examples == 6 and a.train.examples == 54
    # No example lands in both splits: the instruction numbers are unique per record.
    text_val = tokenizer.decode(a.val.input_ids.flatten())
    text_train = tokenizer.decode(a.train.input_ids.flatten())
    val_instr = {line for line in text_val.splitlines() if line.startswith("Add ")}
    train_instr = {line for line in text_train.splitlines() if line.startswith("Add ")}
    assert val_instr and train_instr and not (val_instr & train_instr)


def test_max_examples_limits_after_shuffle(tmp_path, tokenizer):
    _alpaca_file(tmp_path, n=60)
    data = prepare_data(_cfg(max_examples=20), tokenizer, tmp_path, seed=0)
    assert data.train.examples + data.val.examples == 20


def test_text_files_txt_and_jsonl(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first block of text\n\nsecond block\n\n\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": "third"}) + "\n")
    cfg = DataConfig(name="t", format="text", files=["a.txt"], seq_len=4)
    assert read_records(cfg, tmp_path) == [{"text": "first block of text"}, {"text": "second block"}]
    cfg = DataConfig(name="t", format="text", files=["b.jsonl"], text_field="body", seq_len=4)
    assert read_records(cfg, tmp_path) == [{"text": "third"}]
    cfg = DataConfig(name="t", format="text", files=["b.jsonl"], seq_len=4)
    with pytest.raises(ValueError, match="no field data.text_field='text'"):
        read_records(cfg, tmp_path)


def test_missing_file_names_path_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        read_records(_cfg(files=["nope.json"]), tmp_path)
    assert str(tmp_path / "nope.json") in str(err.value)
    assert "LINEARIZE_DATA" in str(err.value) and "data_dir=" in str(err.value)


def test_empty_dataset_is_an_error(tmp_path):
    (tmp_path / "a.json").write_text("[]")
    with pytest.raises(ValueError, match="holds no records"):
        read_records(_cfg(), tmp_path)


def test_bad_records_are_errors(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(ValueError, match=r"lacks \['output'\]"):
        read_records(_cfg(), tmp_path)
    (tmp_path / "a.json").write_text(json.dumps({"instruction": "x"}))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        read_records(_cfg(), tmp_path)


def test_too_little_data_for_seq_len(tmp_path, tokenizer):
    _alpaca_file(tmp_path, n=10)
    with pytest.raises(ValueError, match="less than one row of data.seq_len=4096"):
        prepare_data(_cfg(seq_len=4096), tokenizer, tmp_path, seed=0)


def test_shared_instruction_data_reads_fully():
    cfg = DataConfig(
        name="alpaca-local",
        files=["instruct/gsm_8k_train.json", "instruct/gpteacher_roleplay.json"],
    )
    records = read_records(cfg, data_root())
    assert len(records) == 7473 + 3146
    assert all(r["instruction"] and r["output"] for r in records[:100])
