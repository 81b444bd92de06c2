"""lm-eval task definitions that read the offline evaluation sets under ``<data_dir>/eval/``.

``TASKS_DIR`` is the folder to give ``lm_eval.tasks.TaskManager(include_path=...)``; the data
root reaches the tasks through the manager's ``metadata={"data_dir": ...}``, which lm-eval
passes to every task's ``custom_dataset`` reader (:mod:`.local_data`).
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
