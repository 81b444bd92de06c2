"""The run directory's contract: what it holds, and when a stage's output counts as done.

A run directory (``run.dir``) holds, per stage:

- ``<stage>/``: the stage's published output (a converted model, or the evaluation report).
  It appears by one rename of a finished temporary directory (:func:`publish`); its manifest
  ``linearize.json`` is the last file written into it and lists every other file with its
  size and the fingerprint of the settings that made it. A stage is *done* only if that
  manifest is whole, its files are whole, and its fingerprint is the one asked for.
- ``work/<stage>/``: what a training stage resumes from: ``fingerprint.json`` (the settings
  the work was started with), ``checkpoints/`` (each with its own ``fingerprint.json``),
  ``best.safetensors``, and blockwise transfer's ``hidden_cache/`` and ``blocks/``.
- ``config.yaml``: the resolved config of the last training stage run there (a record only:
  nothing is decided from it).
- ``.lock``: held (``flock``) by the one process working in the directory; it names that
  process's PID and host.

A fingerprint is a flat mapping ``key -> value`` of every setting that changes a stage's
result (the teacher, the attention, the data, the training settings that change the math, the
upstream stage's output). Two fingerprints are compared key by key, so a refusal names each
key with both values.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

from linearize.config import PIPELINE_STAGES
from linearize.log import get_logger, process_rank

log = get_logger(__name__)

MANIFEST = "linearize.json"
FINGERPRINT = "fingerprint.json"
WORK = "work"
LENGTH_KEYS = ("train.max_steps", "train.epochs")
"""Settings a resume may change: they set how long training runs, not what a step computes."""


class RunDirError(ValueError):
    """A run directory that cannot serve what was asked; the message names why and the fix."""

    bad_input = True  # __main__ shows the message alone, exit status 2


def work_dir(run_dir: Path, stage: str) -> Path:
    """Where a training stage keeps what it resumes from."""
    return Path(run_dir) / WORK / stage


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def fingerprint_hash(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True, default=str).encode()).hexdigest()[:16]


def differences(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key whose values differ (a missing key reads as absent)."""
    keys = sorted((old.keys() | new.keys()) - set(ignore), key=lambda k: (k.count("."), k))  # model.path before model.architecture.*
    missing = object()

    def text(value: Any) -> str:
        return "(absent)" if value is missing else repr(value)

    return [f"{k}: {text(old.get(k, missing))} -> {text(new.get(k, missing))}"
            for k in keys if old.get(k, missing) != new.get(k, missing)]  # fmt: skip


def shown(diff: list[str], most: int = 8) -> str:
    more = f"; and {len(diff) - most} more" if len(diff) > most else ""
    return "; ".join(diff[:most]) + more


# --- writing: one rename, manifest last -------------------------------------------------------


def honour_umask(path: Path) -> None:
    """Give ``path`` (a file, or a directory and all under it) the permissions the umask allows.

    safetensors (and ``tempfile``) create private 0600 files; a run's outputs are ordinary files
    that whoever the umask admits may read.
    """
    mask = umask()
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_dir_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_dir)``, then move the finished directory to ``target`` in one rename.

    The temporary directory (``.<name>.tmp-*`` beside ``target``) gets the permissions the umask
    allows, as a directory made with ``mkdir`` would. A failure (a full disk) leaves ``target``
    as it was; a kill leaves only the hidden temporary directory, never read.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        honour_umask(tmp)
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(data, indent=1, default=str))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_manifest(out_dir: Path, manifest: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Write ``linearize.json`` last: ``manifest``, the stage's ``fingerprint`` and its hash, and
    every other file of ``out_dir`` with its size."""
    files = {
        str(p.relative_to(out_dir)): p.stat().st_size
        for p in sorted(out_dir.rglob("*")) if p.is_file() and p.name != MANIFEST
    }  # fmt: skip
    whole = {**manifest, "fingerprint": fingerprint, "fingerprint_hash": fingerprint_hash(fingerprint), "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(whole, indent=1, default=str))


def publish(run_dir: Path, stage: str, write: Callable[[Path], None]) -> Path:
    """Write a stage's outputs with ``write(tmp)`` (which ends with :func:`write_manifest`) and
    rename them into ``<run_dir>/<stage>`` in one step, replacing an older output whole."""
    target = Path(run_dir) / stage
    # What a killed publish left (the run dir's lock says no other writer is at work): a hidden
    # copy of a whole output, never read, would otherwise stay forever.
    for stale in [*target.parent.glob(f".{stage}.tmp-*"), target.with_name(f".{stage}.old")]:
        shutil.rmtree(stale, ignore_errors=True)

    def checked(tmp: Path) -> None:
        write(tmp)
        if not (tmp / MANIFEST).is_file():
            raise RuntimeError(f"stage {stage} wrote no {MANIFEST}; its output would never count as done")

    write_dir_atomically(target, checked)
    return target


# --- reading: whole or an error naming the file and the command that rebuilds it -------------------


def rebuild_hint(path: Path) -> str:
    """The command that writes ``path`` (a stage output dir of a run dir) again."""
    path = Path(path)
    stage = path.name
    if stage in PIPELINE_STAGES:
        return f"rebuild it with: python -m linearize stage={stage} run.dir={path.parent} (or stage=all)"
    return "write it again (python -m linearize stage=export, or copy it again from where it came)"


def check_safetensors(path: Path) -> None:
    """Check that a safetensors file is whole: its header parses and the tensors it describes
    end exactly at the end of the file. Reads the header only.

    Raises:
        ValueError: naming the file, for a truncated or corrupt one.
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise ValueError(f"its header claims {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"it has {size} bytes but its header describes {8 + n + end}")
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:  # garbage parses in many ways
        raise ValueError(f"{str(path)!r} is not a whole safetensors file ({err}): it is truncated or corrupt") from None


def read_json(path: Path, what: str, hint: str) -> Any:
    """A JSON file, or a ValueError naming it (empty, partial, not JSON) and ``hint``."""
    try:
        text = path.read_text()
        if not text.strip():
            raise ValueError("it is empty")
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as err:
        raise RunDirError(f"{what} {str(path)!r} is damaged ({err}); {hint}") from None


def read_manifest(path: Path, *, check_files: bool = True) -> dict[str, Any]:
    """The manifest of a stage output / converted model directory, checked whole.

    Raises:
        FileNotFoundError: when ``path`` has no manifest.
        RunDirError: naming the damaged file (the manifest, or a file it lists: missing, of
            another size, a torn safetensors) and the command that rebuilds it.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a converted model directory: it has no {MANIFEST}")
    hint = rebuild_hint(path)
    manifest = read_json(manifest_path, "the manifest", hint)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise RunDirError(
            f"the manifest {str(manifest_path)!r} lists no files: it was written by an older linearize "
            f"or is damaged; {hint}"
        )
    if check_files:
        for name, size in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise RunDirError(f"{str(file)!r}, listed in {str(manifest_path)!r}, is missing; {hint}")
            if file.stat().st_size != size:
                raise RunDirError(
                    f"{str(file)!r} has {file.stat().st_size} bytes but {MANIFEST} lists {size}: it is "
                    f"truncated or was changed; {hint}"
                )
            if file.suffix == ".safetensors":
                try:
                    check_safetensors(file)
                except ValueError as err:
                    raise RunDirError(f"{err}; {hint}") from None
            elif file.suffix == ".json":
                read_json(file, "the file", hint)
    return manifest


def stage_status(run_dir: Path, stage: str, expected: dict[str, Any]) -> tuple[bool, str]:
    """Whether ``<run_dir>/<stage>`` is done with fingerprint ``expected``, and if not, why."""
    out = Path(run_dir) / stage
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        return False, "no output yet"
    except RunDirError as err:
        return False, f"its output is not whole ({err})"
    diff = differences(manifest.get("fingerprint") or {}, expected)
    if diff:
        return False, f"its output was made with other settings: {shown(diff)}"
    return True, "done"


def upstream_hash(run_dir: Path, stage: str) -> str:
    """The fingerprint hash of a finished upstream output (what a downstream fingerprint holds)."""
    return read_manifest(Path(run_dir) / stage)["fingerprint_hash"]


# --- work state: what a resume continues ---------------------------------------------------------


def has_work(work: Path) -> bool:
    """Whether a training stage left anything to resume in ``work``."""
    return any(
        p.exists() for p in (work / "checkpoints" / "latest", work / "hidden_cache", work / "blocks", work / "best.safetensors")
    )


def work_fingerprint(work: Path) -> Optional[dict[str, Any]]:
    """The fingerprint a stage's work was made with: its latest checkpoint's own, else the one
    written when the work started; None when neither exists."""
    pointer = work / "checkpoints" / "latest"
    hint = f"delete {work} to start this stage over"
    if pointer.is_file():
        own = work / "checkpoints" / pointer.read_text().strip() / FINGERPRINT
        if own.is_file():
            return read_json(own, "the checkpoint fingerprint", hint)
    if (work / FINGERPRINT).is_file():
        return read_json(work / FINGERPRINT, "the fingerprint", hint)
    return None


def resume_differences(recorded: Optional[dict[str, Any]], expected: dict[str, Any]) -> list[str]:
    """How the settings some work was made with (``recorded``; None when it records none) differ
    from ``expected``, the run's length (``LENGTH_KEYS``) aside: empty when a resume may go on."""
    if recorded is None:
        return ["its settings: not recorded (made by an older linearize)"]
    return differences(recorded, expected, LENGTH_KEYS)


def start_work(work: Path, fp: dict[str, Any]) -> None:
    """Record the fingerprint a stage's work starts with (main process)."""
    if process_rank() != 0:
        return
    work.mkdir(parents=True, exist_ok=True)
    write_json_atomic(work / FINGERPRINT, fp)


# --- one process per run directory --------------------------------------------------------------

_held: dict[str, int] = {}


def lock_run_dir(run_dir: Path) -> None:
    """Hold ``<run_dir>/.lock`` for the rest of this process (rank 0 of a launch only).

    Raises:
        RunDirError: when another live process holds it, naming its PID and host.
    """
    if process_rank() != 0:
        return
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunDirError(
            f"run.dir={run_dir} is in use by {holder}; wait for that run to end, stop it, or use "
            "another run.dir (one process per run directory)"
        ) from None
    left = os.pread(fd, 4096, 0).decode(errors="replace").strip()
    if left:
        log.info("run dir %s: took over the lock left by %s, which is no longer running", run_dir, left)
    os.ftruncate(fd, 0)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    os.pwrite(fd, f"PID {os.getpid()} on host {socket.gethostname()} (since {stamp})\n".encode(), 0)
    _held[key] = fd  # kept open: the kernel releases the lock when this process ends, however
    atexit.register(unlock_run_dir, run_dir)  # a clean end clears the holder's name


def unlock_run_dir(run_dir: Path) -> None:
    """Release the lock early and clear the holder's name (a clean end)."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)
