"""scripts/chaos_resume.py's ``all`` and ``disk`` modes: the whole pipeline, killed or out of disk.

Both compare with one uninterrupted ``stage=all`` run (transfer -> finetune -> export) on
tiny-llama: the export's logits on a fixed input (``torch.arange(1, 33)[None]``, through
``linearize.load_converted``) must be ``torch.equal`` to the reference's, its manifest's
``fingerprint_hash`` the same, and every published weight file (``<run>/{transfer,finetune,
export}/*.safetensors``, ``work/*/best.safetensors``) the same bytes.

``all``: each trial starts ``stage=all`` in a fresh run dir and kills it (SIGKILL or SIGTERM,
drawn per kill) up to ``--max-kills`` times: at a random delay, as a stage's publish temp dir
``<run>/.<stage>.tmp-*`` is created, as a checkpoint temp dir ``work/<stage>/checkpoints/
.step-*.tmp-*`` appears, or as the manifest ``linearize.json`` is created in a publish temp dir
(the first kill's kind cycles with the trial index, later ones are drawn). After every kill
nothing may be torn and ``<run>/.lock`` must be free; then the same command runs to the end
(rc 0). It must skip exactly the stages that were done and resume a stage from its latest
checkpoint.

``disk``: a per-process file-size limit (``RLIMIT_FSIZE`` set in ``preexec_fn``; Python ignores
SIGXFSZ, so a write past it raises EFBIG as a full disk would). Even trials: a copy of the
reference run dir, then ``stage=export export.merge=true`` under a limit drawn (log-uniform)
between 4 KB and the merged ``model.safetensors`` size: it must fail (rc != 0), leave
``<run>/export`` whole with the reference logits, and, rerun without the limit, write the
merged export an unlimited run writes (same logits, same hash). Odd trials: ``stage=all``
under a limit drawn between 4 KB and the biggest file the reference run wrote (a checkpoint or
an output fails partway), in a fresh run dir (trials 1, 7), or in a copy of the reference run
dir with the stages from finetune (3, 9) or from export (5) on removed, so the disk fills in
that stage: it must fail, leave nothing torn, and, rerun without the limit, end with the
reference export.

A trial during which linearize/ or configs/ changed (others edit them meanwhile) is run again
against a new reference (see ``run_trials`` in chaos_resume.py).
"""

from __future__ import annotations

import fcntl
import math
import os
import random
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from chaos_kill import Kill, run_and_kill, run_to_end, temp_entries
from chaos_resume import (
    EVAL_EVERY,
    STEPS,
    Outcome,
    _differing,
    _reads,
    checkpoint_dirs,
    code_stamp,
    latest_state,
    run_trials,
    stage_args,
    trial_seeds,
)

PUBLISHED = ("transfer", "finetune", "export")
TRAINING = ("transfer", "finetune")
KINDS = ("random", "publish", "checkpoint", "manifest")
MIN_LIMIT = 4096


def all_args(run_dir: Path, data_dir: Path) -> list[str]:
    """``stage=all`` with the small settings every mode uses."""
    return ["stage=all", *stage_args("transfer", run_dir, data_dir)[1:]]


def export_args(run_dir: Path, data_dir: Path) -> list[str]:
    return ["stage=export", "export.merge=true", f"run.dir={run_dir}", f"data_dir={data_dir}"]


def export_logits(run_dir: Path):
    """The export's logits on the fixed input, loaded as a user would."""
    import warnings

    import torch
    from transformers.utils import logging as hf_logging

    import linearize

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        model, _ = linearize.load_converted(run_dir / "export")
    model.eval()
    with torch.no_grad():
        return model(torch.arange(1, 33)[None]).logits


def manifest_hash(out: Path) -> Optional[str]:
    from linearize.rundir import read_manifest

    try:
        return read_manifest(out).get("fingerprint_hash")
    except Exception:  # absent or torn: not done
        return None


def published_weights(run_dir: Path) -> dict[str, bytes]:
    files = [p for s in PUBLISHED for p in (run_dir / s).rglob("*.safetensors")]
    files += [run_dir / "work" / s / "best.safetensors" for s in TRAINING]
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(files) if p.is_file()}


@dataclass
class PipelineRef:
    run_dir: Path
    seconds: float
    logits: object
    hashes: dict[str, Optional[str]]
    weights: dict[str, bytes]
    biggest: int
    stamp: str
    merged: dict = field(default_factory=dict)  # logits, hash, size of the merged export's model


_refs: dict[Path, PipelineRef] = {}


def reference(work: Path, data_dir: Path) -> PipelineRef:
    """One uninterrupted ``stage=all`` run (once per work dir and version of the code)."""
    if work in _refs and _refs[work].stamp == code_stamp():
        return _refs[work]
    stamp = code_stamp()
    run_dir = work / "ref-all"
    shutil.rmtree(run_dir, ignore_errors=True)
    rc, seconds, text = run_to_end(all_args(run_dir, data_dir), work / "ref-all.log")
    if rc != 0:
        raise SystemExit(f"the uninterrupted stage=all run failed (rc {rc}):\n{text[-3000:]}")
    biggest = max(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    ref = PipelineRef(run_dir, seconds, export_logits(run_dir), {s: manifest_hash(run_dir / s) for s in PUBLISHED},
                      published_weights(run_dir), biggest, stamp)  # fmt: skip
    _refs[work] = ref
    return ref


def merged_reference(ref: PipelineRef, work: Path, data_dir: Path) -> dict:
    """What ``export.merge=true`` writes with no limit, in a copy of the reference run dir."""
    if not ref.merged:
        run_dir = work / "ref-merged"
        shutil.rmtree(run_dir, ignore_errors=True)
        shutil.copytree(ref.run_dir, run_dir)
        rc, _, text = run_to_end(export_args(run_dir, data_dir), work / "ref-merged.log")
        if rc != 0:
            raise SystemExit(f"the unlimited merged export failed (rc {rc}):\n{text[-3000:]}")
        ref.merged = {"logits": export_logits(run_dir), "hash": manifest_hash(run_dir / "export"),
                      "size": (run_dir / "export" / "model.safetensors").stat().st_size}  # fmt: skip
    return ref.merged


def log_uniform(rng: random.Random, low: int, high: int) -> int:
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


def check_whole(run_dir: Path, notes: list[str], lost: list[str]) -> None:
    """Nothing torn after a kill or a failed write: published outputs whole (manifest and files),
    latest checkpoints and best weights whole, the lock free."""
    from linearize.rundir import read_manifest

    for stage in PUBLISHED:
        if (run_dir / stage).exists():
            try:
                read_manifest(run_dir / stage)
            except Exception as err:
                lost.append(f"TORN published {stage}: {type(err).__name__}: {err}")
    for stage in TRAINING:
        work = run_dir / "work" / stage
        for root in checkpoint_dirs(work):
            _, what = latest_state(root)
            if what.startswith("TORN"):
                lost.append(f"{stage} {what}")
        if (work / "best.safetensors").is_file() and not _reads(work / "best.safetensors"):
            lost.append(f"TORN {work / 'best.safetensors'}")
    lock = run_dir / ".lock"
    if lock.is_file():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            lost.append("run.dir lock still held after the run ended")
        finally:
            os.close(fd)
    done = [s for s in PUBLISHED if manifest_hash(run_dir / s)]
    temps = temp_entries(lambda: [run_dir], r"\.\w+\.tmp-\w+")
    temps |= temp_entries(lambda: [run_dir / "work" / s / "checkpoints" for s in TRAINING], r"\.step-\d+\.tmp-.*")
    notes.append(f"done: {','.join(done) or 'none'}" + (f", {len(temps)} temp dir(s) left" if temps else ""))


def snapshot(run_dir: Path, ref: PipelineRef) -> dict:
    """Per stage before a rerun: done (whole, the reference's fingerprint hash) and, for a
    training stage, the step its latest whole checkpoint holds."""
    state = {}
    for stage in PUBLISHED:
        step = None
        if stage in TRAINING:
            step, _ = latest_state(run_dir / "work" / stage / "checkpoints")
        state[stage] = (manifest_hash(run_dir / stage) == ref.hashes[stage], step)
    return state


def finish(run_dir: Path, ref: PipelineRef, data_dir: Path, log: Path, notes: list[str], lost: list[str]) -> bool:
    """Rerun the same ``stage=all`` to the end with no limit; True when the export is the reference's."""
    before = snapshot(run_dir, ref)
    rc, _, text = run_to_end(all_args(run_dir, data_dir), log)
    if rc != 0:
        lost.append(f"rerun failed (rc {rc}; {log}): {text.strip().splitlines()[-1] if text.strip() else ''}")
        return False
    for stage, (done, step) in before.items():
        ran = f"stage=all: running {stage} " in text
        if done and ran:
            lost.append(f"{stage} was done but ran again")
        if not done and not ran:
            lost.append(f"{stage} was not done but was skipped")
        if not done and step is not None:
            ckpt = run_dir / "work" / stage / "checkpoints"
            m = re.search(rf"resumed from {re.escape(str(ckpt))}/step-\d+ at step (\d+)", text)
            if not m or int(m.group(1)) != step:
                lost.append(f"{stage}'s latest was step {step} but the rerun {'started at ' + m.group(1) if m else 'started fresh'}")
    notes.append("rerun: " + ("skipped all" if all(d for d, _ in before.values()) else
                              "ran " + ",".join(s for s, (d, _) in before.items() if not d)))  # fmt: skip
    return same_export(run_dir, ref.logits, ref.hashes["export"], notes, ref.weights)


def same_export(run_dir: Path, logits, fp_hash: Optional[str], notes: list[str],
                weights: Optional[dict[str, bytes]] = None) -> bool:  # fmt: skip
    """The export's logits, fingerprint hash (and published weights) are the given ones."""
    import torch

    try:
        got = export_logits(run_dir)
    except Exception as err:
        notes.append(f"MISMATCH: the export does not load ({type(err).__name__}: {err})")
        return False
    if not torch.equal(got, logits):
        notes.append(f"MISMATCH: logits differ by up to {(got - logits).abs().max().item():.3g}")
        return False
    if manifest_hash(run_dir / "export") != fp_hash:
        notes.append(f"MISMATCH: export fingerprint_hash {manifest_hash(run_dir / 'export')} != {fp_hash}")
        return False
    if weights is not None and published_weights(run_dir) != weights:
        notes.append("MISMATCH in " + ", ".join(_differing(published_weights(run_dir), weights)))
        return False
    return True


def plan_kills(index: int, rng: random.Random, ref: PipelineRef, run_dir: Path, max_kills: int) -> list[Kill]:
    def one(kind: str) -> Kill:
        sig = rng.choice((signal.SIGKILL, signal.SIGTERM))
        if kind == "random":
            return Kill(delay=rng.uniform(0.0, ref.seconds), sig=sig)
        if kind == "checkpoint":
            return Kill(nth=rng.randint(1, len(TRAINING) * STEPS // EVAL_EVERY), sig=sig, label="checkpoint write",
                        watch=lambda: [run_dir / "work" / s / "checkpoints" for s in TRAINING],
                        pattern=r"\.step-\d+\.tmp-.*")  # fmt: skip
        stage = rng.choice(PUBLISHED)
        if kind == "publish":
            return Kill(nth=1, sig=sig, label=f"{stage} publish", watch=lambda: [run_dir],
                        pattern=rf"\.{stage}\.tmp-\w+")  # fmt: skip
        return Kill(nth=1, sig=sig, label=f"{stage} manifest write", pattern=r"linearize\.json",
                    watch=lambda: sorted(run_dir.glob(f".{stage}.tmp-*")))  # fmt: skip

    first = one(KINDS[index % len(KINDS)])
    return [first, *(one(rng.choice(KINDS)) for _ in range(rng.randint(1, max_kills) - 1))]


def all_trial(index: int, seed: int, ref: PipelineRef, work: Path, data_dir: Path, max_kills: int) -> Outcome:
    rng = random.Random(seed)
    run_dir = work / f"all-{index:02d}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args, notes, lost = all_args(run_dir, data_dir), [], []
    for attempt, kill in enumerate(plan_kills(index, rng, ref, run_dir, max_kills)):
        killed, seen = run_and_kill(args, kill, work / f"{run_dir.name}.{attempt}.log")
        notes.append(f"{kill.describe()}: {seen}")
        if not killed:
            if not seen.startswith("not killed, finished (rc 0)"):
                lost.append(f"run failed: see {work / f'{run_dir.name}.{attempt}.log'}")
            break
        check_whole(run_dir, notes, lost)
    exact = finish(run_dir, ref, data_dir, work / f"{run_dir.name}.final.log", notes, lost)
    return verdict("all", index, seed, notes, lost, exact)


def disk_trial(index: int, seed: int, ref: PipelineRef, work: Path, data_dir: Path) -> Outcome:
    rng = random.Random(seed)
    run_dir = work / f"disk-{index:02d}-{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    notes, lost = [], []
    if index % 2 == 0:  # a merged export that does not fit
        merged = merged_reference(ref, work, data_dir)
        shutil.copytree(ref.run_dir, run_dir)
        limit = log_uniform(rng, MIN_LIMIT, merged["size"] - 1)
        rc, _, text = run_to_end(export_args(run_dir, data_dir), work / f"{run_dir.name}.limited.log", fsize=limit)
        notes.append(f"merged export, files capped at {limit} B (model.safetensors {merged['size']} B): "
                     + failure(rc, text, lost))  # fmt: skip
        check_whole(run_dir, notes, lost)
        kept = same_export(run_dir, ref.logits, ref.hashes["export"], notes)
        notes.append("old export intact" if kept else "old export damaged")
        rc, _, text = run_to_end(export_args(run_dir, data_dir), work / f"{run_dir.name}.final.log")
        if rc != 0:
            lost.append(f"unlimited merged export failed (rc {rc}): {text.strip().splitlines()[-1]}")
        exact = kept and rc == 0 and same_export(run_dir, merged["logits"], merged["hash"], notes)
    else:  # the pipeline runs out of disk partway, in the stage trials 1, 3, 5 ... cycle through
        start = PUBLISHED[(index // 2) % len(PUBLISHED)]
        if start != "transfer":  # the earlier stages done (as a run that got that far leaves them)
            shutil.copytree(ref.run_dir, run_dir)
            later = PUBLISHED[PUBLISHED.index(start):]
            for path in [*(run_dir / s for s in later), *(run_dir / "work" / s for s in later)]:
                shutil.rmtree(path, ignore_errors=True)
        limit = log_uniform(rng, MIN_LIMIT, ref.biggest)
        rc, _, text = run_to_end(all_args(run_dir, data_dir), work / f"{run_dir.name}.limited.log", fsize=limit)
        running = re.findall(r"stage=all: running (\w+)", text)
        notes.append(f"stage=all, files capped at {limit} B: {failure(rc, text, lost)}"
                     + (f" in {running[-1]}" if running else ""))  # fmt: skip
        check_whole(run_dir, notes, lost)
        exact = finish(run_dir, ref, data_dir, work / f"{run_dir.name}.final.log", notes, lost)
    return verdict("disk", index, seed, notes, lost, exact)


def failure(rc: int, text: str, lost: list[str]) -> str:
    """How a run under a file-size limit ended: it must fail, naming the write that did."""
    if rc == 0:
        lost.append("finished rc 0 although a write past the limit must fail")
        return "finished (rc 0)"
    errors = [line.strip() for line in text.splitlines() if re.search(r"File too large|EFBIG|Errno 27", line)]
    return f"failed (rc {rc})" + (f": {errors[-1][:160]}" if errors else "")


def verdict(mode: str, index: int, seed: int, notes: list[str], lost: list[str], exact: bool) -> Outcome:
    word = "LOST" if lost else ("exact" if exact else "MISMATCH")
    line = f"{mode} trial {index} seed={seed}: " + "; ".join(notes + lost) + f" -> {word}"
    return Outcome(exact=exact and not lost, lost=bool(lost), line=line)


def run_mode(mode: str, trials: int, seed: int, work: Path, data_dir: Path, max_kills: int = 2,
             only: Optional[tuple[int, int]] = None) -> tuple[int, int, int]:  # fmt: skip
    """All trials of ``all`` or ``disk``; returns (trials, exact, lost)."""

    def make_ref() -> PipelineRef:
        ref = reference(work, data_dir)
        print(f"== {mode}: reference stage=all run {ref.seconds:.1f}s, export fingerprint {ref.hashes['export']}, "
              f"biggest file {ref.biggest} B", flush=True)  # fmt: skip
        return ref

    def trial(ref: PipelineRef, i: int, trial_seed: int) -> Outcome:
        if mode == "all":
            return all_trial(i, trial_seed, ref, work, data_dir, max_kills)
        return disk_trial(i, trial_seed, ref, work, data_dir)

    return run_trials(trial_seeds(mode, trials, seed, only), make_ref, trial)
