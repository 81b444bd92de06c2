"""What each ``stage=`` value runs. Every stage starts from :func:`prepare`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from linearize.config import Config
from linearize.data import PackedData, local_files, prepare_data
from linearize.log import get_logger, process_rank
from linearize.models.load import (
    describe,
    load_teacher,
    load_tokenizer,
    resolve_device,
    resolve_source,
)

log = get_logger(__name__)

TRAINING_STAGES = ("prepare", "transfer", "finetune", "uptrain", "all")


@dataclass
class Prepared:
    """What every stage starts from: the checked config, its run dir, teacher and data."""

    config: Config
    run_dir: Path
    tokenizer: object
    teacher: PreTrainedModel
    data: Optional[PackedData]
    accelerator: Accelerator


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The fully resolved config (interpolations filled in) beside the run's outputs."""
    path = run_dir / "config.yaml"
    if process_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path


def preflight(config: Config) -> None:
    """Checks that need no model: teacher and tokenizer locations, the device, data files.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: naming the bad value and the fix.
    """
    for spec in (config.model.path, config.model.tokenizer):
        if spec:
            resolve_source(spec)
    resolve_device(config.run.device)
    if config.stage in TRAINING_STAGES and config.data.files:
        local_files(config.data, config.data_dir)
    if config.stage == "finetune" and config.finetune.start == "transfer":
        from linearize.models.convert import read_manifest

        try:
            read_manifest(Path(config.run.dir) / "transfer")
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}. stage=finetune starts from stage 1's output: run stage=transfer with "
                f"run.dir={config.run.dir} first, or set finetune.start=swap to skip transfer"
            ) from None
    if config.stage == "generate":
        from linearize.train.export import latest_stage_dir

        if not config.prompt and not config.generate.interactive:
            raise ValueError('stage=generate needs prompt="..." or generate.interactive=true')
        latest_stage_dir(Path(config.run.dir))  # raises naming the stage to run
    if config.stage in ("transfer", "uptrain"):
        from linearize.attention import build_mixer

        if config.attention.kind == "softmax":
            raise ValueError(f"stage={config.stage} needs a linear attention, not attention=softmax")
        only_new = config.stage == "transfer" or config.train.trainable == "new"
        if only_new and not any(True for _ in build_mixer(config.attention, 1, 1, 8).parameters()):
            fix = ("go straight to stage=finetune (as Liger does)" if config.stage == "transfer"
                   else "set train.trainable=attention or all")  # fmt: skip
            raise ValueError(
                f"attention={config.attention.name} has no new parameters, so stage={config.stage} "
                f"has nothing to train; {fix}"
            )


def prepare(config: Config, cfg: DictConfig) -> Prepared:
    """Write the resolved config, tokenize the data, load the teacher (data first: it is cheaper
    and a bad data set should fail before the slow model load)."""
    run_dir = Path(config.run.dir)
    log.info("run dir %s (config: %s)", run_dir, write_resolved_config(cfg, run_dir))
    needs_data = config.stage in TRAINING_STAGES
    tokenizer = load_tokenizer(config.model, config.cache_dir)
    data = prepare_data(config.data, tokenizer, config.data_dir, config.run.seed) if needs_data else None
    # accelerate picks this process's device under a multi-process launch.
    accelerator = Accelerator(cpu=resolve_device(config.run.device).type == "cpu")
    device = accelerator.device
    teacher = load_teacher(config.model, cache_dir=config.cache_dir, device=device, seed=config.run.seed)
    log.info("teacher '%s' on %s: %s", config.model.name, device, describe(teacher))
    return Prepared(config, run_dir, tokenizer, teacher, data, accelerator)


STAGE_RUNNERS: dict[str, Callable[[Prepared], None]] = {
    "prepare": lambda prepared: None,
    "transfer": lambda prepared: _tracked(prepared, "transfer"),
    "finetune": lambda prepared: _tracked(prepared, "finetune"),
    "uptrain": lambda prepared: _tracked(prepared, "uptrain"),
    "eval": lambda prepared: _tracked(prepared, "eval"),
    "generate": lambda prepared: _tracked(prepared, "generate"),
    "export": lambda prepared: _tracked(prepared, "export"),
}


def _tracked(prepared: Prepared, stage: str) -> None:
    """Run a training stage with its metrics tracker open."""
    from linearize.evaluate.run import run_eval
    from linearize.generate import run_generate
    from linearize.log import Tracker
    from linearize.train.export import run_export
    from linearize.train.finetune import run_finetune, run_uptrain
    from linearize.train.transfer import run_transfer

    runners = {"transfer": run_transfer, "finetune": run_finetune, "uptrain": run_uptrain,
               "export": run_export, "eval": run_eval, "generate": run_generate}  # fmt: skip
    run = runners[stage]
    c = prepared.config
    config = OmegaConf.to_container(OmegaConf.structured(c))
    tracker = Tracker(c.logging.wandb, c.logging.project, str(prepared.run_dir), config)
    try:
        run(prepared, prepared.accelerator, tracker)
    finally:
        tracker.finish()


def run_all(config: Config, cfg: DictConfig) -> None:
    """The stages of ``pipeline`` in order (transfer -> finetune -> export, or a recipe's), each
    composed as if run alone with ``stage=<it>`` (so each gets its own stage defaults) and
    ``run.resume=true``. A stage whose output exists is skipped; one interrupted inside resumes
    from its last checkpoint."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    from linearize.config import validate
    from linearize.models.convert import MANIFEST

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("stage=", "run.resume="))]
    run_dir = Path(config.run.dir)
    for stage in config.pipeline:
        done = run_dir / stage / ("report.json" if stage == "eval" else MANIFEST)
        if done.is_file():
            log.info("stage=all: %s already done (%s), skipping", stage, run_dir / stage)
            continue
        sub = compose(config_name="config", overrides=[*overrides, f"stage={stage}", "run.resume=true", f"run.dir={run_dir}"])
        sub_config = validate(sub)
        preflight(sub_config)
        log.info("stage=all: running %s", stage)
        prepared = prepare(sub_config, sub)
        STAGE_RUNNERS[stage](prepared)


def run_stage(config: Config, cfg: DictConfig) -> None:
    if config.stage == "all":
        run_all(config, cfg)
        return
    prepared = prepare(config, cfg)
    STAGE_RUNNERS[config.stage](prepared)
    log.info("stage %s done; outputs in %s", config.stage, prepared.run_dir)
