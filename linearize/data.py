"""Training data: read (local files or hub), template, tokenize, split, pack.

The split is made on whole examples after a seeded shuffle, before packing, so no example is
shared between train and validation. Packing concatenates examples (each followed by EOS) and
cuts the stream into ``seq_len`` rows; the tail shorter than a row is dropped. Labels are the
input ids with instruction tokens set to -100 when ``mask_prompt`` (the model shifts them).

It streams: records are read one at a time (a .json list file excepted: it is parsed whole),
tokenized a batch at a time into one int32 buffer with per-record offsets, and packed from
that buffer in each split's shuffled order. Memory is the token buffer and the packed rows,
not the corpus as Python lists (a 30 MB text file: 0.2 GB above the tokenizer's, not 2.1 GB).
"""

from __future__ import annotations

import math
import random
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from linearize.config import DataConfig
from linearize.datafiles import json_list, jsonl_objects, txt_blocks, local_files
from linearize.log import get_logger

log = get_logger(__name__)

IGNORE_INDEX = -100
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
# How much is in flight at once: changes memory and speed, not the result.
_TOKENIZE_BATCH = 256  # records per tokenizer call


@dataclass
class Split:
    input_ids: torch.Tensor  # (N, seq_len) int64
    labels: torch.Tensor  # (N, seq_len) int64, IGNORE_INDEX where no loss
    examples: int

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


@dataclass
class PackedData:
    train: Split
    val: Split

    def summary(self) -> str:
        return (
            f"train {len(self.train)} x {self.train.input_ids.shape[1]} tokens "
            f"({self.train.examples} examples), val {len(self.val)} rows "
            f"({self.val.examples} examples)"
        )


def _file_records(path: Path, cfg: DataConfig) -> Iterator[dict[str, str]]:
    if path.suffix == ".txt":
        for block in txt_blocks(path):
            yield {"text": block}
        return
    values = json_list(path) if path.suffix == ".json" else jsonl_objects(path)
    bad = None
    for value in values:
        if bad is None:
            try:
                record = _normalise(value, cfg, path)
            except ValueError as err:
                bad = err
                continue
            yield record
    # A bad record is reported once the whole file has parsed, so that a JSON syntax error
    # further on wins, as it did when a file was parsed before its records were checked.
    if bad is not None:
        raise bad


class _Records:
    """The data set's normalised records in file order; iterable more than once. The files
    are checked (or the hub data set loaded) when it is made; records are read as it is
    iterated, one at a time."""

    def __init__(self, cfg: DataConfig, data_dir: str | Path):
        self.cfg = cfg
        self.paths = local_files(cfg, data_dir) if cfg.files else []
        self.hub = None if cfg.files else _load_hub(cfg)

    def __iter__(self) -> Iterator[dict[str, str]]:
        for path in self.paths:
            yield from _file_records(path, self.cfg)
        if self.hub is not None:
            for record in self.hub:
                yield _normalise(record, self.cfg, self.cfg.hub)


def _require_records(count: int, cfg: DataConfig) -> None:
    if not count:
        where = cfg.files or cfg.hub
        raise ValueError(
            f"data set '{cfg.name}' ({where}) holds no records; point data.files at non-empty files"
        )


def read_records(cfg: DataConfig, data_dir: str | Path) -> list[dict[str, str]]:
    """All raw records as one list, in file order (``prepare_data`` streams them instead).
    Alpaca records keep instruction/input/output; text records are ``{"text": ...}`` (a .txt
    file gives one record per blank-line block)."""
    records = list(_Records(cfg, data_dir))
    _require_records(len(records), cfg)
    return records


def _load_hub(cfg: DataConfig) -> Iterable[dict[str, Any]]:
    """The hub data set (memory-mapped Arrow rows, read as iterated)."""
    import datasets

    try:
        return datasets.load_dataset(cfg.hub, split=cfg.hub_split)
    except Exception as err:  # the hub client raises many kinds; all mean "not reachable"
        raise OSError(
            f"could not load data set {cfg.hub!r} from the hub ({type(err).__name__}: {err}). "
            "Offline, use local files instead, e.g. data=alpaca-local"
        ) from err


def _normalise(record: Any, cfg: DataConfig, origin: Any) -> dict[str, str]:
    if not isinstance(record, dict):
        raise ValueError(f"{origin}: record {record!r:.80} is not a JSON object")
    if cfg.format == "text":
        if cfg.text_field not in record:
            raise ValueError(f"{origin}: record has no field data.text_field={cfg.text_field!r}")
        return {"text": str(record[cfg.text_field])}
    missing = {"instruction", "output"} - record.keys()
    if missing:
        raise ValueError(
            f"{origin}: Alpaca record lacks {sorted(missing)}: {record!r:.80}; data.format=alpaca "
            "needs instruction, output (and optional input) in every record; for plain text set "
            "data.format=text and data.text_field"
        )
    return {k: str(record.get(k) or "") for k in ("instruction", "input", "output")}


def prompt_and_response(record: dict[str, str]) -> tuple[str, str]:
    """Alpaca's template; text records are all response (every token is trained on)."""
    if "text" in record:
        return "", record["text"]
    template = ALPACA_WITH_INPUT if record["input"].strip() else ALPACA_NO_INPUT
    return template.format(**record), record["output"]


def _encode(records: list[dict[str, str]], tokenizer) -> tuple[list[list[int]], list[list[int]]]:
    """Prompt ids (with the tokenizer's special tokens, e.g. BOS) and response ids per record."""
    pairs = [prompt_and_response(r) for r in records]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    return prompts, responses


def _eos(tokenizer, cfg: DataConfig) -> list[int]:
    return [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []


def tokenize(records: list[dict[str, str]], tokenizer, cfg: DataConfig) -> list[tuple[list, list]]:
    """(ids, labels) per record as lists, for a few records (``prepare_data`` keeps tokens in
    a compact buffer instead); the prompt gets the tokenizer's special tokens (BOS)."""
    prompts, responses = _encode(records, tokenizer)
    eos = _eos(tokenizer, cfg)
    out = []
    for p, r in zip(prompts, responses):
        masked = [IGNORE_INDEX] * len(p) if cfg.mask_prompt else p
        out.append((p + r + eos, masked + r + eos))
    return out


@dataclass
class _Tokens:
    """Tokenized records, compact: record j's ids (prompt, response, EOS) are
    ``ids[starts[j]:starts[j + 1]]``, and the first ``prompt_lens[j]`` of them are the prompt."""

    ids: np.ndarray  # (total,) int32
    starts: np.ndarray  # (records + 1,) int64
    prompt_lens: np.ndarray  # (records,) int32

    def __len__(self) -> int:
        return len(self.prompt_lens)


def _tokenize_stream(records: Iterable[dict[str, str]], tokenizer, cfg: DataConfig) -> _Tokens:
    """Tokenize ``_TOKENIZE_BATCH`` records at a time into one buffer (a token id that does not
    fit int32 raises OverflowError)."""
    eos = _eos(tokenizer, cfg)
    ids, starts, prompt_lens = array("i"), array("q", [0]), array("i")
    stream = iter(records)
    while batch := list(islice(stream, _TOKENIZE_BATCH)):
        for p, r in zip(*_encode(batch, tokenizer)):
            ids.extend(p)
            ids.extend(r)
            ids.extend(eos)
            starts.append(len(ids))
            prompt_lens.append(len(p))
    return _Tokens(
        np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32),
        np.frombuffer(starts, dtype=np.int64),
        np.frombuffer(prompt_lens, dtype=np.int32) if prompt_lens else np.zeros(0, np.int32),
    )


def _pick(records: Iterable[dict[str, str]], chosen: list[int]) -> Iterator[dict[str, str]]:
    """The records at the ``chosen`` indices (ascending); reading stops after the last."""
    wanted = iter(chosen)
    next_index = next(wanted, None)
    for index, record in enumerate(records):
        if next_index is None:
            return
        if index == next_index:
            yield record
            next_index = next(wanted, None)


def _rows(
    segments: Iterable[tuple[Any, Any]], total: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate (ids, labels) segments, ``total`` tokens in all, into ``seq_len`` rows; the
    tail shorter than a row is dropped."""
    rows = total // seq_len
    ids = np.empty(rows * seq_len, dtype=np.int64)
    labels = np.empty_like(ids)
    filled = 0
    for seg_ids, seg_labels in segments:
        if filled == ids.size:
            break
        take = min(len(seg_ids), ids.size - filled)
        ids[filled : filled + take] = seg_ids[:take]
        labels[filled : filled + take] = seg_labels[:take]
        filled += take
    shape = (rows, seq_len)
    return torch.from_numpy(ids).view(shape), torch.from_numpy(labels).view(shape)


def pack(examples: list[tuple[list, list]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack (ids, labels) pairs, as ``tokenize`` gives them, into ``seq_len`` rows."""
    return _rows(examples, sum(len(e) for e, _ in examples), seq_len)


def _pack_split(
    tokens: _Tokens, slots: np.ndarray, cfg: DataConfig
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Rows of the records at ``slots`` (in that order), and how many tokens they hold."""
    starts, prompt_lens = tokens.starts, tokens.prompt_lens

    def segments() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for slot in slots.tolist():
            ids = tokens.ids[starts[slot] : starts[slot + 1]]
            labels = ids
            if cfg.mask_prompt and prompt_lens[slot]:
                labels = ids.copy()
                labels[: prompt_lens[slot]] = IGNORE_INDEX
            yield ids, labels

    total = int((starts[slots + 1] - starts[slots]).sum())
    return *_rows(segments(), total, cfg.seq_len), total


def prepare_data(cfg: DataConfig, tokenizer, data_dir: str | Path, seed: int) -> PackedData:
    """Read, shuffle (seeded), split, tokenize and pack. Deterministic given ``seed``.

    Records stream once, all tokenized, or with ``max_examples`` twice: once to count (and
    check) them, once to tokenize only the chosen ones."""
    records = _Records(cfg, data_dir)
    if cfg.max_examples is None:
        tokens = _tokenize_stream(records, tokenizer, cfg)
        count = len(tokens)
    else:
        count = sum(1 for _ in records)
    _require_records(count, cfg)
    order = list(range(count))
    random.Random(seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n_val = max(1, math.ceil(len(order) * cfg.val_fraction))
    if len(order) - n_val < 1:
        raise ValueError(
            f"data set '{cfg.name}' has {len(order)} examples, too few to split with "
            f"data.val_fraction={cfg.val_fraction}; raise data.max_examples"
        )
    if cfg.max_examples is None:
        slots = np.asarray(order, dtype=np.int64)  # record i is slot i
    else:
        chosen = sorted(order)
        tokens = _tokenize_stream(_pick(records, chosen), tokenizer, cfg)
        slots = np.searchsorted(chosen, order)
    splits = {}
    for name, part in (("val", slots[:n_val]), ("train", slots[n_val:])):
        input_ids, labels, total = _pack_split(tokens, part, cfg)
        if len(input_ids) == 0:
            raise ValueError(
                f"the {name} split of '{cfg.name}' has {total} tokens, less than one row of "
                f"data.seq_len={cfg.seq_len}; lower data.seq_len, raise data.max_examples or "
                "data.val_fraction"
            )
        splits[name] = Split(input_ids, labels, examples=len(part))
    data = PackedData(train=splits["train"], val=splits["val"])
    log.info("data '%s': %s", cfg.name, data.summary())
    return data
