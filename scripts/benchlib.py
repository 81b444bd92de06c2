"""Helpers shared by the benchmark scripts: peak memory and wall time of a call, the model and
attention arguments and the run config they compose."""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import torch


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


class PeakMemory:
    """Peak memory of the block it wraps, above the level at its start, in bytes."""

    def __init__(self, device: torch.device):
        self.device, self.peak = device, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base, self._stop = _rss(), False
            self._high = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        while not self._stop:
            self._high = max(self._high, _rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop = True
            self._thread.join()
            self.peak = max(self._high, _rss()) - self.base


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def memory_now(device: torch.device) -> int:
    """Bytes in use now: allocated CUDA memory, or this process's resident set size on CPU."""
    return torch.cuda.memory_allocated() if device.type == "cuda" else _rss()


def release_freed_memory(device: torch.device) -> None:
    """Return memory the allocator keeps after frees (glibc ``malloc_trim``; the CUDA cache), so
    that a following measurement counts live tensors rather than what a previous call left."""
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: nothing to trim
        pass


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --attention, --seq-len, --batch, --repeats, --device: what every model benchmark takes."""
    parser.add_argument("--model", default="smollm2-135m", help="a configs/model name")
    parser.add_argument("--attention", default="lolcats", help="a configs/attention name")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    parser.add_argument("--device", default="auto")


def compose_config(model: str, attention: str, overrides: list[str]):
    """The validated run config of ``model=<model> attention=<attention> <overrides>``."""
    from hydra import compose, initialize_config_dir

    from linearize.config import register_configs, validate

    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return validate(compose("config", overrides=[f"model={model}", f"attention={attention}", *overrides]))
