"""Typed config schemas, registered in Hydra's ConfigStore and checked when built.

Every yaml file under ``configs/`` is merged onto one of these dataclasses, so a key that does
not exist or a value of the wrong type fails while Hydra composes the config. Value checks that
need more than a type (finite floats, ranges, names, combinations) live in each
``__post_init__`` and run in :func:`validate`, which turns the composed ``DictConfig`` into these
objects before any model or data is touched.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

STAGES = ("prepare", "transfer", "finetune", "uptrain", "export", "eval", "generate", "all")
PIPELINE_STAGES = ("transfer", "finetune", "uptrain", "export", "eval")
CONVERT = ("global", "all")
DTYPES = ("float32", "bfloat16", "float16", "auto")
DEVICES = ("auto", "cpu", "cuda")
ATTENTION_KINDS = ("softmax", "linear", "window", "gated", "supra")
DECAYS = ("lightning", "retnet", "none")
TRAINABLE = ("new", "attention", "all")
FEATURE_MAPS = ("hedgehog", "t2r", "elu", "relu", "identity", "softmax")
DATA_FORMATS = ("alpaca", "text")
WANDB_MODES = ("disabled", "offline", "online")
SCHEDULERS = ("plateau", "cosine", "constant")
OBJECTIVES = ("ntp", "kd", "kd+ntp")
BACKENDS = ("auto", "reference", "triton")
SEED_LIMIT = 2**43


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


@dataclass
class ModelConfig:
    """The teacher: where its weights come from and how to hold them."""

    name: str = MISSING
    """Short name used in run directories and reports."""
    path: Optional[str] = None
    """Hub id, local HF directory, a ``.gguf`` file, or ``pkg://<package>/<file>`` for a file
    shipped inside an installed Python package. ``None`` only with ``init=random``."""
    init: str = "pretrained"
    """``pretrained`` loads ``path``; ``random`` builds ``architecture.model_type`` from ``architecture``."""
    architecture: dict[str, Any] = field(default_factory=dict)
    """HF config fields for ``init=random``: ``model_type`` (the family, e.g. llama, qwen3), then
    hidden_size, num_hidden_layers, …"""
    tokenizer: Optional[str] = None
    """Where the tokenizer comes from (same forms as ``path``); defaults to ``path``."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) for hub ids."""
    dtype: str = "float32"
    """Dtype the teacher is held in."""

    def __post_init__(self) -> None:
        _finite("model", self)  # the floats of model.architecture (rope_theta, rms_norm_eps, …)
        _choice("model.init", self.init, ("pretrained", "random"))
        _choice("model.dtype", self.dtype, DTYPES)
        if self.init == "pretrained" and not self.path:
            raise ValueError(
                f"model.path is empty for model '{self.name}' with init=pretrained; "
                "give a hub id, a local directory or a .gguf file"
            )
        if self.init == "random" and not self.architecture.get("model_type"):
            raise ValueError(
                f"model '{self.name}' has init=random but no model.architecture.model_type (the family to "
                "build, e.g. +model.architecture.model_type=llama)"
            )
        if self.init == "random" and not (self.tokenizer or self.path):
            raise ValueError(f"model '{self.name}' has init=random but no model.tokenizer")

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "ModelConfig":
        """The config a manifest recorded (extra keys such as a file's hash are dropped). Records
        written before ``model.family`` went away carry it: for a random teacher it is the
        architecture's family."""
        fields = {k: v for k, v in record.items() if k in cls.__dataclass_fields__}
        if fields.get("init") == "random" and "family" in record:
            fields["architecture"] = {"model_type": record["family"], **fields.get("architecture", {})}
        return cls(**fields)


@dataclass
class AttentionConfig:
    """What replaces softmax attention in each layer."""

    name: str = MISSING
    kind: str = "softmax"
    """``softmax`` (teacher, no swap), ``linear``, ``window`` (LoLCATs hybrid), ``gated`` (Liger),
    ``supra`` (ReLU-affine features, fixed decay, GroupNorm)."""
    feature_map: str = "identity"
    """Feature map applied to queries and keys (one registry); unused for ``softmax``."""
    feature_dim: int = 64
    """Output width of learned feature maps, per half for hedgehog's [Wx, -Wx]."""
    window: int = 0
    """Keys per query under exact softmax in the ``window``/``gated`` hybrids (0: linear only)."""
    sinks: int = 0
    """First keys of a sequence kept under the window's exact softmax for every later query
    (``window`` kind; attention sinks: a softmax teacher parks much of its attention there)."""
    window_factor_init: float = -2.197
    """Initial logit of the learned per-head softmax/linear mixing factor (sigmoid⁻¹(0.1))."""
    mix: float = 0.5
    """Weight of the gated output in the Liger hybrid (the window gets 1 - mix)."""
    gate_normalizer: float = 16.0
    """Liger's gate logit normalizer: log-decay = logsigmoid(gate) / gate_normalizer."""
    chunk_size: int = 64
    """Chunk length of the chunked (training/prefill) form."""
    keep_softmax: int = 0
    """After transfer, return this many worst layers (by validation MSE) to softmax."""
    softmax_layers: list[int] = field(default_factory=list)
    """Indices of layers kept as the teacher's softmax attention (not swapped)."""
    convert: str = "global"
    """Which teacher layers convert: ``global`` (those with full attention; layers that are already
    local — sliding window — keep their own attention, bounded cache and all) or ``all``."""
    decay: str = "lightning"
    """SUPRA's fixed per-head decay: ``lightning`` (ALiBi slopes), ``retnet`` or ``none``."""
    eps: float = 1e-6
    """Added to linear attention's normalizer (SUPRA: the GroupNorm epsilon)."""
    backend: str = "auto"
    """Implementation of the attention math: ``auto``, ``reference`` (PyTorch) or ``triton``."""

    def __post_init__(self) -> None:
        _finite("attention", self)
        _choice("attention.kind", self.kind, ATTENTION_KINDS)
        _choice("attention.feature_map", self.feature_map, FEATURE_MAPS)
        _positive("attention.feature_dim", self.feature_dim)
        _positive("attention.window", self.window, allow_zero=True)
        _positive("attention.sinks", self.sinks, allow_zero=True)
        if self.sinks and (self.kind != "window" or self.window == 0):
            raise ValueError(
                f"attention.sinks={self.sinks} needs the window hybrid's softmax part (kind=window, window > 0), "
                f"but attention {self.name!r} has kind={self.kind}, window={self.window}: use attention=lolcats "
                "or set attention.sinks=0"
            )
        if self.sinks and self.backend == "triton":
            raise ValueError(
                f"attention.backend=triton has no kernel for attention.sinks={self.sinks} yet: use "
                "attention.backend=auto (the PyTorch forms) or attention.sinks=0"
            )
        _positive("attention.chunk_size", self.chunk_size)
        _positive("attention.keep_softmax", self.keep_softmax, allow_zero=True)
        _positive("attention.gate_normalizer", self.gate_normalizer)
        _positive("attention.eps", self.eps)
        _fraction("attention.mix", self.mix, 0.5, low_open=False, high_open=False)
        _choice("attention.backend", self.backend, BACKENDS)
        _choice("attention.decay", self.decay, DECAYS)
        _choice("attention.convert", self.convert, CONVERT)
        if any(i < 0 for i in self.softmax_layers):
            raise ValueError(
                f"attention.softmax_layers={self.softmax_layers} holds a negative layer index; "
                "layers count from 0, e.g. attention.softmax_layers=[0,1]"
            )


@dataclass
class DataConfig:
    """Training data: where it lives, how it is templated, tokenized, packed and split."""

    name: str = MISSING
    format: str = "alpaca"
    """``alpaca`` (instruction, input, output records) or ``text`` (plain text)."""
    hub: Optional[str] = None
    """Hub dataset id, used when ``files`` is empty."""
    hub_split: str = "train"
    files: list[str] = field(default_factory=list)
    """Local files (.json, .jsonl, .txt); relative paths are read under ``data_dir``."""
    text_field: str = "text"
    """Field holding the text in .json/.jsonl files of ``format=text``."""
    seq_len: int = 1024
    """Packed sequence length in tokens."""
    val_fraction: float = 0.02
    """Share of examples held out for validation (split before packing)."""
    max_examples: Optional[int] = None
    """Use only this many examples (after the seeded shuffle); ``None`` uses all."""
    mask_prompt: bool = True
    """Exclude instruction tokens from the next-token loss (labels = -100)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token after each example before packing."""

    def __post_init__(self) -> None:
        _finite("data", self)
        _choice("data.format", self.format, DATA_FORMATS)
        _positive("data.seq_len", self.seq_len, example=1024)
        if self.seq_len < 2:  # the next-token loss predicts position t + 1 from position t
            raise ValueError(
                f"data.seq_len={self.seq_len} must be >= 2: a row of one token has no next token "
                "to predict; set it on the command line, e.g. data.seq_len=1024"
            )
        _positive("data.max_examples", self.max_examples)
        _fraction("data.val_fraction", self.val_fraction, 0.02)
        if not self.files and not self.hub:
            raise ValueError(
                f"data '{self.name}' names neither data.files nor data.hub; "
                "set e.g. 'data.files=[corpus/train.txt]' (paths under data_dir)"
            )


@dataclass
class TrainConfig:
    """Optimisation settings shared by every training stage (each stage yaml sets its own)."""

    lr: float = 1e-2
    weight_decay: float = 0.0
    batch_size: int = 1
    grad_accum: int = 8
    epochs: float = 2.0
    """Upper bound on passes over the training data."""
    max_steps: Optional[int] = None
    """Stop after this many optimizer steps (``None``: the epoch cap decides)."""
    max_grad_norm: float = 1.0
    scheduler: str = "plateau"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    eval_every: int = 100
    """Optimizer steps between validation passes (and checkpoints)."""
    eval_batches: Optional[int] = None
    """Validation batches per pass (``None``: the whole validation split)."""
    early_stop_patience: Optional[int] = None
    """Stop after this many validations without improvement (``None``: never)."""
    trainable: str = "new"
    """``stage=uptrain``'s trainable set: ``new`` attention parameters, all ``attention``
    parameters (plus the projections), or ``all`` (SUPRA's full uptraining)."""

    def __post_init__(self) -> None:
        _finite("train", self)
        _positive("train.lr", self.lr, example=1e-3)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True, example=0.0)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.epochs", self.epochs)
        _positive("train.max_steps", self.max_steps)
        _positive("train.max_grad_norm", self.max_grad_norm)
        _choice("train.scheduler", self.scheduler, SCHEDULERS)
        # ReduceLROnPlateau: factor >= 1 raises there; factor <= 0 sends the lr to 0 at once.
        _fraction("train.plateau_factor", self.plateau_factor, 0.1)
        _positive("train.plateau_patience", self.plateau_patience, allow_zero=True, example=10)
        _positive("train.eval_every", self.eval_every)
        _positive("train.eval_batches", self.eval_batches)
        _positive("train.early_stop_patience", self.early_stop_patience)
        _choice("train.trainable", self.trainable, TRAINABLE)


@dataclass
class AdapterConfig:
    """A PEFT method for stage 2: the name of a peft config class and its arguments."""

    name: str = MISSING
    peft_config: str = "LoraConfig"
    """A config class of the ``peft`` package (LoraConfig, VeraConfig, FourierFTConfig, …)."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    options: dict[str, Any] = field(default_factory=dict)
    """Passed to the peft config class as keyword arguments (r, lora_alpha, use_dora, …)."""
    train_new: bool = False
    """Also train the stage-1 parameters (feature maps, window factors) in stage 2."""

    def __post_init__(self) -> None:
        if not self.target_modules:
            raise ValueError("adapter.target_modules is empty; name the modules to adapt, e.g. [q_proj,v_proj]")
        _finite("adapter", self)
        for key, example in (("r", 8), ("lora_alpha", 16), ("n_frequency", 1000)):
            if key in self.options:
                value, whole = self.options[key], key != "lora_alpha"  # peft sizes are ints
                _number(f"adapter.options.{key}", value, example, whole=whole)
                _positive(f"adapter.options.{key}", value, example=example)
        for key, value in self.options.items():
            if key.endswith("dropout"):  # lora_dropout, vera_dropout, rank_dropout, module_dropout
                _number(f"adapter.options.{key}", value, 0.0)
                # p = 1 drops every input: the adapter would get no gradient.
                _fraction(f"adapter.options.{key}", value, 0.0, low_open=False)


@dataclass
class TransferConfig:
    """Stage 1 (attention transfer) settings."""

    mode: str = "joint"
    """``joint``: one teacher pass trains every layer; ``blockwise``: blocks of layers from cached
    teacher hidden states (for models that do not fit)."""
    block_size: int = 1
    """Layers per block in ``blockwise`` mode (1 = layer by layer)."""
    shard_rows: int = 64
    """Rows per shard of the cached teacher hidden states (``blockwise``)."""
    mse_weight: float = 1000.0
    """Loss = mse_weight x mean over layers of MSE(student, teacher) (LoLCATs: 1000)."""
    xent_weight: float = 0.0
    """Weight of Hedgehog's cross-entropy between teacher and student attention weights
    (0: off, the LoLCATs recipe). Costs a T x T matrix per layer."""

    def __post_init__(self) -> None:
        _finite("transfer", self)
        _choice("transfer.mode", self.mode, ("joint", "blockwise"))
        _positive("transfer.block_size", self.block_size)
        _positive("transfer.shard_rows", self.shard_rows)
        _positive("transfer.mse_weight", self.mse_weight, allow_zero=True, example=1000)
        _positive("transfer.xent_weight", self.xent_weight, allow_zero=True, example=0)
        if self.mse_weight == 0 and self.xent_weight == 0:
            raise ValueError(
                "transfer.mse_weight and transfer.xent_weight are both 0: no loss; "
                "set one on the command line, e.g. transfer.mse_weight=1000"
            )


@dataclass
class FinetuneConfig:
    """Stage 2 settings (the adapter itself is the ``adapter`` group)."""

    start: str = "transfer"
    """``transfer``: start from ``<run.dir>/transfer`` (stage 1's output); ``swap``: swap the
    attention in fresh with no transfer (Liger's recipe, and the no-transfer baseline)."""

    objective: str = "ntp"
    """What stage 2 (and ``stage=uptrain``) trains for: ``ntp`` (next-token loss), ``kd`` (KL from
    the teacher's to the model's distribution over the vocabulary, every position) or ``kd+ntp``."""
    kd_temperature: float = 1.0
    """Temperature of both distributions in the KL (its loss is scaled by T²)."""
    kd_weight: float = 0.5
    """Weight of the KL in ``kd+ntp`` (the next-token loss gets 1 - kd_weight)."""

    def __post_init__(self) -> None:
        _finite("finetune", self)
        _choice("finetune.start", self.start, ("transfer", "swap"))
        _choice("finetune.objective", self.objective, OBJECTIVES)
        _positive("finetune.kd_temperature", self.kd_temperature, example=1.0)
        _fraction("finetune.kd_weight", self.kd_weight, 0.5)


@dataclass
class ExportConfig:
    merge: bool = False
    """Write the whole model with the adapter merged in, instead of deltas over the teacher."""


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["piqa", "arc_easy"])
    """Standard lm-eval task names (piqa, arc_easy, arc_challenge, hellaswag, winogrande, mmlu)."""
    limit: Optional[int] = None
    """Score only the first ``limit`` items of each task (per subject for MMLU; quick runs)."""
    task_limits: dict[str, int] = field(default_factory=dict)
    """Per-task ``limit`` overriding the one above; set one with ``+eval.task_limits.mmlu=2``."""
    batch_size: int = 8
    local: bool = True
    """Read the tasks' data from ``data_dir/eval`` (offline); false uses the hub tasks."""
    teacher: bool = True
    """Also score the teacher, for the side-by-side report."""
    ppl_tokens: Optional[int] = 16384
    """WikiText-2 (raw test) tokens for perplexity; ``None``: the whole set; 0: skip it."""
    ppl_seq_len: int = 1024
    ppl_stride: int = 512
    ppl_buckets: list[int] = field(default_factory=lambda: [64, 256, 512])
    """Edges of the position buckets for the loss by position on WikiText-2 (teacher beside the
    converted model, in the report and ``position.png``); ``[]`` turns it off."""

    def __post_init__(self) -> None:
        _finite("eval", self)
        _positive("eval.limit", self.limit)
        for task, limit in self.task_limits.items():
            _positive(f"eval.task_limits.{task}", limit)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.ppl_tokens", self.ppl_tokens, allow_zero=True)
        _positive("eval.ppl_seq_len", self.ppl_seq_len, example=1024)
        if self.ppl_seq_len < 2:  # a window's first token has no context: it is never scored
            raise ValueError(
                f"eval.ppl_seq_len={self.ppl_seq_len} must be >= 2: a window of one token scores "
                "nothing; set it on the command line, e.g. eval.ppl_seq_len=1024"
            )
        _positive("eval.ppl_stride", self.ppl_stride, example=512)
        if self.ppl_stride > self.ppl_seq_len:
            raise ValueError(
                f"eval.ppl_stride={self.ppl_stride} exceeds eval.ppl_seq_len={self.ppl_seq_len}; "
                f"set it on the command line, e.g. eval.ppl_stride={self.ppl_seq_len // 2}"
            )
        edges = [0, *self.ppl_buckets]
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise ValueError(
                f"eval.ppl_buckets={self.ppl_buckets} must be positive and increasing; set it on the "
                "command line, e.g. 'eval.ppl_buckets=[64,256,512]' (or [] for none)"
            )


@dataclass
class GenerateConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    """0 decodes greedily."""
    interactive: bool = False

    def __post_init__(self) -> None:
        _finite("generate", self)
        _positive("generate.max_new_tokens", self.max_new_tokens, example=128)
        _positive("generate.temperature", self.temperature, allow_zero=True, example=0.7)


@dataclass
class RunConfig:
    dir: str = MISSING
    """Run directory: resolved config, logs, checkpoints and reports are written here."""
    seed: int = 0
    resume: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        _choice("run.device", self.device, DEVICES)
        # torch takes seeds in [-2**63, 2**64); models/swap.py seeds layer i with
        # seed * 1_000_003 + i, which overflows past about ±2**43. Negative seeds are fine.
        if abs(self.seed) > SEED_LIMIT:
            raise ValueError(
                f"run.seed={self.seed} is out of range: the per-layer seeds derived from it must fit "
                f"torch's 64-bit seed; use one within ±2**43 = ±{SEED_LIMIT}, e.g. run.seed=0"
            )


@dataclass
class LoggingConfig:
    wandb: str = "disabled"
    """wandb mode; ``disabled`` needs no network and no account."""
    project: str = "linearize"
    level: str = "INFO"

    def __post_init__(self) -> None:
        _choice("logging.wandb", self.wandb, WANDB_MODES)
        _choice("logging.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class Config:
    """The whole run. ``stage`` is set by the ``stage`` config group."""

    stage: str = MISSING
    model: ModelConfig = MISSING
    attention: AttentionConfig = MISSING
    data: DataConfig = MISSING
    adapter: AdapterConfig = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data_dir: str = "./data"
    """Where local copies of data sets live (env ``LINEARIZE_DATA``)."""
    cache_dir: str = "~/.cache/linearize"
    """Where converted teachers (GGUF → safetensors) are cached (env ``LINEARIZE_CACHE``)."""
    prompt: Optional[str] = None
    """Prompt for ``stage=generate``."""
    recipe: Optional[str] = None
    """The method a ``recipe=`` config set up (lolcats, liger, supra), for the record."""
    pipeline: list[str] = field(default_factory=lambda: ["transfer", "finetune", "export"])
    """The stages ``stage=all`` runs, in order (a recipe sets its own)."""

    def __post_init__(self) -> None:
        _choice("stage", self.stage, STAGES)
        for stage in self.pipeline:
            _choice("pipeline", stage, PIPELINE_STAGES)


def register_configs() -> None:
    """Register the root schema; group yamls merge onto its typed fields (model, attention, …)."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def validate(cfg: DictConfig) -> Config:
    """Build the typed config, running every ``__post_init__`` check.

    Raises:
        ValueError: naming the bad key, its value and the fix.
    """
    return OmegaConf.to_object(cfg)  # type: ignore[return-value]


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of a config group: the yaml files in ``configs/<group>/``."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a schema, nested dataclasses walked into."""
    paths = []
    for name, hint in _hints(cls).items():
        if is_dataclass(hint):
            paths += _leaf_paths(hint, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _closest_key(key: str) -> Optional[str]:
    """The schema key the user most likely meant: same last part (``lr`` -> ``train.lr``), else
    the closest spelling."""
    paths = _leaf_paths(Config)
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    return close[0] if close else None


_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _type_word(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return f"{_type_word(args[0])} or null"
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        return f"a list of {_type_word(item).removeprefix('a ')}s, e.g. {'[0,1]' if item is int else '[a,b]'}"
    if origin is dict:
        return "a mapping, e.g. {key: value}"
    return _TYPE_WORDS.get(hint, str(hint))


def _check_key(key: str, value: Any, override: str) -> None:
    """Walk ``key`` through the schema; raise naming the key (and the closest one) or the type."""
    cls: type = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            guess = _closest_key(key)
            suggestion = f" Did you mean '{guess}'?" if guess else ""
            raise ValueError(
                f"{override}: '{key}' is not a config key.{suggestion} "
                "(`python -m linearize --cfg job` prints every key)"
            )
        hint = hints[part]
        if is_dataclass(hint):
            cls = hint
            continue
        if i < len(parts) - 1:  # under a free-form mapping (model.architecture, adapter.options)
            _finite(key, value)
            return
        from omegaconf.errors import ValidationError

        default = next(f.default for f in fields(cls) if f.name == part)
        node = OmegaConf.structured(cls)
        try:
            node[part] = value
        except ValidationError:
            if isinstance(default, bool):
                default = str(default).lower()
            example = f"; e.g. {key}={default}" if default not in (NO_DEFAULT, MISSING, None) else ""
            raise ValueError(f"{override}: {key} takes {_type_word(hint)}, not {value!r}{example}") from None
        # Hydra parses nan, inf and 1e400 as floats: stop them here, before Hydra makes the run
        # directory. (Ranges need the whole section; validate() checks them after composing.)
        _finite(key, value, default)
        return


def check_overrides(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Check command-line overrides against the schema before Hydra composes them.

    Hydra would stop on an unknown key or a wrong type too, but with a bare "Key 'lrr' is not in
    struct"; this names the key, its closest real key and the expected type. Group choices
    (``model=…``) must be files of their group. Sweeps, ``hydra.*`` keys and deletions are left
    to Hydra.

    Raises:
        ValueError: naming the override, what is wrong and the fix ("Did you mean …?").
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.type == OverrideType.DEL or override.is_sweep_override() or key.startswith("hydra"):
            continue
        text = override.input_line or f"{key}={override.value()}"
        if "." not in key and (config_dir / key).is_dir():
            value, options = override.value(), group_options(key, config_dir)
            if value is not None and value not in options:
                close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"Could not find '{key}/{value}': {key}= takes one of {', '.join(options)}.{hint}"
                )
            continue
        _check_key(key, override.value(), text)
