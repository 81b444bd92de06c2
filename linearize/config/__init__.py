"""Typed config schemas, registered in Hydra's ConfigStore and checked when built.

Every yaml file under ``configs/`` is merged onto one of these dataclasses, so a key that does
not exist or a value of the wrong type fails while Hydra composes the config. Value checks that
need more than a type (finite floats, ranges, names, combinations) live in each
``__post_init__`` and run in :func:`validate`, which turns the composed ``DictConfig`` into these
objects before any model or data is touched.

Import every name from here (``from linearize.config import Config``): ``checks`` holds the
names values are checked against and the checks, ``schema`` the model, attention, data, train
and adapter sections, ``run`` the stage sections and the root :class:`Config`, ``overrides``
the command-line checks made before Hydra composes anything.
"""

from linearize.config.checks import (
    ATTENTION_KINDS,
    BACKENDS,
    CONVERT,
    DATA_FORMATS,
    DECAYS,
    DELTA_RATES,
    DEVICES,
    DTYPES,
    FEATURE_MAPS,
    OBJECTIVES,
    PIPELINE_STAGES,
    RULER_OFFLINE,
    RULER_ONLINE,
    RULER_TASKS,
    SCHEDULERS,
    SEED_LIMIT,
    STAGES,
    TRAINABLE,
    TRAINED_STAGES,
    WANDB_MODES,
    _choice,
    _finite,
    _fraction,
    _number,
    _positive,
)
from linearize.config.overrides import CONFIG_DIR, check_overrides, group_options
from linearize.config.run import (
    Config,
    EvalConfig,
    ExportConfig,
    FinetuneConfig,
    GenerateConfig,
    LoggingConfig,
    RunConfig,
    TransferConfig,
    register_configs,
    validate,
)
from linearize.config.schema import (
    AdapterConfig,
    AttentionConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
)

__all__ = [
    "ATTENTION_KINDS", "BACKENDS", "CONFIG_DIR", "CONVERT", "DATA_FORMATS", "DECAYS", "DELTA_RATES", "DEVICES", "DTYPES",
    "FEATURE_MAPS", "OBJECTIVES", "PIPELINE_STAGES", "RULER_OFFLINE", "RULER_ONLINE",
    "RULER_TASKS", "SCHEDULERS", "SEED_LIMIT", "STAGES", "TRAINABLE", "TRAINED_STAGES",
    "WANDB_MODES", "AdapterConfig", "AttentionConfig", "Config", "DataConfig", "EvalConfig", "ExportConfig",
    "FinetuneConfig", "GenerateConfig", "LoggingConfig", "ModelConfig", "RunConfig", "TrainConfig",
    "TransferConfig", "check_overrides", "group_options", "register_configs", "validate",
    "_choice", "_finite", "_fraction", "_number", "_positive",
]  # fmt: skip
