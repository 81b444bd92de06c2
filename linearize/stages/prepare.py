"""``stage=prepare`` and what every stage starts from: the resolved config written beside the
run's outputs, the data tokenized, the teacher loaded (:class:`Prepared`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from accelerate import Accelerator
from omegaconf import DictConfig, OmegaConf
from transformers import PreTrainedModel

from linearize.config import Config
from linearize.data import PackedData, prepare_data
from linearize.log import Tracker, get_logger, process_rank
from linearize.models.load import describe, load_teacher, load_tokenizer, resolve_device
from linearize.stages.preflight import TRAINING_STAGES, check_batches, check_layers, swaps_attention
from linearize.train.distributed import fsdp_on_cpu

log = get_logger(__name__)


@dataclass
class Prepared:
    """What every stage starts from: the checked config, its run dir, teacher and data."""

    config: Config
    run_dir: Path
    tokenizer: object
    teacher: PreTrainedModel
    data: Optional[PackedData]
    accelerator: Accelerator
    tracker: Optional[Tracker] = None  # the metrics tracker a training stage logs to (run_stage opens it)


def write_resolved_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The fully resolved config (interpolations filled in) beside the run's outputs: a record of
    the last training stage run there (nothing reads it back; resumes check fingerprints)."""
    path = run_dir / "config.yaml"
    if process_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".config.yaml.tmp-{os.getpid()}")
        tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
        os.replace(tmp, path)
    return path


def prepare(config: Config, cfg: DictConfig) -> Prepared:
    """Write the resolved config, tokenize the data, load the teacher (data first: it is cheaper
    and a bad data set should fail before the slow model load)."""
    run_dir = Path(config.run.dir)
    if config.stage in TRAINING_STAGES:  # only training stages (and prepare, their dry run) record it
        log.info("run dir %s (config: %s)", run_dir, write_resolved_config(cfg, run_dir))
    else:
        log.info("run dir %s", run_dir)
    needs_data = config.stage in TRAINING_STAGES
    try:
        tokenizer = load_tokenizer(config.model, config.cache_dir)
        data = prepare_data(config.data, tokenizer, config.data_dir, config.run.seed) if needs_data else None
        # accelerate picks this process's device under a multi-process launch.
        accelerator = Accelerator(cpu=resolve_device(config.run.device).type == "cpu")
        fsdp_on_cpu(accelerator)
        if data is not None:
            check_batches(config, data, accelerator.num_processes)
        device = accelerator.device
        teacher = load_teacher(config.model, cache_dir=config.cache_dir, device=device, seed=config.run.seed)
        if swaps_attention(config):
            check_layers(config, teacher.config.num_hidden_layers)
    except (ValueError, OSError) as err:
        err.bad_input = True  # a bad data set, tokenizer or teacher: __main__ shows the message only
        raise
    log.info("teacher '%s' on %s: %s", config.model.name, device, describe(teacher))
    return Prepared(config, run_dir, tokenizer, teacher, data, accelerator)


def run(prepared: Prepared) -> None:
    """``stage=prepare`` is :func:`prepare` alone: a dry run of the data and the teacher."""
