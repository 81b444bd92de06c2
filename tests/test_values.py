"""Every value of the typed config is checked when built: NaN, ±inf and out-of-range numbers fail
at once with a message naming the key, the value and the fix; the edge values that work pass."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import typing
from dataclasses import fields, is_dataclass
from typing import Any

import pytest

from linearize import config as C
from linearize.config import check_overrides
from tests.conftest import ROOT

# Each section built directly, with its required fields filled in.
REQUIRED: dict[str, tuple[type, dict[str, Any]]] = {
    "model": (C.ModelConfig, {"name": "m", "path": "org/m"}),
    "attention": (C.AttentionConfig, {"name": "a"}),
    "data": (C.DataConfig, {"name": "d", "files": ["a.json"]}),
    "adapter": (C.AdapterConfig, {"name": "lora"}),
    "train": (C.TrainConfig, {}),
    "transfer": (C.TransferConfig, {}),
    "finetune": (C.FinetuneConfig, {}),
    "export": (C.ExportConfig, {}),
    "eval": (C.EvalConfig, {}),
    "generate": (C.GenerateConfig, {}),
    "run": (C.RunConfig, {"dir": "runs/x"}),
    "logging": (C.LoggingConfig, {}),
}


def make(section: str, **values: Any):
    cls, required = REQUIRED[section]
    return cls(**{**required, **values})


def message(section: str, **values: Any) -> str:
    with pytest.raises(ValueError) as err:
        make(section, **values)
    return str(err.value)


def test_every_section_is_covered():
    sections = {k: h for k, h in typing.get_type_hints(C.Config).items() if is_dataclass(h)}
    assert sections == {k: cls for k, (cls, _) in REQUIRED.items()}


def _float_fields() -> list[tuple[str, str]]:
    """(section, field) for every float or Optional[float] field: a new one is tested unasked."""
    out = []
    for section, (cls, _) in REQUIRED.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if float in (hints[f.name], *typing.get_args(hints[f.name])):
                out.append((section, f.name))
    return out


FLOAT_FIELDS = _float_fields()


def test_float_fields_found():
    assert ("train", "lr") in FLOAT_FIELDS and ("attention", "window_factor_init") in FLOAT_FIELDS
    assert ("generate", "temperature") in FLOAT_FIELDS and len(FLOAT_FIELDS) >= 13


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("section,name", FLOAT_FIELDS, ids=[f"{s}.{n}" for s, n in FLOAT_FIELDS])
def test_non_finite_float_fails(section, name, bad):
    text = message(section, **{name: bad})
    default = getattr(REQUIRED[section][0], name, None)
    fix = f"set it on the command line, e.g. {section}.{name}={default}" if default is not None else "set a finite one"
    assert text == f"{section}.{name}={bad} must be a finite number; {fix}"


@pytest.mark.parametrize(
    "section,values,text",
    [
        ("model", {"architecture": {"rope_theta": math.inf}},
         "model.architecture.rope_theta=inf must be a finite number"),
        ("model", {"architecture": {"rope_scaling": {"factor": math.nan}}},
         "model.architecture.rope_scaling.factor=nan must be a finite number"),
        ("adapter", {"options": {"scaling": math.nan}}, "adapter.options.scaling=nan must be a finite number"),
        ("adapter", {"options": {"lora_dropout": -math.inf}}, "adapter.options.lora_dropout=-inf must be a finite number"),
    ],
)  # fmt: skip
def test_non_finite_number_in_a_mapping_fails(section, values, text):
    assert text in message(section, **values)


@pytest.mark.parametrize(
    "section,values,text",
    [
        ("train", {"plateau_factor": 1.0}, "train.plateau_factor=1.0 must lie in (0, 1); set it on the command line, e.g. train.plateau_factor=0.1"),
        ("train", {"plateau_factor": 0.0}, "train.plateau_factor=0.0 must lie in (0, 1)"),
        ("train", {"plateau_factor": -0.5}, "train.plateau_factor=-0.5 must lie in (0, 1)"),
        ("train", {"plateau_patience": -1}, "train.plateau_patience=-1 must be >= 0; set it on the command line, e.g. train.plateau_patience=10"),
        ("train", {"epochs": 0.0}, "train.epochs=0.0 must be > 0"),
        ("train", {"lr": -1e-3}, "train.lr=-0.001 must be > 0; set it on the command line, e.g. train.lr=0.001"),
        ("train", {"weight_decay": -0.1}, "train.weight_decay=-0.1 must be >= 0"),
        ("train", {"max_grad_norm": 0.0}, "train.max_grad_norm=0.0 must be > 0"),
        ("data", {"seq_len": 1}, "data.seq_len=1 must be >= 2: a row of one token has no next token to predict; set it on the command line, e.g. data.seq_len=1024"),
        ("data", {"seq_len": 0}, "data.seq_len=0 must be > 0; set it on the command line, e.g. data.seq_len=1024"),
        ("data", {"val_fraction": 1.0}, "data.val_fraction=1.0 must lie in (0, 1); set it on the command line, e.g. data.val_fraction=0.02"),
        ("eval", {"ppl_seq_len": 1, "ppl_stride": 1}, "eval.ppl_seq_len=1 must be >= 2: a window of one token scores nothing"),
        ("eval", {"ppl_seq_len": 64, "ppl_stride": 65}, "eval.ppl_stride=65 exceeds eval.ppl_seq_len=64; set it on the command line, e.g. eval.ppl_stride=32"),
        ("generate", {"temperature": -0.5}, "generate.temperature=-0.5 must be >= 0; set it on the command line, e.g. generate.temperature=0.7"),
        ("attention", {"mix": 1.5}, "attention.mix=1.5 must lie in [0, 1]; set it on the command line, e.g. attention.mix=0.5"),
        ("attention", {"gate_normalizer": 0.0}, "attention.gate_normalizer=0.0 must be > 0"),
        ("attention", {"eps": -1e-6}, "attention.eps=-1e-06 must be > 0"),
        ("transfer", {"mse_weight": 0.0, "xent_weight": 0.0}, "both 0: no loss; set one on the command line, e.g. transfer.mse_weight=1000"),
        ("adapter", {"options": {"r": 2.5}}, "adapter.options.r=2.5 must be a whole number; set it on the command line, e.g. adapter.options.r=8"),
        ("adapter", {"options": {"r": "8"}}, "adapter.options.r='8' must be a whole number"),
        ("adapter", {"options": {"n_frequency": 0}}, "adapter.options.n_frequency=0 must be > 0; set it on the command line, e.g. adapter.options.n_frequency=1000"),
        ("adapter", {"options": {"lora_alpha": "big"}}, "adapter.options.lora_alpha='big' must be a number"),
        ("adapter", {"options": {"lora_alpha": -16}}, "adapter.options.lora_alpha=-16 must be > 0"),
        ("adapter", {"options": {"lora_dropout": 1.0}}, "adapter.options.lora_dropout=1.0 must lie in [0, 1); set it on the command line, e.g. adapter.options.lora_dropout=0.0"),
        ("adapter", {"options": {"vera_dropout": -0.1}}, "adapter.options.vera_dropout=-0.1 must lie in [0, 1)"),
        ("run", {"seed": 2**44}, f"run.seed={2**44} is out of range: the per-layer seeds derived from it must fit torch's 64-bit seed; use one within ±2**43"),
        ("run", {"seed": -(2**44)}, f"run.seed={-(2**44)} is out of range"),
    ],
)  # fmt: skip
def test_out_of_range_fails(section, values, text):
    assert text in message(section, **values)


@pytest.mark.parametrize(
    "section,values",
    [
        ("train", {"plateau_factor": 0.999, "plateau_patience": 0, "epochs": 0.01, "lr": 1e-12,
                   "weight_decay": 0.0, "max_grad_norm": 1e-6}),
        ("data", {"seq_len": 2, "val_fraction": 0.999}),
        ("eval", {"ppl_seq_len": 2, "ppl_stride": 2, "ppl_tokens": 0}),
        ("generate", {"temperature": 0.0}),
        ("generate", {"temperature": 100.0}),
        ("attention", {"mix": 0.0, "window_factor_init": -30.0}),
        ("attention", {"mix": 1.0, "window_factor_init": 30.0}),
        ("transfer", {"mse_weight": 0.0, "xent_weight": 1.0}),
        ("adapter", {"options": {"r": 1, "lora_alpha": 0.5, "lora_dropout": 0.0}}),
        ("adapter", {"options": {"r": 8, "lora_dropout": 0.99, "init_lora_weights": "pissa"}}),
        ("adapter", {"options": {"n_frequency": 1, "scaling": -150.0}}),
        ("run", {"seed": -1}),  # torch.manual_seed takes negative seeds
        ("run", {"seed": 2**43}),
        ("run", {"seed": -(2**43)}),
        ("model", {"architecture": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "rope_scaling": None}}),
    ],
)  # fmt: skip
def test_edge_values_pass(section, values):
    make(section, **values)


def test_every_default_passes():
    for section in REQUIRED:
        make(section)


def test_largest_seed_fits_torch():
    import torch

    torch.manual_seed(C.SEED_LIMIT * 1_000_003 + 1000)  # as models/swap.py derives a layer's seed
    torch.manual_seed(-C.SEED_LIMIT * 1_000_003)


@pytest.mark.parametrize(
    "override,text",
    [
        ("train.lr=nan", "train.lr=nan must be a finite number; set it on the command line, e.g. train.lr=0.01"),
        ("train.lr=inf", "train.lr=inf must be a finite number"),
        ("train.epochs=-inf", "train.epochs=-inf must be a finite number; set it on the command line, e.g. train.epochs=2.0"),
        ("attention.mix=1e400", "attention.mix=inf must be a finite number"),
        ("generate.temperature=NaN", "generate.temperature=nan must be a finite number"),
        ("adapter.options.lora_dropout=nan", "adapter.options.lora_dropout=nan must be a finite number"),
        ("model.architecture.rope_theta=inf", "model.architecture.rope_theta=inf must be a finite number"),
    ],
)  # fmt: skip
def test_non_finite_override_fails_before_hydra(override, text):
    with pytest.raises(ValueError) as err:
        check_overrides(["model=tiny-llama", override])
    assert text in str(err.value)


def test_generated_modeling_file_checks_attention_values():
    """The converted directory's modeling file carries AttentionConfig and the helpers it calls."""
    from linearize.models.remote import _config_part

    namespace: dict[str, Any] = {}
    exec(
        "from dataclasses import dataclass, field\nfrom typing import Any, Optional\nimport difflib\n"
        f"MISSING = '???'\n{_config_part()}",
        namespace,
    )
    namespace["AttentionConfig"](name="a", mix=0.0)
    with pytest.raises(ValueError, match=r"attention.mix=nan must be a finite number"):
        namespace["AttentionConfig"](name="a", mix=math.nan)


@pytest.mark.slow  # a subprocess; it stops before torch is imported, so it takes seconds
def test_cli_nan_exits_2_before_anything_is_made(tmp_path):
    run_dir = tmp_path / "r"
    out = subprocess.run(
        [sys.executable, "-m", "linearize", "stage=prepare", "model=tiny-llama", "train.lr=nan",
         f"run.dir={run_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ},
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-2000:]
    assert "ValueError: train.lr=nan must be a finite number; set it on the command line, e.g. train.lr=0.01" in text
    assert "Traceback" not in text
    assert not run_dir.exists()  # stopped before Hydra, which would make the directory for its log
