"""The sections that say what is converted and how it trains: model, attention, data, train, adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING

from linearize.config.checks import (
    ATTENTION_KINDS,
    BACKENDS,
    CONVERT,
    DATA_FORMATS,
    DECAYS,
    DELTA_RATES,
    DTYPES,
    FEATURE_MAPS,
    SCHEDULERS,
    TRAINABLE,
    _choice,
    _finite,
    _fraction,
    _number,
    _positive,
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
    ``supra`` (ReLU-affine features, fixed decay, GroupNorm), ``delta`` (DeltaNet's delta rule)."""
    feature_map: str = "identity"
    """Feature map applied to queries and keys (one registry); unused for ``softmax``."""
    feature_dim: int = 64
    """Output width of learned feature maps, per half for hedgehog's [Wx, -Wx]."""
    window: int = 0
    """Keys per query under exact softmax in the ``window``/``gated``/``delta`` hybrids (0: linear only)."""
    sinks: int = 0
    """First keys of a sequence kept under the window's exact softmax for every later query
    (``window`` kind; attention sinks: a softmax teacher parks much of its attention there)."""
    window_factor_init: float = -2.197
    """Initial logit of the learned per-head softmax/linear mixing factor (sigmoid⁻¹(0.1))."""
    mix: float = 0.5
    """Weight of the recurrent output in the ``gated`` (Liger) and ``delta`` hybrids (the window
    gets 1 - mix)."""
    gated: bool = False
    """``delta`` kind: Gated DeltaNet's per-token decay α_t of the state (False: DeltaNet, α = 1)."""
    delta_rates: str = "proj"
    """``delta`` kind: where the write strength β_t (and α_t) come from: ``proj`` (a new per-head
    projection of the key) or ``key`` (the key's mean feature, no new parameter)."""
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
        _choice("attention.delta_rates", self.delta_rates, DELTA_RATES)
        if self.gated and self.kind != "delta":
            raise ValueError(
                f"attention.gated=true is the delta rule's decay, but attention {self.name!r} has kind={self.kind}: "
                "use attention=gated_deltanet (or attention.gated=false)"
            )
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

