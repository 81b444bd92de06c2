"""Crash-anywhere resume: kill real runs at random moments, rerun them, compare the results.

Modes (``--stages``, comma-separated; default all five):

- ``transfer``, ``finetune``, ``blockwise``: one uninterrupted run of the stage on tiny-llama
  gives the reference weights. Each trial starts the same command in a fresh run dir, SIGKILLs
  it (at a random delay below the reference run's duration, or the moment a checkpoint temp
  dir appears, or, for ``blockwise``, while a hidden-state cache shard is being written),
  sometimes kills the first resume too, resumes with ``run.resume=true`` until the run
  finishes, and compares bit for bit the stage's weights: the published ``<run>/<stage>/*``
  safetensors and the work dir's ``work/<stage>/best.safetensors`` and
  ``blocks/*/block.safetensors``. blockwise runs at most ``--blockwise-trials`` (4) trials.
- ``all``: ``stage=all`` (transfer -> finetune -> export), killed with SIGKILL or SIGTERM at a
  random moment or as a publish temp dir ``<run>/.<stage>.tmp-*``, a checkpoint temp dir or a
  manifest appears, then rerun with the same command: the export's logits must equal the
  reference's (``torch.equal``), its fingerprint hash and weight files too.
- ``disk``: writes fail past a per-process file-size limit (``RLIMIT_FSIZE``, EFBIG as on a
  full disk): a merged export that does not fit must fail and leave the old export intact
  (even trials); a ``stage=all`` that runs out partway must fail, then rerun without the limit
  end with the reference export (odd trials). Details: scripts/chaos_pipeline.py.

A trial is *lost* when a rerun fails, when anything is torn (``latest`` pointing at a torn
checkpoint, a published output whose manifest or files are not whole, a torn ``best``), when
a run that had a whole checkpoint does not resume from it, when ``stage=all`` reruns a stage
that was done, when a write past the size limit goes unnoticed, or (``blockwise``) when a
finished cache shard is recomputed or a torn one is kept.

    .venv/bin/python scripts/chaos_resume.py --trials 10 --seed 0
    .venv/bin/python scripts/chaos_resume.py --stages all,disk --trials 3

Prints one line per trial (with its seed: ``--replay MODE:TRIAL:SEED`` reruns that trial alone)
and, per mode, a final line ``N trials, E exact, L lost``. Exits 1 on any mismatch or loss.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from linearize.train.checkpoint import checked_step, checkpoint_roots, latest_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos_kill import Kill, run_and_kill, run_to_end, temp_entries  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("transfer", "finetune", "blockwise", "all", "disk")
PIPELINE_MODES = ("all", "disk")  # in scripts/chaos_pipeline.py
STEPS, EVAL_EVERY = 8, 2
# A shard's temp files: safetensors' own (>= 0.7 writes ``.tmpXXXXXX`` and renames it) and
# blockwise's ``.shard-N.safetensors.tmp-PID``.
SHARD_TEMP = r"\.tmp\w+|\.shard-\d+\.safetensors\.tmp-\d+"


def default_data_dir() -> Path:
    for candidate in (os.environ.get("LINEARIZE_DATA"), ROOT / "data", ROOT.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    raise SystemExit("no offline data: pass --data-dir or set LINEARIZE_DATA")


def stage_dir(stage: str) -> str:
    """The directory under run.dir a stage writes (blockwise is stage 1 in another mode)."""
    return "finetune" if stage == "finetune" else "transfer"


def work_of(run_dir: Path, stage: str) -> Path:
    """Where the stage keeps what it resumes from: checkpoints, best, cache, blocks."""
    return run_dir / "work" / stage_dir(stage)


def stage_args(stage: str, run_dir: Path, data_dir: Path) -> list[str]:
    """The command-line overrides of one small CPU run of ``stage``."""
    examples = 30 if stage == "blockwise" else 60  # caching the teacher's states dominates blockwise
    args = [
        f"stage={stage_dir(stage)}", "model=tiny-llama", "attention=lolcats", "attention.window=8",
        f"data.max_examples={examples}", "data.seq_len=64", "train.batch_size=1", "train.grad_accum=1",
        f"train.max_steps={STEPS}", f"train.eval_every={EVAL_EVERY}", "train.eval_batches=2",
        f"run.dir={run_dir}", f"data_dir={data_dir}",
    ]  # fmt: skip
    if stage == "blockwise":
        args += ["transfer.mode=blockwise", "transfer.block_size=1", "transfer.shard_rows=16"]
    return args


def checkpoint_dirs(work: Path) -> list[Path]:
    """Every ``checkpoints`` dir of a stage's work dir (:func:`checkpoint_roots`'s)."""
    return [root / "checkpoints" for root in checkpoint_roots(work)]


def latest_state(ckpt_root: Path) -> tuple[Optional[int], str]:
    """The step ``latest`` points at if that checkpoint is whole, by the check a resume makes
    (:func:`linearize.train.checkpoint.checked_step`: nothing unpickled); (None, why) otherwise."""
    try:
        path = latest_checkpoint(ckpt_root.parent)
        if path is None:
            return None, "no latest"
        return checked_step(path), path.name
    except (ValueError, OSError) as err:  # anything unreadable is a torn checkpoint
        return None, f"TORN {ckpt_root}: {type(err).__name__}: {err}"


def output_weights(run_dir: Path, stage: str) -> dict[str, bytes]:
    """The bytes of every weight file a stage leaves: its published output's, and its work dir's
    best weights and finished blocks (not checkpoints, not the cache)."""
    out, work = run_dir / stage_dir(stage), work_of(run_dir, stage)
    files = [*out.rglob("*.safetensors"), *work.glob("best.safetensors"), *work.glob("blocks/*/block.safetensors")]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(files)}


def shard_bytes(work: Path) -> dict[str, bytes]:
    cache = work / "hidden_cache"
    return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("*/shard-*.safetensors"))}


def shard_stamps(work: Path) -> dict[str, int]:
    cache = work / "hidden_cache"
    return {str(p.relative_to(cache)): p.stat().st_mtime_ns for p in sorted(cache.glob("*/shard-*.safetensors"))}


@dataclass
class Reference:
    run_dir: Path
    seconds: float
    weights: dict[str, bytes]
    shards: dict[str, bytes] = field(default_factory=dict)


@dataclass
class Outcome:
    exact: bool
    lost: bool
    line: str


def reference_run(stage: str, work: Path, data_dir: Path) -> Reference:
    run_dir = work / f"ref-{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh start, also when the code changed
    if stage == "finetune":
        seed_transfer(run_dir, work / "ref-transfer")
    rc, seconds, text = run_to_end(stage_args(stage, run_dir, data_dir), work / f"ref-{stage}.log")
    if rc != 0:
        raise SystemExit(f"the uninterrupted {stage} run failed (rc {rc}):\n{text[-3000:]}")
    shards = shard_bytes(work_of(run_dir, stage)) if stage == "blockwise" else {}
    return Reference(run_dir, seconds, output_weights(run_dir, stage), shards)


def seed_transfer(run_dir: Path, transfer_ref: Path) -> None:
    """Stage 2 starts from stage 1's output: copy the reference's published transfer dir
    (not its work) into ``run_dir``."""
    src = transfer_ref / "transfer"
    if not (src / "linearize.json").is_file():
        raise SystemExit(f"{src} holds no finished stage-1 run; run the transfer reference first")
    shutil.copytree(src, run_dir / "transfer")


def plan_kills(stage: str, index: int, rng: random.Random, ref: Reference, stage_work: Path, max_kills: int) -> list[Kill]:
    """The kills of one trial. The first: as a checkpoint write starts in trials 1, 4, 7, …, as
    a cache shard write starts in ``blockwise``'s odd trials, else at a random delay. Later ones
    (the resumes killed again): at a random delay."""
    if stage == "blockwise" and index % 2 == 1:
        shards = len([k for k in ref.shards if k.startswith("train/")])
        first = Kill(nth=rng.randint(1, shards), watch=lambda: [stage_work / "hidden_cache" / "train"],
                     pattern=SHARD_TEMP, done=r"shard-\d+\.safetensors")  # fmt: skip
    elif index % 3 == 1:
        first = Kill(nth=rng.randint(1, STEPS // EVAL_EVERY), watch=lambda: checkpoint_dirs(stage_work),
                     pattern=r"\.step-\d+\.tmp-.*")  # fmt: skip
    else:
        first = Kill(delay=rng.uniform(0.0, ref.seconds))
    more = [Kill(delay=rng.uniform(0.0, ref.seconds)) for _ in range(rng.randint(1, max_kills) - 1)]
    return [first, *more]


def run_trial(stage: str, index: int, seed: int, ref: Reference, work: Path, data_dir: Path,
              max_kills: int) -> Outcome:  # fmt: skip
    rng = random.Random(seed)
    run_dir = work / f"{stage}-{index:02d}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    if stage == "finetune":
        seed_transfer(run_dir, work / "ref-transfer")
    stage_work = work_of(run_dir, stage)  # what the kills watch and the checks read
    args = stage_args(stage, run_dir, data_dir)
    notes, lost = [], []
    attempt = 0
    for kill in plan_kills(stage, index, rng, ref, stage_work, max_kills):
        run_args = args if attempt == 0 else [*args, "run.resume=true"]
        before = shard_stamps(stage_work) if stage == "blockwise" and attempt else {}
        began = time.monotonic()
        killed, seen = run_and_kill(run_args, kill, work / f"{run_dir.name}.{attempt}.log")
        notes.append(f"{kill.describe()}: {seen}")
        if not killed:
            if not seen.startswith("not killed, finished (rc 0)"):
                lost.append(f"run failed: see {work / f'{run_dir.name}.{attempt}.log'}")
            if attempt == 0:  # a whole run took this long: later delays are drawn below it
                ref.seconds = min(ref.seconds, time.monotonic() - began)
            break
        attempt += 1
        for root in checkpoint_dirs(stage_work):
            step, what = latest_state(root)
            if what.startswith("TORN"):
                lost.append(what)
            if step is not None and root == stage_work / "checkpoints":
                notes.append(f"latest {what}")
        left = temp_entries(lambda: checkpoint_dirs(stage_work), r"\.step-\d+\.tmp-.*")
        if left:
            notes.append(f"{len(left)} checkpoint temp dir(s) left")
        if stage == "blockwise":
            torn = [n for n in shard_stamps(stage_work) if not _reads(stage_work / "hidden_cache" / n)]
            if torn:
                lost.append(f"torn shards kept: {torn}")
            left = temp_entries(lambda: [stage_work / "hidden_cache" / "train", stage_work / "hidden_cache" / "val"], SHARD_TEMP)
            notes.append(f"{len(shard_stamps(stage_work))} whole shards, {len(left)} temp files left")
            _check_shards_kept(before, shard_stamps(stage_work), lost)
    # Resume to the end (once; the planned kills above may have killed resumes already).
    expect, _ = latest_state(stage_work / "checkpoints")
    before = shard_stamps(stage_work)
    rc, _, text = run_to_end([*args, "run.resume=true"], work / f"{run_dir.name}.final.log")
    if rc != 0:
        lost.append(f"resume failed (rc {rc}): {text.strip().splitlines()[-1] if text.strip() else ''}")
    elif expect is not None and stage != "blockwise":
        m = re.search(r"resumed from \S+ at step (\d+)", text)
        if not m or int(m.group(1)) != expect:
            lost.append(f"latest was step {expect} but the resume {'started at ' + m.group(1) if m else 'started fresh'}")
    if stage == "blockwise":
        if _check_shards_kept(before, shard_stamps(stage_work), lost):
            notes.append(f"resume left the {len(before)} finished shards untouched")
        if rc == 0 and shard_bytes(stage_work) != ref.shards:
            lost.append("cache shards differ from the reference run's")
    weights = output_weights(run_dir, stage)
    exact = rc == 0 and weights == ref.weights
    if rc == 0 and not exact:
        notes.append("MISMATCH in " + ", ".join(_differing(weights, ref.weights)))
    verdict = "LOST" if lost else ("exact" if exact else "MISMATCH")
    line = f"{stage} trial {index} seed={seed}: " + "; ".join(notes + lost) + f" -> {verdict}"
    return Outcome(exact=exact and not lost, lost=bool(lost), line=line)


def _reads(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # a torn file fails in many ways
        return False


def _check_shards_kept(before: dict[str, int], after: dict[str, int], lost: list[str]) -> bool:
    """Shards finished before a run must be neither rewritten nor removed by it."""
    changed = [n for n, t in before.items() if after.get(n) != t]
    if changed:
        lost.append(f"finished shards recomputed or removed: {changed[:3]}")
    return not changed


def _differing(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    return sorted(n for n in got.keys() | want.keys() if got.get(n) != want.get(n))


def run_stage(stage: str, trials: int, seed: int, work: Path, data_dir: Path, max_kills: int = 2,
              only: Optional[tuple[int, int]] = None, blockwise_trials: int = 4) -> tuple[int, int, int]:  # fmt: skip
    """All trials of one mode; returns (trials, exact, lost)."""
    if stage in PIPELINE_MODES:
        return pipeline_module().run_mode(stage, trials, seed, work, data_dir, max_kills, only)

    def make_ref() -> Reference:
        if stage == "finetune":
            reference_run("transfer", work, data_dir)  # stage 2 starts from stage 1's output
        ref = reference_run(stage, work, data_dir)
        print(f"== {stage}: reference run {ref.seconds:.1f}s, {len(ref.weights)} weight files", flush=True)
        return ref

    seeds = trial_seeds(stage, trials, seed, only)
    if stage == "blockwise" and only is None:
        seeds = seeds[:blockwise_trials]
    return run_trials(seeds, make_ref, lambda ref, i, s: run_trial(stage, i, s, ref, work, data_dir, max_kills))


def trial_seeds(mode: str, trials: int, seed: int, only: Optional[tuple[int, int]]) -> list[tuple[int, int]]:
    rng = random.Random(f"{seed}-{mode}")
    return [only] if only is not None else list(enumerate(rng.randrange(2**31) for _ in range(trials)))


def code_stamp() -> str:
    """A hash of the code and configs the runs execute (others may edit them meanwhile)."""
    h = hashlib.sha256()
    for p in sorted([*(ROOT / "linearize").rglob("*.py"), *(ROOT / "configs").rglob("*.yaml")]):
        h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def run_trials(seeds: list[tuple[int, int]], make_ref: Callable[[], object],
               trial: Callable[[object, int, int], Outcome], retries: int = 3) -> tuple[int, int, int]:  # fmt: skip
    """Run the trials against ``make_ref()``'s reference; returns (trials, exact, lost). A trial
    (or reference) during which linearize/ or configs/ changed compares two versions of the
    code: it is run again, against a new reference."""
    ref, stamp, exact, lost = None, None, 0, 0
    for i, trial_seed in seeds:
        for attempt in range(retries + 1):
            while stamp != code_stamp():
                if stamp is not None:
                    print("== linearize/ or configs/ changed: a new reference run", flush=True)
                stamp = code_stamp()
                ref = make_ref()
            outcome = trial(ref, i, trial_seed)
            if stamp == code_stamp() or attempt == retries:
                break
            print(f"(the code changed during this trial, run again) {outcome.line}", flush=True)
        print(outcome.line, flush=True)
        exact += outcome.exact
        lost += outcome.lost
    return len(seeds), exact, lost


def pipeline_module():
    """scripts/chaos_pipeline.py (the ``all`` and ``disk`` modes), which imports this module."""
    sys.modules.setdefault("chaos_resume", sys.modules[__name__])
    if str(Path(__file__).parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).parent))
    import chaos_pipeline

    return chaos_pipeline


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="trials per mode")
    parser.add_argument("--seed", type=int, default=0, help="draws every trial's seed")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"modes, comma-separated, of {','.join(STAGES)}")
    parser.add_argument("--max-kills", type=int, default=2, help="kills per trial are drawn from 1..this")
    parser.add_argument("--blockwise-trials", type=int, default=4, help="at most this many blockwise trials")
    parser.add_argument("--replay", help="MODE:TRIAL:SEED: rerun one trial as a trial line printed it")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--work", type=Path, default=None, help="where run dirs go (default: a temp dir, removed)")
    opts = parser.parse_args(argv)
    replay_stage, replay_index, replay_seed = (opts.replay or "::").split(":")
    stages = [replay_stage] if opts.replay else opts.stages.split(",")
    for stage in stages:
        if stage not in STAGES:
            parser.error(f"{stage!r} is not one of {', '.join(STAGES)}")
    data_dir = opts.data_dir or default_data_dir()
    work = opts.work or Path(tempfile.mkdtemp(prefix="chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    summary, failed = [], False
    start = time.monotonic()
    try:
        for stage in stages:
            only = (int(replay_index), int(replay_seed)) if opts.replay else None
            began = time.monotonic()
            total, exact, lost = run_stage(stage, opts.trials, opts.seed, work, data_dir, opts.max_kills, only,
                                            opts.blockwise_trials)
            summary.append((stage, total, exact, lost, time.monotonic() - began))
            failed |= exact != total or lost > 0
    finally:
        if opts.work is None and not failed:
            shutil.rmtree(work, ignore_errors=True)
    print(f"({time.monotonic() - start:.0f}s; run dirs {'kept in ' + str(work) if failed or opts.work else 'removed'})")
    for stage, total, exact, lost, seconds in summary:
        print(f"== {stage} ({seconds:.0f}s)")
        print(f"{total} trials, {exact} exact, {lost} lost")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
