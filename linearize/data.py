"""Training data: read (local files or hub), template, tokenize, split, pack.

The split is made on whole examples after a seeded shuffle, before packing, so no example is
shared between train and validation. Packing concatenates examples (each followed by EOS) and
cuts the stream into ``seq_len`` rows; the tail shorter than a row is dropped. Labels are the
input ids with instruction tokens set to -100 when ``mask_prompt`` (the model shifts them).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from linearize.config import DataConfig
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
_SUFFIXES = (".json", ".jsonl", ".txt")


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


def local_files(cfg: DataConfig, data_dir: str | Path) -> list[Path]:
    """The data set's local files, checked to exist and be readable kinds.

    Raises:
        FileNotFoundError: naming the missing file and how to point ``data_dir`` at it.
        ValueError: for a file of a kind we cannot read.
    """
    root = Path(data_dir).expanduser()
    paths = []
    for name in cfg.files:
        path = Path(name).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise FileNotFoundError(
                f"data file {str(path)!r} (data.files entry {name!r}) does not exist. "
                f"data_dir={str(data_dir)!r}: point it at your local copies with data_dir=/path "
                "or LINEARIZE_DATA=/path (make setup links ../shared/data to ./data when present)"
            )
        if path.suffix not in _SUFFIXES:
            raise ValueError(f"data file {str(path)!r}: expected one of {', '.join(_SUFFIXES)}")
        paths.append(path)
    return paths


def _read_json_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"data file {str(path)!r}, line {number}: not valid JSON ({err.msg} at column "
                        f"{err.colno}); a .jsonl file holds one JSON object per line"
                    ) from None
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r} is not valid JSON ({err.msg} at line {err.lineno}, column "
            f"{err.colno}); fix the file or drop it from data.files"
        ) from None
    if not isinstance(data, list):
        raise ValueError(f"{str(path)!r} must hold a JSON list of records")
    return data


def read_records(cfg: DataConfig, data_dir: str | Path) -> list[dict[str, str]]:
    """All raw records, in file order. Alpaca records keep instruction/input/output;
    text records are ``{"text": ...}`` (a .txt file gives one record per blank-line block)."""
    if cfg.files:
        records: list[dict[str, str]] = []
        for path in local_files(cfg, data_dir):
            if path.suffix == ".txt":
                blocks = path.read_text(encoding="utf-8").split("\n\n")
                records += [{"text": b.strip()} for b in blocks if b.strip()]
            else:
                records += [_normalise(r, cfg, path) for r in _read_json_records(path)]
    else:
        records = [_normalise(r, cfg, cfg.hub) for r in _load_hub(cfg)]
    if not records:
        where = cfg.files or cfg.hub
        raise ValueError(f"data set '{cfg.name}' ({where}) holds no records; point data.files at non-empty files")
    return records


def _load_hub(cfg: DataConfig) -> list[dict[str, Any]]:
    import datasets

    try:
        return list(datasets.load_dataset(cfg.hub, split=cfg.hub_split))
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


def tokenize(records: list[dict[str, str]], tokenizer, cfg: DataConfig) -> list[tuple[list, list]]:
    """(ids, labels) per record; the prompt gets the tokenizer's special tokens (BOS)."""
    pairs = [prompt_and_response(r) for r in records]
    prompts = tokenizer([p for p, _ in pairs], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if cfg.add_eos and tokenizer.eos_token_id is not None else []
    out = []
    for p, r in zip(prompts, responses):
        ids = p + r + eos
        masked = [IGNORE_INDEX] * len(p) if cfg.mask_prompt else p
        out.append((ids, masked + r + eos))
    return out


def pack(examples: list[tuple[list, list]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = [t for e, _ in examples for t in e]
    labels = [t for _, lab in examples for t in lab]
    rows = len(ids) // seq_len
    shape = (rows, seq_len)
    return (
        torch.tensor(ids[: rows * seq_len], dtype=torch.long).view(shape),
        torch.tensor(labels[: rows * seq_len], dtype=torch.long).view(shape),
    )


def prepare_data(cfg: DataConfig, tokenizer, data_dir: str | Path, seed: int) -> PackedData:
    """Read, shuffle (seeded), split, tokenize and pack. Deterministic given ``seed``."""
    records = read_records(cfg, data_dir)
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    if cfg.max_examples is not None:
        order = order[: cfg.max_examples]
    n_val = max(1, math.ceil(len(order) * cfg.val_fraction))
    if len(order) - n_val < 1:
        raise ValueError(
            f"data set '{cfg.name}' has {len(order)} examples, too few to split with "
            f"data.val_fraction={cfg.val_fraction}; raise data.max_examples"
        )
    splits = {}
    for name, idx in (("val", order[:n_val]), ("train", order[n_val:])):
        examples = tokenize([records[i] for i in idx], tokenizer, cfg)
        input_ids, labels = pack(examples, cfg.seq_len)
        if len(input_ids) == 0:
            tokens = sum(len(e) for e, _ in examples)
            raise ValueError(
                f"the {name} split of '{cfg.name}' has {tokens} tokens, less than one row of "
                f"data.seq_len={cfg.seq_len}; lower data.seq_len, raise data.max_examples or "
                "data.val_fraction"
            )
        splits[name] = Split(input_ids, labels, examples=len(idx))
    data = PackedData(train=splits["train"], val=splits["val"])
    log.info("data '%s': %s", cfg.name, data.summary())
    return data
