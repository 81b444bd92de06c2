"""Local training-data files: which files ``data.files`` names, and their raw records read one at
a time (a ``.jsonl`` line, a ``.txt`` block; a ``.json`` list is parsed whole).
:mod:`linearize.data` turns the records into examples."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linearize.config import DataConfig

SUFFIXES = (".json", ".jsonl", ".txt")
_READ_CHARS = 1 << 20  # characters per read of a .txt file (changes memory and speed, not the result)


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
        if path.suffix not in SUFFIXES:
            raise ValueError(f"data file {str(path)!r}: expected one of {', '.join(SUFFIXES)}")
        paths.append(path)
    return paths


def txt_blocks(path: Path) -> Iterator[str]:
    """The stripped, non-empty blocks between blank lines, read a chunk at a time: the same as
    ``path.read_text().split("\\n\\n")``, since a split's pieces before its last do not depend
    on the text after them."""
    with path.open(encoding="utf-8") as f:
        pending: list[str] = []  # the text since the last separator, which holds none
        while chunk := f.read(_READ_CHARS):
            straddles = pending and pending[-1].endswith("\n") and chunk.startswith("\n")
            if "\n\n" not in chunk and not straddles:
                pending.append(chunk)  # a long block is joined once, not once per chunk
                continue
            *blocks, rest = ("".join(pending) + chunk).split("\n\n")
            pending = [rest]
            for block in blocks:
                if block := block.strip():
                    yield block
        if rest := "".join(pending).strip():
            yield rest


def jsonl_objects(path: Path) -> Iterator[Any]:
    """One JSON value per non-blank line, a line at a time. Lines are numbered as
    ``str.splitlines`` splits them (text mode has already made \\r\\n and \\r into \\n)."""
    number = 0
    with path.open(encoding="utf-8") as f:
        for physical in f:
            for line in physical.splitlines():
                number += 1
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"data file {str(path)!r}, line {number}: not valid JSON ({err.msg} at "
                        f"column {err.colno}); a .jsonl file holds one JSON object per line"
                    ) from None
                yield value


def json_list(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
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
