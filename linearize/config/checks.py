"""The names config values are checked against, and the checks every section's ``__post_init__``
runs (each names the key, its value and the fix)."""

from __future__ import annotations

import difflib
from typing import Any

TRAINED_STAGES = ("transfer", "finetune", "uptrain")  # each trains, from checkpoints it can resume
PIPELINE_STAGES = (*TRAINED_STAGES, "export", "eval")  # each publishes <run.dir>/<stage>, fingerprinted
STAGES = ("prepare", *PIPELINE_STAGES, "generate", "all")
CONVERT = ("global", "all")
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_KINDS = ("softmax", "linear", "window", "gated", "supra", "delta")
DELTA_RATES = ("proj", "key")
DECAYS = ("lightning", "retnet", "none")
TRAINABLE = ("new", "attention", "all")
FEATURE_MAPS = ("hedgehog", "t2r", "elu", "relu", "identity", "softmax")
DATA_FORMATS = ("alpaca", "text")
WANDB_MODES = ("disabled", "offline", "online")
SCHEDULERS = ("plateau", "cosine", "constant")
OBJECTIVES = ("ntp", "kd", "kd+ntp")
BACKENDS = ("auto", "reference", "triton")
SEED_LIMIT = 2**43
# lm-eval's RULER tasks (``lm_eval/tasks/ruler``). The first build their data on the machine
# (synthetic haystacks, wonderwords' word lists); the others read data from the web or the hub.
RULER_OFFLINE = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
RULER_ONLINE = {
    "niah_single_2": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_single_3": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multikey_1": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multivalue": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "niah_multiquery": "Paul Graham's essays (hub dataset baber/paul_graham_essays)",
    "ruler_qa_squad": "SQuAD v2 (from the web)",
    "ruler_qa_hotpot": "HotpotQA (from the web)",
}
RULER_TASKS = (*RULER_OFFLINE, *RULER_ONLINE)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ValueError(f"{key}={value!r} is not one of {', '.join(choices)}.{hint}")


def _positive(
    key: str, value: float | int | None, *, allow_zero: bool = False, example: Any = 1
) -> None:
    if value is None:
        return
    if not (value > 0 or (allow_zero and value == 0)):  # written so that NaN fails too
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"{key}={value} must be {bound}; set it on the command line, e.g. {key}={example}"
        )


def _fraction(
    key: str, value: float, example: float, *, low_open: bool = True, high_open: bool = True
) -> None:
    """``value`` must lie in the interval from 0 to 1, open or closed at either end."""
    if not ((value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)):
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise ValueError(
            f"{key}={value} must lie in {interval}; set it on the command line, e.g. {key}={example}"
        )


def _finite(key: str, value: Any, example: Any = None) -> None:
    """NaN and ±inf fail here, in every float of a config section (its fields and the numbers in
    its free-form mappings and lists). NaN passes every range check: all its comparisons are false.
    A new float field is covered without code."""
    if hasattr(value, "__dataclass_fields__"):  # a section: each field, its default the example
        for name in value.__dataclass_fields__:
            _finite(f"{key}.{name}", getattr(value, name), getattr(type(value), name, None))
    elif isinstance(value, dict):
        for name, item in value.items():
            _finite(f"{key}.{name}", item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _finite(key, item)
    elif isinstance(value, float) and not abs(value) < float("inf"):  # false for NaN and ±inf
        known = isinstance(example, (int, float))
        fix = f"set it on the command line, e.g. {key}={example}" if known else "set a finite one"
        raise ValueError(f"{key}={value} must be a finite number; {fix}")


def _number(key: str, value: Any, example: Any, *, whole: bool = False) -> None:
    """A number in a free-form mapping (``adapter.options``), which OmegaConf does not type."""
    kinds = int if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "a whole number" if whole else "a number"
        raise ValueError(
            f"{key}={value!r} must be {kind}; set it on the command line, e.g. {key}={example}"
        )

