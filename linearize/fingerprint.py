"""What a stage's result depends on (its fingerprint), and where read-only stages get their model.

:func:`stage_fingerprint` lists, flat, every setting that changes what a stage computes: the
teacher (and the sha256 of a local teacher file), the seed, the data (and the sha256 of its
local files), the training settings that change the math, the attention, the adapter, and the
fingerprint hash of the upstream output a stage starts from — so a change anywhere upstream
makes every stage after it "not done". Names, logging, the implementation backend and other
settings that do not change the numbers are left out.

Stages that only read a run (``export``, ``eval``, ``generate``) take the teacher, its seed and
the attention from the converted model they read (:func:`adopt_source`), never from the
command line; a command line that says otherwise is refused, naming both values.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Iterable, Optional

from linearize.config import TRAINED_STAGES, AttentionConfig, Config, ModelConfig
from linearize.rundir import RunDirError, differences, read_manifest, shown, upstream_hash

CONVERTED_STAGES = ("export", "finetune", "uptrain", "transfer")
"""Stages that write a converted model, latest in a pipeline first."""
READ_ONLY_STAGES = ("export", "eval", "generate")
_NOT_MATH = {
    "model": ("name",),
    "attention": ("name", "backend"),
    "data": ("name",),
    "transfer": ("shard_rows",),
    "adapter": ("name",),
    "eval": (),
}


def flat(tree: Any, prefix: str) -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}.{key}").items()}
    return {prefix: tree}


def _section(config: Config, name: str) -> dict[str, Any]:
    return _section_of(getattr(config, name), name)


def teacher_identity(model: ModelConfig) -> dict[str, Any]:
    from linearize.models.load import file_sha256, resolve_source

    fp = _section_of(model, "model")
    if model.path and model.init == "pretrained":
        source = resolve_source(model.path)
        if source.kind == "gguf":
            fp["model.sha256_16"] = file_sha256(Path(source.location))
    return fp


def _section_of(obj: Any, name: str) -> dict[str, Any]:
    values = asdict(obj)
    return flat({k: v for k, v in values.items() if k not in _NOT_MATH.get(name, ())}, name)


def data_identity(config: Config) -> dict[str, Any]:
    from linearize.datafiles import local_files
    from linearize.models.load import file_sha256

    fp = _section(config, "data")
    if config.data.files:
        fp["data.sha256_16"] = [file_sha256(p) for p in local_files(config.data, config.data_dir)]
    return fp


def converted_source(run_dir: Path, stage: str) -> Path:
    """The converted model a read-only stage reads: for ``export`` the latest training stage's
    output, for ``eval``/``generate`` the export if there is one, else that."""
    stages = CONVERTED_STAGES[1:] if stage == "export" else CONVERTED_STAGES
    for name in stages:
        if (Path(run_dir) / name / "linearize.json").is_file():
            return Path(run_dir) / name
    raise FileNotFoundError(
        f"{run_dir} holds no converted model yet: run stage=transfer (and finetune), "
        "stage=uptrain or stage=all first"
    )


def has_converted(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a converted model for eval to score."""
    return any((Path(run_dir) / name / "linearize.json").is_file() for name in CONVERTED_STAGES)


def stage_fingerprint(config: Config, stage: str) -> dict[str, Any]:
    """The settings ``stage`` computes its result from (see the module docstring)."""
    run_dir = Path(config.run.dir)
    fp: dict[str, Any] = {"stage": stage, **teacher_identity(config.model), "run.seed": config.run.seed}
    if stage in TRAINED_STAGES:
        fp.update(data_identity(config))
        train = asdict(config.train)
        if stage != "uptrain":
            train.pop("trainable")
        fp.update(flat(train, "train"))
    if stage in ("transfer", "uptrain") or (stage == "finetune" and config.finetune.start == "swap"):
        fp.update(_section(config, "attention"))
    if stage == "transfer":
        fp.update(_section(config, "transfer"))
    if stage in ("finetune", "uptrain"):
        fp.update({k: v for k, v in _section(config, "finetune").items() if stage == "finetune" or k != "finetune.start"})
    if stage == "finetune":
        fp.update(_section(config, "adapter"))
        if config.finetune.start == "transfer":
            fp["upstream.transfer"] = upstream_hash(run_dir, "transfer")
    if stage == "export" or (stage == "eval" and has_converted(run_dir)):
        source = converted_source(run_dir, stage)
        fp[f"upstream.{source.name}"] = upstream_hash(run_dir, source.name)
    elif stage == "eval":  # a run dir with no converted model: eval scores the teacher alone
        fp["teacher_only"] = True
    if stage == "export":
        fp["export.merge"] = config.export.merge
    if stage == "eval":
        fp.update(_section(config, "eval"))
        fp["data_dir"] = str(Path(config.data_dir).expanduser().resolve())
    return fp


def check_chain(source: Path) -> dict[str, Any]:
    """The manifest of ``source`` (a stage output of a run dir), after checking that every
    upstream output it was made from is still the one there (whole, same fingerprint hash).

    Raises:
        RunDirError: naming the stale stage and the command that brings it up to date.
    """
    manifest = read_manifest(source)
    run_dir = source.parent
    for key, recorded in (manifest.get("fingerprint") or {}).items():
        if not key.startswith("upstream."):
            continue
        upstream = key.split(".", 1)[1]
        try:
            current = upstream_hash(run_dir, upstream)
        except FileNotFoundError:
            current = None
        if current != recorded:
            what = "is gone" if current is None else "was made again since, with other settings or data"
            raise RunDirError(
                f"{source} was made from the {upstream} output of {run_dir}, which {what}: {source.name} is "
                f"stale. Run it again: python -m linearize stage={source.name} run.dir={run_dir} (or stage=all)"
            )
        check_chain(run_dir / upstream)
    return manifest


def explicit_sections(overrides: Iterable[str]) -> set[str]:
    """Which of model / attention / run.seed the command line sets (``model=…``, ``model.x=…``,
    ``recipe=…`` sets the attention)."""
    found = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        for section in ("model", "attention", "run.seed"):
            if key == section or key.startswith(section + "."):
                found.add(section)
        if key == "recipe":
            found.add("attention")
    return found


def recorded_teacher(manifest: dict[str, Any]) -> ModelConfig:
    """The teacher a converted model applies to (for a whole-model directory: itself)."""
    return ModelConfig.from_record(manifest["teacher"])


def recorded_value(source: Path, key: str) -> Optional[Any]:
    """``key`` from the fingerprint of ``source`` or, when absent, of the outputs upstream of it."""
    fp = read_manifest(source, check_files=False).get("fingerprint") or {}
    if key in fp:
        return fp[key]
    for k in fp:
        if k.startswith("upstream."):
            found = recorded_value(source.parent / k.split(".", 1)[1], key)
            if found is not None:
                return found
    return None


def _adopt_transfer_attention(config: Config, overrides: Iterable[str]) -> Config:
    """Stage 2 from stage 1 trains the attention stage 1 made: ``config`` with that attention,
    or RunDirError when the command line sets another one (it would not be what trains)."""
    source = Path(config.run.dir) / "transfer"
    if not (source / "linearize.json").is_file():
        return config  # preflight names the missing stage-1 output
    attention = AttentionConfig(**read_manifest(source)["attention"])
    diff = []
    if "attention" in explicit_sections(overrides):
        ignore = ("attention.softmax_layers",)
        diff = differences(_section_of(attention, "attention"), _section_of(config.attention, "attention"), ignore)
    if diff:
        raise RunDirError(
            f"stage=finetune starts from the stage-1 model in {source}, made with another attention than this "
            f"command line gives (the run's -> the command line's): {shown(diff)}. Drop these overrides (stage 2 "
            "trains the attention stage 1 made), run stage=transfer again with them, or use finetune.start=swap"
        )
    return replace(config, attention=attention)


def adopt_source(config: Config, overrides: Iterable[str]) -> Config:
    """For a read-only stage: ``config`` with the teacher, seed, attention (and the data format
    generate templates prompts with) of the converted model it reads.

    Raises:
        RunDirError: when the command line sets any of them to something else, naming each key
            with the run's value and the command line's.
    """
    if config.stage == "finetune" and config.finetune.start == "transfer":
        return _adopt_transfer_attention(config, overrides)
    if config.stage not in READ_ONLY_STAGES:
        return config
    try:
        source = converted_source(Path(config.run.dir), config.stage)
    except FileNotFoundError:
        if config.stage == "eval":  # nothing converted yet: eval scores the teacher alone
            return config
        raise
    manifest = check_chain(source)
    teacher = recorded_teacher(manifest)
    origin = manifest.get("teacher_origin")  # a whole-model dir: the teacher it came from
    attention = AttentionConfig(**manifest["attention"])
    seed = manifest.get("teacher_seed", 0)
    explicit = explicit_sections(overrides)
    diff = []
    if "model" in explicit:
        had = ModelConfig.from_record(origin) if origin else teacher
        diff += differences(_section_of(had, "model"), _section_of(config.model, "model"))
    if "attention" in explicit:
        ignore = ("attention.softmax_layers",)
        diff += differences(_section_of(attention, "attention"), _section_of(config.attention, "attention"), ignore)
    if "run.seed" in explicit and config.run.seed != seed:
        diff.append(f"run.seed: {seed!r} -> {config.run.seed!r}")
    if diff:
        raise RunDirError(
            f"stage={config.stage} reads the converted model in {source}, made with other settings than "
            f"this command line gives (the run's -> the command line's): {shown(diff)}. Drop these overrides "
            f"(stage={config.stage} takes them from the run), or run the training stages again with them"
        )
    data = config.data
    recorded_format = recorded_value(source, "data.format")
    if recorded_format is not None:
        data = replace(data, format=recorded_format)
    return replace(config, model=teacher, attention=attention, run=replace(config.run, seed=seed), data=data)

