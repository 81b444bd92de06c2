"""Run a ``python -m linearize`` command to its end, or kill it at a chosen moment (a random time,
or the instant a watched file appears: inotify), for scripts/chaos_resume.py and
scripts/chaos_pipeline.py."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]


def command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "linearize", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


def file_size_limit(limit: Optional[int]) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` capping every file the run writes at ``limit`` bytes (a full disk)."""
    if limit is None:
        return None
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def run_to_end(args: list[str], log: Path, fsize: Optional[int] = None) -> tuple[int, float, str]:
    """Run to completion (writes past ``fsize`` bytes failing); returns (exit code, seconds, output)."""
    start = time.monotonic()
    out = subprocess.run(command(args), cwd=ROOT, env=_env(), capture_output=True, text=True,
                         preexec_fn=file_size_limit(fsize))  # fmt: skip
    text = out.stdout + out.stderr
    log.write_text(text)
    return out.returncode, time.monotonic() - start, text


def temp_entries(dirs: Callable[[], list[Path]], pattern: str) -> set[str]:
    """Names matching ``pattern`` in the directories ``dirs()`` lists (missing ones skipped)."""
    found = set()
    for d in dirs():
        try:
            with os.scandir(d) as it:
                found.update(f"{d}/{e.name}" for e in it if re.fullmatch(pattern, e.name))
        except FileNotFoundError:
            pass
    return found


@dataclass
class Kill:
    """When to kill (with ``sig``): after ``delay`` seconds, or at the ``nth`` new temp entry in
    ``watch`` (matching ``pattern``); with ``done`` too, at the latest once ``nth`` entries
    matching ``done`` exist (a write too quick for the poll to see its temp file). ``label``
    names the moment in the trial line."""

    delay: Optional[float] = None
    nth: Optional[int] = None
    watch: Optional[Callable[[], list[Path]]] = None
    pattern: str = ""
    done: str = ""
    sig: int = signal.SIGKILL
    label: str = ""

    def describe(self) -> str:
        name = signal.Signals(self.sig).name
        if self.delay is not None:
            return f"random {name} (drawn {self.delay:.2f}s)"
        return f"{name} as {self.label or ('cache shard' if self.done else 'checkpoint') + ' write'} #{self.nth} starts"


class Inotify:
    """Linux inotify through libc: names created in watched dirs, microseconds after the fact
    (a shard write lasts about a millisecond, too short to catch by listing the dir)."""

    IN_CREATE, IN_MOVED_TO = 0x100, 0x80

    def __init__(self):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self.watched: dict[int, Path] = {}

    def watch(self, path: Path) -> None:
        if path not in self.watched.values() and path.is_dir():
            wd = self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_CREATE | self.IN_MOVED_TO)
            if wd >= 0:
                self.watched[wd] = path

    def created(self, timeout: float) -> list[str]:
        """Paths created since the last call, waiting up to ``timeout`` seconds for one."""
        if not select.select([self.fd], [], [], timeout)[0]:
            return []
        buf, out, i = os.read(self.fd, 1 << 16), [], 0
        while i < len(buf):
            wd, _, _, size = struct.unpack_from("iIII", buf, i)
            name = buf[i + 16 : i + 16 + size].rstrip(b"\0").decode()
            out.append(f"{self.watched.get(wd, '?')}/{name}")
            i += 16 + size
        return out

    def close(self) -> None:
        os.close(self.fd)


def run_and_kill(args: list[str], kill: Kill, log: Path) -> tuple[bool, str]:
    """Start the run and kill it as ``kill`` says; returns (killed, what was seen)."""
    proc = subprocess.Popen(command(args), cwd=ROOT, env=_env(), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    start, seen, hit, done = time.monotonic(), set(), "", 0
    notify = Inotify() if kill.watch is not None else None
    fired = []

    def fire() -> None:  # the run's own process group, started above; at once: a write is under way
        if not fired:
            fired.append(time.monotonic())
            os.killpg(proc.pid, kill.sig)

    try:
        while proc.poll() is None:
            if kill.delay is not None:
                if time.monotonic() - start >= kill.delay:
                    hit = f"killed at {time.monotonic() - start:.2f}s"
                    break
                time.sleep(0.01)
                continue
            for d in kill.watch():
                if d not in notify.watched.values() and d.is_dir():
                    notify.watch(d)
                    done += len(temp_entries(lambda: [d], kill.done)) if kill.done else 0
            for path in notify.created(0.002):  # in the order the files appeared
                name = Path(path).name
                if kill.done and re.fullmatch(kill.done, name):
                    done += 1
                elif re.fullmatch(kill.pattern, name) and path not in seen:
                    seen.add(path)
                    # With ``done``, the nth write is the one that starts while nth - 1 are done.
                    if (done == kill.nth - 1) if kill.done else len(seen) >= kill.nth:
                        fire()
                        hit = f"killed at {time.monotonic() - start:.2f}s as {name} was created"
                        break
            if not kill.done and not hit:  # a dir made with its parent is seen by listing only
                seen |= temp_entries(kill.watch, kill.pattern)
                if len(seen) >= kill.nth:
                    fire()
                    hit = f"killed at {time.monotonic() - start:.2f}s as temp dir #{kill.nth} was listed"
            if hit:
                break
            if kill.done and done >= kill.nth:
                hit = f"killed at {time.monotonic() - start:.2f}s after write #{kill.nth} (its temp file missed)"
                break
    finally:
        if notify is not None:
            notify.close()
    if not hit:
        return False, f"not killed, finished (rc {proc.wait()}) first"
    try:
        fire()
    except ProcessLookupError:
        pass
    if kill.sig != signal.SIGKILL:
        try:
            hit += f" (exit {proc.wait(timeout=60)})"
        except subprocess.TimeoutExpired:
            hit += " (still running 60s after SIGTERM: SIGKILLed)"
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
    except ProcessLookupError:
        pass
    proc.wait()
    return True, hit
