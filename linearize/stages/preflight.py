"""The checks every stage passes before any model or data loads (:func:`preflight`), and those
``stage=all`` runs for every stage before the first starts (:func:`check_values`)."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig

from linearize.config import TRAINED_STAGES, Config
from linearize.data import PackedData
from linearize.datafiles import local_files
from linearize.fingerprint import adopt_source, check_chain, converted_source, stage_fingerprint
from linearize.log import get_logger
from linearize.models.load import (
    check_teacher_files,
    resolve_device,
    resolve_source,
)
from linearize.rundir import (
    RunDirError,
    has_work,
    resume_differences,
    shown,
    work_dir,
    work_fingerprint,
)
from linearize.train.checkpoint import check_latest, checkpoint_roots

log = get_logger(__name__)

TRAINING_STAGES = ("prepare", *TRAINED_STAGES, "all")  # the stages that read the training data


def checked_config(cfg: DictConfig, overrides: list[str]) -> Config:
    """The typed config a command line asks for, checked before any model or data loads: values
    (``validate``), the model and attention of the run a read-only stage reads (``adopt_source``),
    then :func:`preflight`."""
    from linearize.config import validate

    config = adopt_source(validate(cfg), overrides)
    preflight(config)
    return config


def preflight(config: Config) -> None:
    """Checks that need no model: teacher and tokenizer locations, the device, data files, the
    values the machine must serve, and what the run dir holds.

    Raises:
        FileNotFoundError, ValueError, RuntimeError: naming the bad value and the fix.
    """
    for spec in (config.model.path, config.model.tokenizer):
        if spec:
            resolve_source(spec)
    check_teacher_files(config.model)
    resolve_device(config.run.device)
    if swaps_attention(config):
        n_layers = known_layer_count(config)
        if n_layers is not None:
            check_layers(config, n_layers)
    if config.stage == "eval" or (config.stage == "all" and "eval" in config.pipeline):
        check_eval(config)
    if config.stage in TRAINING_STAGES and config.data.files:
        local_files(config.data, config.data_dir)
    if config.stage == "finetune" and config.finetune.start == "transfer":
        try:
            check_chain(Path(config.run.dir) / "transfer")
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}. stage=finetune starts from stage 1's output: run stage=transfer with "
                f"run.dir={config.run.dir} first, or set finetune.start=swap to skip transfer"
            ) from None
    if config.stage == "generate":
        if not config.prompt and not config.generate.interactive:
            raise ValueError('stage=generate needs prompt="..." or generate.interactive=true')
        check_chain(converted_source(Path(config.run.dir), "generate"))  # raises naming the stage to run
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
    check_values(config)
    check_run_dir(config)


def check_values(config: Config) -> None:
    """Values the typed config cannot judge alone: what this machine can serve (the Triton
    backend, wandb), adapter options (peft builds its config), a window covering every position.
    Needs no model and no run dir; ``stage=all`` runs it for every stage before the first starts.
    """
    stage = config.stage
    a = config.attention
    if a.backend == "triton" and a.kind != "softmax":
        from linearize.ops import _triton_unavailable

        why = _triton_unavailable(resolve_device(config.run.device))
        if why:
            raise ValueError(f"attention.backend=triton cannot run here: {why}; or set attention.backend=auto")
    if config.logging.wandb != "disabled":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ValueError(f"logging.wandb={config.logging.wandb} needs the wandb package: pip install wandb, "
                             "or set logging.wandb=disabled")  # fmt: skip
        netrc = Path("~/.netrc").expanduser()
        logged_in = os.environ.get("WANDB_API_KEY") or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
        if config.logging.wandb == "online" and not logged_in:
            raise ValueError(
                "logging.wandb=online needs a wandb login (WANDB_API_KEY, or run: wandb login) and a network; "
                "use logging.wandb=offline (sync later) or disabled"
            )
    if stage in ("finetune", "all") and (stage == "finetune" or "finetune" in config.pipeline):
        from linearize.models.convert import peft_config

        peft_config(config.adapter)
    check_objective(config)
    trains_new = stage == "transfer" or (stage == "uptrain" and config.train.trainable == "new")
    if trains_new and a.kind in ("window", "gated", "delta") and a.window >= config.data.seq_len:
        raise ValueError(
            f"attention.window={a.window} covers every position of the data.seq_len={config.data.seq_len} "
            f"training rows: the hybrid is exact softmax there and the linear part never sees a key, so "
            f"stage={stage} would learn nothing. Raise data.seq_len above the window (LoLCATs: 1024) or "
            "lower attention.window"
        )


def swaps_attention(config: Config) -> bool:
    """Whether the stage swaps ``config.attention`` in (the others read it from a converted dir)."""
    fresh = config.stage == "finetune" and config.finetune.start == "swap"
    return config.attention.kind != "softmax" and (config.stage in ("transfer", "uptrain", "all") or fresh)


def known_layer_count(config: Config) -> Optional[int]:
    """The teacher's layer count where it is known without loading it (random init, local dir)."""
    model = config.model
    if model.init == "random":
        return model.architecture.get("num_hidden_layers")
    source = resolve_source(model.path) if model.path else None
    if source is not None and source.kind == "dir":
        return json.loads((Path(source.location) / "config.json").read_text()).get("num_hidden_layers")
    return None


def check_layers(config: Config, n_layers: int) -> None:
    """``attention.softmax_layers`` and ``attention.keep_softmax`` fit a teacher of ``n_layers``."""
    a, name = config.attention, config.model.name
    bad = [i for i in a.softmax_layers if i >= n_layers]
    if bad:
        raise ValueError(
            f"attention.softmax_layers={a.softmax_layers}: {bad} out of range; model '{name}' has "
            f"{n_layers} layers, 0..{n_layers - 1}"
        )
    swapped = n_layers - len(set(a.softmax_layers))
    if swapped == 0:
        raise ValueError(
            f"attention.softmax_layers={a.softmax_layers} keeps all {n_layers} layers of '{name}' as "
            "softmax: nothing is linearized; list fewer layers"
        )
    if a.keep_softmax >= swapped:
        raise ValueError(
            f"attention.keep_softmax={a.keep_softmax} would set all {swapped} swapped layers of '{name}' "
            f"back to softmax; use at most {swapped - 1}"
        )


def check_objective(config: Config) -> None:
    """Distillation takes the teacher's logits from the model itself (adapters off, layers in
    teacher mode), which is the teacher only if training leaves the teacher's own weights alone."""
    f = config.finetune
    if f.objective == "ntp":
        return
    stages = config.pipeline if config.stage == "all" else [config.stage]
    if "uptrain" in stages and config.train.trainable != "new":
        raise ValueError(
            f"finetune.objective={f.objective} distils from the model in teacher mode, but stage=uptrain "
            f"with train.trainable={config.train.trainable} trains the teacher's own weights, so that would "
            "no longer be the teacher; use train.trainable=new, or finetune.objective=ntp"
        )
    init = config.adapter.options.get("init_lora_weights")
    if "finetune" in stages and isinstance(init, str) and init != "gaussian":
        raise ValueError(
            f"finetune.objective={f.objective} distils from the model with its adapter disabled, but "
            f"adapter={config.adapter.name} (init_lora_weights={init}) rewrites the base weights, so that "
            "would no longer be the teacher; use adapter=lora (or dora, vera, fourierft), or finetune.objective=ntp"
        )


def check_run_dir(config: Config) -> None:
    """What the run dir holds fits this training stage: a fresh start (``run.resume=false``) finds
    no earlier work of the stage; a resume finds work made with the same fingerprint (key by key,
    the run's length aside) and whole checkpoints."""
    if config.stage not in TRAINED_STAGES:
        return
    run_dir = Path(config.run.dir)
    work = work_dir(run_dir, config.stage)
    if not has_work(work):
        return
    if not config.run.resume:
        raise RunDirError(
            f"run.dir={run_dir} already holds an earlier stage={config.stage} run's work ({work}): resume it "
            f"with run.resume=true, or delete {work} to start stage {config.stage} over (or use another run.dir)"
        )
    diff = resume_differences(work_fingerprint(work), stage_fingerprint(config, config.stage))
    if diff:
        raise RunDirError(
            f"run.resume=true, but {work} was made with other settings (the run's -> now): {shown(diff)}. "
            f"Resume with the run's settings, or delete {work} (or use a new run.dir) to start over with these"
        )
    for root in checkpoint_roots(work):
        check_latest(root)


def check_eval(config: Config) -> None:
    """Every ``eval.tasks`` name is known, and (``eval.local``) some evaluation data is on disk."""
    from linearize.evaluate.harness import LOCAL_TASKS, missing_data

    for task in config.eval.tasks:
        if task not in LOCAL_TASKS:
            close = difflib.get_close_matches(task, LOCAL_TASKS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"eval.tasks: {task!r} is not one of {', '.join(LOCAL_TASKS)}.{hint}")
    stray = [task for task in config.eval.task_limits if task not in config.eval.tasks]
    if stray:
        raise ValueError(
            f"eval.task_limits names {stray}, which eval.tasks={list(config.eval.tasks)} does not score; "
            "add the task to eval.tasks or drop its limit"
        )
    if not config.eval.local:
        return
    missing = {task: missing_data(task, config.data_dir) for task in config.eval.tasks}
    wikitext = Path(config.data_dir).expanduser() / "eval" / "wikitext2" / "wiki.test.raw"
    if config.eval.ppl_tokens != 0 or (config.eval.long and config.eval.long_ppl_tokens):
        missing["wikitext2"] = [] if wikitext.is_file() else [wikitext]
    if missing and all(missing.values()):  # RULER (eval.long_tasks) builds its data: no files
        first = next(iter(missing.values()))[0]
        raise FileNotFoundError(
            f"no evaluation data under data_dir={config.data_dir!r} (e.g. {str(first)!r} is missing): "
            "point data_dir at the offline copies (data_dir=/path or LINEARIZE_DATA=/path), or set "
            "eval.local=false to read the tasks from the hub"
        )
    for task, files in missing.items():
        if files:
            log.warning("eval: %s will be skipped, its local data is missing (%s)", task, files[0])


def check_batches(config: Config, data: PackedData, world: int) -> None:
    """The packed data give at least one optimizer step and one validation batch per process."""
    from linearize.train.loop import plan_steps

    if config.stage == "transfer" and config.transfer.mode == "blockwise":
        world = 1  # blocks train as single processes
    plan_steps(config.train, len(data.train), world)
    if len(data.val) < config.train.batch_size * world:
        raise ValueError(
            f"{len(data.val)} validation rows are fewer than one batch per process "
            f"(train.batch_size={config.train.batch_size} x {world}); raise data.val_fraction"
        )


