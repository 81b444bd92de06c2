"""Score a model on the zero/few-shot tasks the linearization papers report, via lm-eval.

The standard lm-eval tasks read their data from the Hugging Face hub. :data:`LOCAL_TASKS` maps
each of them to a task in :mod:`linearize.evaluate.tasks` that reads the same split from the
offline copies under ``<data_dir>/eval/`` and has the same prompt, choices, target and metrics:

==============  ===================  ========  ======  =========================================
standard        local                metric    shots   local files (under ``<data_dir>/eval/``)
==============  ===================  ========  ======  =========================================
piqa            piqa_local           acc       0       piqa/valid.jsonl, valid-labels.lst
arc_easy        arc_easy_local       acc       0       arc/ARC-Easy-test.jsonl
arc_challenge   arc_challenge_local  acc_norm  0       arc/ARC-Challenge-test.jsonl
hellaswag       hellaswag_local      acc_norm  0       hellaswag/hellaswag_val_full.txt (*)
winogrande      winogrande_local     acc       0       winogrande/dev.jsonl
mmlu            mmlu_local (group)   acc       5       mmlu/{test,dev}/<subject>_{test,dev}.csv
==============  ===================  ========  ======  =========================================

(*) a lossy text form: the first letter of ``ctx_b`` is not capitalised as the harness does
(see :func:`linearize.evaluate.tasks.local_data.load_hellaswag`); note it beside HellaSwag figures.

``mmlu``/``mmlu_local`` is the harness's group score: the mean over all scored questions of the
57 subjects (``weight_by_size``); ``limit`` applies per subject.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from linearize.evaluate.tasks import TASKS_DIR, mmlu_subjects
from linearize.evaluate.tasks.local_data import required_files
from linearize.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class TaskSpec:
    """How one standard task is scored and where its local copy lives."""

    local: str
    """Name of the local task (or group) in ``TASKS_DIR``."""
    metric: str
    """The metric the papers report for this task."""
    num_fewshot: int = 0
    """Shots, as in the papers (MMLU 5, the rest 0)."""
    data: str = ""
    """Key of the reader in :func:`~linearize.evaluate.tasks.local_data.required_files`."""
    data_kwargs: dict[str, str] = field(default_factory=dict)
    """The task's ``dataset_kwargs``, which select files (ARC subset)."""


LOCAL_TASKS: dict[str, TaskSpec] = {
    "piqa": TaskSpec("piqa_local", "acc", data="piqa"),
    "arc_easy": TaskSpec("arc_easy_local", "acc", data="arc", data_kwargs={"subset": "ARC-Easy"}),
    "arc_challenge": TaskSpec(
        "arc_challenge_local", "acc_norm", data="arc", data_kwargs={"subset": "ARC-Challenge"}
    ),
    "hellaswag": TaskSpec("hellaswag_local", "acc_norm", data="hellaswag"),
    "winogrande": TaskSpec("winogrande_local", "acc", data="winogrande"),
    "mmlu": TaskSpec("mmlu_local", "acc", num_fewshot=5, data="mmlu"),
}


class _DropCustomDatasetNotice(logging.Filter):
    """lm-eval warns once per task that uses ``custom_dataset`` (57 times for MMLU); it is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_DropCustomDatasetNotice())


def task_manager(data_dir: str | Path, *, include_defaults: bool = False):
    """An lm-eval ``TaskManager`` that knows the local tasks and reads data under ``data_dir``.

    Args:
        data_dir: the data root, the directory that contains ``eval/``. It reaches every local
            task's reader as task metadata.
        include_defaults: also index lm-eval's own tasks (about 20 s; not needed for ours).
    """
    from lm_eval.tasks import TaskManager

    return TaskManager(
        include_path=str(TASKS_DIR),
        include_defaults=include_defaults,
        metadata={"data_dir": str(Path(data_dir).expanduser().resolve())},
    )


def missing_data(task: str, data_dir: str | Path) -> list[Path]:
    """The local files of standard task ``task`` that do not exist under ``data_dir``."""
    spec = LOCAL_TASKS[task]
    if spec.data == "mmlu":
        subjects = [s for group in mmlu_subjects().values() for s in group]
        paths = [p for s in subjects for p in required_files("mmlu", data_dir, subject=s)]
    else:
        paths = required_files(spec.data, data_dir, **spec.data_kwargs)
    return [p for p in paths if not p.is_file()]


def _n_items(results: dict[str, Any], name: str) -> int:
    """Scored documents of a task, or summed over a group's tasks."""
    if name in results["n-samples"]:
        return int(results["n-samples"][name]["effective"])
    return sum(_n_items(results, child) for child in results["group_subtasks"][name])


def _summary(results: dict[str, Any], name: str, metric: str) -> dict[str, Any]:
    row = results["results"][name]
    stderr = row.get(f"{metric}_stderr,none")
    return {
        "metric": metric,
        "value": float(row[f"{metric},none"]),
        "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
        "n": _n_items(results, name),
        # Every metric the task computes (acc and acc_norm where both exist), for tables that
        # report the other one.
        "metrics": {
            key.removesuffix(",none"): float(value)
            for key, value in row.items()
            if key.endswith(",none") and "_stderr" not in key and isinstance(value, (int, float))
        },
    }


def evaluate(
    model,
    tokenizer,
    tasks: list[str],
    *,
    data_dir: Optional[str | Path] = None,
    limit: Optional[int | float] = None,
    batch_size: int = 8,
    local: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on standard tasks with ``lm_eval.simple_evaluate``.

    Args:
        model: a causal LM (``transformers.PreTrainedModel``), on the device to score on.
        tokenizer: its tokenizer.
        tasks: standard task names, keys of :data:`LOCAL_TASKS` (``piqa``, ``mmlu``, ...).
        data_dir: the data root holding ``eval/``; required when ``local``.
        limit: at most this many documents per task (per subject for MMLU); a float < 1 is a
            fraction. For smoke tests only: scores on a prefix are not the reported figures.
        batch_size: lm-eval's batch size (requests per forward).
        local: ``True`` runs the local tasks; ``False`` the standard hub tasks (needs internet).

    Returns:
        ``{task: {"metric", "value", "stderr", "n", "metrics"}}`` keyed by the standard name, in
        the order given: the reported metric, its value and standard error, the number of
        scored documents, and all of the task's metrics by name. A task whose local data is
        missing maps to ``{"skipped": reason}``.
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    unknown = [t for t in tasks if t not in LOCAL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known: {', '.join(LOCAL_TASKS)}")
    if local and data_dir is None:
        raise ValueError("local tasks need data_dir, the directory that contains eval/")

    report: dict[str, dict[str, Any]] = {}
    runnable = []
    for task in tasks:
        missing = missing_data(task, data_dir) if local else []
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            report[task] = {"skipped": f"local data missing: {missing[0]}{more}"}
            log.warning("skipping %s: %s", task, report[task]["skipped"])
        else:
            runnable.append(task)
    if not runnable:
        return {task: report[task] for task in tasks}

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    manager = task_manager(data_dir) if local else TaskManager()
    # simple_evaluate takes one shot count for all its tasks: one call per count.
    for shots in sorted({LOCAL_TASKS[t].num_fewshot for t in runnable}):
        batch = [t for t in runnable if LOCAL_TASKS[t].num_fewshot == shots]
        names = {t: LOCAL_TASKS[t].local if local else t for t in batch}
        log.info("lm-eval: %s, %d-shot, limit=%s", ", ".join(names.values()), shots, limit)
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(names.values()),
            num_fewshot=shots,
            limit=limit,
            task_manager=manager,
            log_samples=False,
        )
        for task, name in names.items():
            report[task] = _summary(results, name, LOCAL_TASKS[task].metric)
            log.info("%s: %s", task, report[task])
    return {task: report[task] for task in tasks}
