"""Shared fixtures: the real composed config (with test overrides), data paths, tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from linearize.config import Config, register_configs, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"
KERNEL_TESTS_ONLY = "LINEARIZE_KERNEL_TESTS_ONLY"  # set: collect only the tests that run Triton kernels


def data_root() -> Path:
    """The offline data sets: $LINEARIZE_DATA, else ./data (make setup links it), else ../shared/data."""
    for candidate in (os.environ.get("LINEARIZE_DATA"), ROOT / "data", SHARED_DATA):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    pytest.skip("needs the offline data sets (../shared/data or LINEARIZE_DATA); none found")


def compose_config(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


def build_config(*overrides: str) -> Config:
    return validate(compose_config(*overrides))


def kill_on_call(objective, call: int) -> None:
    """Make ``objective.loss`` raise as a SIGKILL would stop the loop, on its ``call``-th call."""
    calls, real = [0], objective.loss

    def loss(*args):
        calls[0] += 1
        if calls[0] == call:
            raise KeyboardInterrupt("simulated kill")
        return real(*args)

    objective.loss = loss


@pytest.fixture(scope="session")
def tiny_config() -> Config:
    return build_config("model=tiny-llama", f"data_dir={data_root()}")


@pytest.fixture(scope="session")
def tokenizer(tiny_config):
    from linearize.models.load import load_tokenizer

    return load_tokenizer(tiny_config.model, tiny_config.cache_dir)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def seed_and_one_thread():
    """For the ops tests: seed 0, and one torch thread while the test runs."""
    # Ops here are tiny: waking a second thread per op costs more than the math on a busy CPU.
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    """With $LINEARIZE_KERNEL_TESTS_ONLY set (test_ops_dispatch.py's fresh process), only the tests
    that use a `kernels` fixture run."""
    if os.environ.get(KERNEL_TESTS_ONLY):
        deselected = [item for item in items if "kernels" not in getattr(item, "fixturenames", ())]
        config.hook.pytest_deselected(items=deselected)
        items[:] = [item for item in items if item not in deselected]
