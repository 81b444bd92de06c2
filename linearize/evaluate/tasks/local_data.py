"""Readers that turn the offline copies under ``<data_dir>/eval/`` into the hub's documents.

Each ``load_*`` is a task's ``custom_dataset`` (see the yaml files beside this module):
lm-eval calls it with the task manager's metadata (which carries ``data_dir``) and the task's
``dataset_kwargs``, and it returns a :class:`datasets.DatasetDict` whose split names and
document fields are those of the hub data set the standard harness task reads, so the task's
prompt templates apply unchanged:

- ``piqa_local``: ``baber/piqa`` validation; goal, sol1, sol2, label (int 0/1).
- ``arc_easy_local``, ``arc_challenge_local``: ``allenai/ai2_arc`` test; id, question,
  choices {text, label}, answerKey.
- ``hellaswag_local``: ``Rowan/hellaswag`` validation; activity_label, ctx_a, ctx_b, ctx, endings,
  label (str), to which the harness's own ``process_docs`` then adds query, choices, gold.
- ``winogrande_local``: ``allenai/winogrande`` winogrande_xl validation; qID, sentence, option1,
  option2, answer ("1"/"2").
- ``mmlu_local`` (57 subject tasks): ``cais/mmlu`` <subject> test and dev; question, subject,
  choices (4 strings), answer (int 0-3).

The HellaSwag copy is a text form that lost the ``ctx_a``/``ctx_b`` split (see
:func:`load_hellaswag`). Every other set holds the same records as the hub split.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import datasets

ARC_SUBSETS = ("ARC-Easy", "ARC-Challenge")
MMLU_ANSWERS = ("A", "B", "C", "D")


def eval_root(data_dir: str | Path | None) -> Path:
    """``<data_dir>/eval``, the folder that holds one sub-folder per evaluation set."""
    if data_dir is None:
        raise ValueError(
            "local lm-eval tasks need the data root: TaskManager(metadata={'data_dir': ...}) "
            "(linearize.evaluate.harness.task_manager does this)"
        )
    return Path(data_dir).expanduser() / "eval"


def required_files(task: str, data_dir: str | Path, **kwargs: Any) -> list[Path]:
    """Files a local task reads; ``kwargs`` are its ``dataset_kwargs`` (``subset``, ``subject``)."""
    root = eval_root(data_dir)
    if task == "piqa":
        return [root / "piqa" / "valid.jsonl", root / "piqa" / "valid-labels.lst"]
    if task == "arc":
        return [root / "arc" / f"{kwargs['subset']}-test.jsonl"]
    if task == "hellaswag":
        return [root / "hellaswag" / "hellaswag_val_full.txt"]
    if task == "winogrande":
        return [root / "winogrande" / "dev.jsonl"]
    if task == "mmlu":
        subject = kwargs["subject"]
        return [root / "mmlu" / split / f"{subject}_{split}.csv" for split in ("test", "dev")]
    raise KeyError(f"no local data for task {task!r}")


def _check(paths: list[Path]) -> list[Path]:
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"local evaluation data missing: {path}")
    return paths


def _jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_piqa(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """PIQA validation: the original release's jsonl plus its separate label file, joined."""
    docs_path, labels_path = _check(required_files("piqa", data_dir))
    docs = _jsonl(docs_path)
    labels = [int(line) for line in labels_path.read_text().split()]
    if len(labels) != len(docs):
        raise ValueError(f"{labels_path}: {len(labels)} labels for {len(docs)} questions")
    rows = [{**doc, "label": label} for doc, label in zip(docs, labels)]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def load_arc(
    data_dir: str | Path | None = None, subset: str = "ARC-Easy", **_: Any
) -> datasets.DatasetDict:
    """ARC test split (``subset`` is ARC-Easy or ARC-Challenge); already in the hub's layout."""
    if subset not in ARC_SUBSETS:
        raise ValueError(f"subset={subset!r}; expected one of {ARC_SUBSETS}")
    (path,) = _check(required_files("arc", data_dir, subset=subset))
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_jsonl(path))})


def load_hellaswag(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """HellaSwag validation from its 6-lines-per-item text form.

    Each item is ``activity_label: ctx``, the gold index, then four endings. The text was cleaned
    already, and ``ctx_a``/``ctx_b`` are joined, so the whole context goes into ``ctx_a`` with an
    empty ``ctx_b``. The harness's ``process_docs`` then yields the same query except that the
    first letter of the original ``ctx_b`` is not capitalised (it cannot be located any more).
    Re-applying its cleaning is harmless, and removes the few ``[...]`` spans the text form kept.
    """
    (path,) = _check(required_files("hellaswag", data_dir))
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{path}: {len(lines)} lines is not a whole number of 6-line items")
    rows = []
    for i in range(0, len(lines), 6):
        head, label, *endings = lines[i : i + 6]
        # Where the split falls does not matter: the harness joins the two with ": " again.
        activity, _, ctx = head.partition(": ")
        rows.append(
            {
                "activity_label": activity,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "endings": endings,
                "label": str(int(label)),
            }
        )
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def load_winogrande(data_dir: str | Path | None = None, **_: Any) -> datasets.DatasetDict:
    """WinoGrande v1.1 dev, which the hub calls ``winogrande_xl`` validation."""
    (path,) = _check(required_files("winogrande", data_dir))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(_jsonl(path))})


def _mmlu_rows(path: Path, subject: str) -> list[dict[str, Any]]:
    # The csv module, not pandas: choices such as "0", "None" or "NA" must stay strings.
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    out = []
    for row in rows:
        if len(row) != 6:
            raise ValueError(f"{path}: expected 6 columns, got {len(row)}: {row!r}")
        question, *choices, answer = row
        out.append(
            {
                "question": question,
                "subject": subject,
                "choices": choices,
                "answer": MMLU_ANSWERS.index(answer.strip()),
            }
        )
    return out


def load_mmlu(
    data_dir: str | Path | None = None, subject: str | None = None, **_: Any
) -> datasets.DatasetDict:
    """One MMLU subject: the hendrycks csv test split and its 5 dev questions (the shots)."""
    if subject is None:
        raise ValueError("load_mmlu needs dataset_kwargs.subject")
    test, dev = _check(required_files("mmlu", data_dir, subject=subject))
    return datasets.DatasetDict(
        {
            "test": datasets.Dataset.from_list(_mmlu_rows(test, subject)),
            "dev": datasets.Dataset.from_list(_mmlu_rows(dev, subject)),
        }
    )
