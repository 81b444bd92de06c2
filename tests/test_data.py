"""Data pipeline: template, masking, packing, split, determinism, clear errors, and streaming
(the same result as the whole-corpus-in-lists algorithm, in bounded memory)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import textwrap

import pytest
import torch

from linearize import data as data_module
from linearize import datafiles

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
from tests.conftest import ROOT, data_root


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


# --- streaming: equal to the old whole-corpus algorithm, in bounded memory ---------------------


def _oracle_records(cfg: DataConfig, root) -> list[dict[str, str]]:
    """The old reader: each file read whole, then split (the normalisation is shared)."""
    records = []
    for path in datafiles.local_files(cfg, root):
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".txt":
            records += [{"text": b.strip()} for b in text.split("\n\n") if b.strip()]
            continue
        if path.suffix == ".jsonl":
            values = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            values = json.loads(text)
        records += [data_module._normalise(v, cfg, path) for v in values]
    return records


def _oracle_prepare(cfg: DataConfig, tokenizer, root, seed: int) -> dict[str, tuple]:
    """The old prepare_data: every record and token in Python lists, tokenized per split."""
    records = _oracle_records(cfg, root)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n_val = max(1, math.ceil(len(order) * cfg.val_fraction))
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    out = {}
    for name, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        pairs = [prompt_and_response(records[i]) for i in idx]
        prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
        responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
        ids, labels = [], []
        for p, r in zip(prompts, responses):
            ids += p + r + eos
            labels += ([IGNORE_INDEX] * len(p) if cfg.mask_prompt else p) + r + eos
        n = len(ids) // cfg.seq_len * cfg.seq_len
        shape = (-1, cfg.seq_len)
        out[name] = (
            torch.tensor(ids[:n], dtype=torch.long).view(shape),
            torch.tensor(labels[:n], dtype=torch.long).view(shape),
            len(idx),
        )
    return out


def _assert_same_as_oracle(cfg, tokenizer, root, seed=0):
    expected = _oracle_prepare(cfg, tokenizer, root, seed)
    got = prepare_data(cfg, tokenizer, root, seed=seed)
    for name, split in (("train", got.train), ("val", got.val)):
        ids, labels, examples = expected[name]
        assert split.input_ids.dtype == split.labels.dtype == torch.long
        assert torch.equal(split.input_ids, ids), name
        assert torch.equal(split.labels, labels), name
        assert split.examples == examples, name


def _text_files(tmp_path):
    """Blocks with runs of blank lines, CRLF, surrounding spaces and a long block; a .jsonl
    with blank lines and line breaks that only str.splitlines sees (form feed, U+2028)."""
    rng = random.Random(3)
    words = ["alpha", "beta", "gamma", "delta", "über", "naïve", "日本語", "x", "\\t", "42"]
    blocks = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))) for _ in range(150)]
    blocks[7] = " ".join(words * 200)  # longer than many read chunks
    seps = ["\n\n", "\n\n\n", "\n\n\n\n", " \n\n", "\n \n\n", "\r\n\r\n"]
    text = "\n\n  " + "".join(b + rng.choice(seps) for b in blocks) + "tail\n"
    (tmp_path / "a.txt").write_bytes(text.encode("utf-8"))
    lines = [json.dumps({"text": b}, ensure_ascii=False) for b in blocks[:60]]
    lines[3] += "\x0c" + json.dumps({"text": "after a form feed"})
    lines[5] += "\u2028" + json.dumps({"text": "after a line separator"}, ensure_ascii=False)
    lines[9] = "   "
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")


@pytest.fixture
def small_buffers(monkeypatch):
    """Tiny batches and reads, so that every batch and chunk boundary is crossed."""
    monkeypatch.setattr(data_module, "_TOKENIZE_BATCH", 7)
    monkeypatch.setattr(datafiles, "_READ_CHARS", 5)


@pytest.mark.parametrize(
    "files,kw",
    [(["a.txt"], {}),
     (["a.txt"], {"max_examples": 50, "seq_len": 16}),
     (["b.jsonl"], {"add_eos": False}),
     (["b.jsonl", "a.txt"], {"max_examples": 1000, "val_fraction": 0.3}),
     (["a.txt", "b.jsonl"], {"seq_len": 7})],
)  # fmt: skip
def test_text_same_as_whole_corpus_algorithm(tmp_path, tokenizer, small_buffers, files, kw):
    _text_files(tmp_path)
    cfg = DataConfig(**{"name": "t", "format": "text", "files": files, "seq_len": 32, **kw})
    assert read_records(cfg, tmp_path) == _oracle_records(cfg, tmp_path)
    _assert_same_as_oracle(cfg, tokenizer, tmp_path, seed=5)


@pytest.mark.parametrize(
    "kw",
    [{}, {"mask_prompt": False}, {"max_examples": 37}, {"max_examples": 37, "mask_prompt": False}],
)
def test_alpaca_same_as_whole_corpus_algorithm(tmp_path, tokenizer, small_buffers, kw):
    _alpaca_file(tmp_path, n=120)
    lines = [json.dumps(r) for r in _alpaca_file(tmp_path, n=30, name="b.json")]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    cfg = _cfg(files=["a.json", "c.jsonl"], val_fraction=0.2, **kw)
    _assert_same_as_oracle(cfg, tokenizer, tmp_path, seed=11)


def test_shared_alpaca_same_as_whole_corpus_algorithm(tokenizer):
    cfg = DataConfig(name="alpaca-local", files=["instruct/gpteacher_roleplay.json"], seq_len=256,
                     max_examples=400)  # fmt: skip
    _assert_same_as_oracle(cfg, tokenizer, data_root(), seed=0)


@pytest.mark.parametrize("max_examples", [None, 25])
def test_hub_rows_stream_like_a_file(tmp_path, tokenizer, monkeypatch, max_examples):
    records = _alpaca_file(tmp_path, n=80)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    loads = []

    class Rows:  # iterable only: no len(), no list() of the whole data set
        def __iter__(self):
            return iter(records)

    monkeypatch.setattr(data_module, "_load_hub", lambda cfg: loads.append(cfg.hub) or Rows())
    hub_cfg = _cfg(files=[], hub="some/set", max_examples=max_examples)
    hub = prepare_data(hub_cfg, tokenizer, tmp_path, seed=3)
    local_cfg = _cfg(files=["a.jsonl"], max_examples=max_examples)
    local = prepare_data(local_cfg, tokenizer, tmp_path, seed=3)
    assert loads == ["some/set"]  # loaded once, even when read twice (count, then tokenize)
    assert torch.equal(hub.train.input_ids, local.train.input_ids)
    assert torch.equal(hub.val.labels, local.val.labels)


def test_jsonl_errors_as_when_parsed_whole(tmp_path):
    # A bad record before a JSON syntax error: the file still fails on its syntax first.
    (tmp_path / "b.jsonl").write_text('{"body": "x"}\n\n{"text": "y"}\n{"text": \n')
    cfg = DataConfig(name="t", format="text", files=["b.jsonl"], seq_len=4)
    with pytest.raises(ValueError, match="b.jsonl', line 4: not valid JSON"):
        read_records(cfg, tmp_path)
    # Line numbers count the breaks str.splitlines knows, not only \n.
    (tmp_path / "b.jsonl").write_text('{"text": "x"}\x0c{"text": \n', encoding="utf-8")
    with pytest.raises(ValueError, match="b.jsonl', line 2: not valid JSON"):
        read_records(cfg, tmp_path)


_MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys
    from linearize.config import DataConfig
    from linearize.data import prepare_data
    from linearize.models.load import load_tokenizer
    from tests.conftest import build_config

    config = build_config("model=tiny-llama")
    tokenizer = load_tokenizer(config.model, config.cache_dir)
    rows = 0
    if sys.argv[1] == "prepare":
        cfg = DataConfig(name="big", format="text", files=["big.txt"], seq_len=1024)
        rows = len(prepare_data(cfg, tokenizer, sys.argv[2], seed=0).train)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, rows)  # KiB on Linux
    """
)


def _write_corpus(path, size: int) -> None:
    """``size`` bytes of word salad in paragraphs of 20-200 words, one record per paragraph."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ne", "ra", "to", "su", "vi", "de", "an", "or", "el", "st", "qu"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(3000)]
    words += ["the", "of", "and", "a", "to", "in", "is", "that"] * 50
    with path.open("w") as f:
        written = 0
        while written < size:
            para = " ".join(rng.choices(words, k=rng.randint(20, 200))) + ".\n\n"
            written += f.write(para)


@pytest.mark.slow
def test_30mb_text_file_prepares_in_bounded_memory(tmp_path):
    """The whole-corpus algorithm peaked 2.1 GB above the tokenizer's baseline on this file
    (11M tokens in Python lists); streaming holds the int32 token buffer (45 MB) and the
    packed int64 rows (2 x 90 MB), about 0.2 GB. About 30 s on 2 cores."""
    _write_corpus(tmp_path / "big.txt", 30_000_000)

    def peak_kib(mode: str) -> tuple[int, int]:
        out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, mode, str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        peak, rows = out.stdout.split()[-2:]
        return int(peak), int(rows)

    baseline, _ = peak_kib("baseline")
    peak, rows = peak_kib("prepare")
    assert rows > 10_000  # 11M tokens in rows of 1024
    gib = (peak - baseline) / 2**20
    assert gib < 0.5, f"peak RSS {peak / 2**20:.2f} GiB, {gib:.2f} GiB above the baseline"
