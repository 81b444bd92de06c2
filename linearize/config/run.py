"""The stage sections (transfer, finetune, export, eval, generate), run and logging, and the root
:class:`Config` that holds them all; :func:`validate` builds it from the composed config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from linearize.config.checks import (
    DEVICES,
    OBJECTIVES,
    PIPELINE_STAGES,
    RULER_OFFLINE,
    RULER_ONLINE,
    RULER_TASKS,
    SEED_LIMIT,
    STAGES,
    WANDB_MODES,
    _choice,
    _finite,
    _fraction,
    _positive,
)
from linearize.config.schema import (
    AdapterConfig,
    AttentionConfig,
    DataConfig,
    ModelConfig,
    TrainConfig,
)


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


# The shortest eval.long length: at 1,024 tokens every RULER task the machine builds offline fits.
# Shorter ones fail: at 512 ruler_vt's sample builder never returns; at 256 niah_multikey_2 fits none.
LONG_MIN = 1024


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
    long: list[int] = field(default_factory=list)
    """Context lengths of the long-context evaluation, e.g. ``[1024,2048,4096]``: lm-eval's RULER
    tasks (``long_tasks``) at each length, and the WikiText-2 loss by position in long windows
    (``long_ppl_len``). ``[]`` (the default) skips it: it costs minutes per length."""
    long_tasks: list[str] = field(default_factory=lambda: list(RULER_OFFLINE))
    """RULER tasks scored at each ``long`` length (the ones that build their data offline)."""
    long_samples: int = 50
    """Samples per RULER task and length (the harness builds 500; ``limit`` scores the first)."""
    long_ppl_tokens: int = 32768
    """WikiText-2 tokens for the loss by position in long windows; 0 skips it."""
    long_ppl_len: Optional[int] = None
    """Tokens per window of that loss by position (disjoint windows, so every position bucket sees
    the same text mix); ``None``: ``max(long)``. E.g. 8192, a SmolLM2's whole context."""

    @property
    def long_window(self) -> int:
        """Tokens per window of the long loss by position: ``long_ppl_len``, else ``max(long)``
        (0 without ``long``)."""
        return self.long_ppl_len or max(self.long, default=0)

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
        if any(not isinstance(n, int) or n < LONG_MIN for n in self.long) or sorted(set(self.long)) != list(self.long):
            raise ValueError(
                f"eval.long={list(self.long)} must be increasing context lengths of at least {LONG_MIN} "
                "tokens; set it on the command line, e.g. 'eval.long=[1024,2048,4096]' (or [] for none)"
            )
        for task in self.long_tasks:
            _choice("eval.long_tasks", task, RULER_TASKS)
            if self.local and task in RULER_ONLINE:
                raise ValueError(
                    f"eval.long_tasks: {task} reads {RULER_ONLINE[task]}, which eval.local=true does not "
                    f"reach; drop it (the offline ones: {', '.join(RULER_OFFLINE)}) or set eval.local=false"
                )
        _positive("eval.long_samples", self.long_samples, example=50)
        _positive("eval.long_ppl_tokens", self.long_ppl_tokens, allow_zero=True, example=32768)
        _positive("eval.long_ppl_len", self.long_ppl_len, example=8192)
        window = self.long_window
        if self.long and 0 < self.long_ppl_tokens < window:
            raise ValueError(
                f"eval.long_ppl_tokens={self.long_ppl_tokens} is less than one {window}-token window "
                "(eval.long_ppl_len, else max(eval.long)), so the long positions would hold no token; set "
                f"eval.long_ppl_tokens={4 * window} (or 0 to skip the loss by position)"
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

