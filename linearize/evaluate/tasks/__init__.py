"""lm-eval task definitions that read the offline evaluation sets under ``<data_dir>/eval/``.

``TASKS_DIR`` is the folder to give ``lm_eval.tasks.TaskManager(include_path=...)``; the data
root reaches the tasks through the manager's ``metadata={"data_dir": ...}``, which lm-eval
passes to every task's ``custom_dataset`` reader (:mod:`.local_data`). From the command line the
same works as ``lm_eval --include_path <TASKS_DIR> --metadata '{"data_dir": "..."}'``.
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent


def mmlu_subjects() -> dict[str, list[str]]:
    """The MMLU category groups of ``mmlu_local.yaml`` and their subjects, in file order.

    Returns:
        ``{"mmlu_local_stem": ["abstract_algebra", ...], ...}``: 4 groups, 57 subjects.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    # The yaml is the one list of subjects; read it without importing its !function targets.
    cfg = load_yaml(TASKS_DIR / "mmlu_local.yaml", resolve_func=False)
    return {
        group["group"]: [task["dataset_kwargs"]["subject"] for task in group["task"]]
        for group in cfg["task"]
    }
