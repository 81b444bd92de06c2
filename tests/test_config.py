"""Every option of every config group composes and validates; bad values fail with the fix."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigAttributeError, ValidationError

from linearize.config import STAGES, Config
from tests.conftest import CONFIGS, build_config, compose_config

GROUPS = ("stage", "model", "attention", "data", "adapter")
# data=text has no default file list: it must be given.
EXTRA = {("data", "text"): ["data.files=[corpus.txt]"]}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_every_option_composes_and_validates(group, option):
    cfg = build_config(f"{group}={option}", *EXTRA.get((group, option), []))
    assert isinstance(cfg, Config)
    if group == "stage":
        assert cfg.stage == option
    else:
        assert getattr(cfg, group).name == option


def test_every_stage_has_a_config_file():
    assert set(_options("stage")) == set(STAGES)


def test_defaults_are_lolcats_stage1_recipe():
    cfg = build_config("stage=transfer")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_accum) == (1e-2, 1, 8)
    assert cfg.train.scheduler == "plateau" and cfg.train.weight_decay == 0.0
    assert (cfg.attention.window, cfg.attention.feature_dim) == (64, 64)
    assert cfg.attention.feature_map == "hedgehog"
    assert build_config("stage=finetune").train.lr == 1e-4


def test_a_recipe_sets_one_stage_alone():
    """recipe=lolcats's stage-2 lr (configs/recipe_stage/lolcats/finetune.yaml) reaches its
    finetune stage only, and a command-line value still wins."""
    assert build_config("stage=finetune", "recipe=lolcats").train.lr == 1e-3
    assert build_config("stage=transfer", "recipe=lolcats").train.lr == 1e-2
    assert build_config("stage=finetune", "recipe=lolcats", "train.lr=5e-4").train.lr == 5e-4
    assert build_config("stage=finetune", "recipe=supra").train.lr == 1e-4  # no file: the stage's own


def test_run_dir_follows_model_and_attention():
    cfg = build_config("model=tiny-llama", "attention=hedgehog")
    assert cfg.run.dir == "runs/tiny-llama-hedgehog"


def test_tiny_llama_is_small_gqa():
    arch = build_config("model=tiny-llama").model.architecture
    assert (arch["num_hidden_layers"], arch["hidden_size"]) == (2, 64)
    assert (arch["num_attention_heads"], arch["num_key_value_heads"]) == (4, 2)


@pytest.mark.parametrize(
    "override,message",
    [
        ("attention.window=-1", "attention.window=-1 must be >= 0"),
        ("attention.chunk_size=0", "attention.chunk_size=0 must be > 0"),
        ("data.seq_len=0", "data.seq_len=0 must be > 0"),
        ("train.batch_size=-2", "train.batch_size=-2 must be > 0"),
        ("train.lr=0", "train.lr=0.0 must be > 0"),
        ("data.val_fraction=1.5", "data.val_fraction=1.5 must lie in (0, 1)"),
        ("model.dtype=fp8", "model.dtype='fp8' is not one of float32, bfloat16, float16, auto"),
        ("run.device=tpu", "run.device='tpu' is not one of auto, cpu, cuda"),
        ("logging.wandb=yes", "logging.wandb='yes' is not one of disabled, offline, online"),
        ("attention.feature_map=hedgehgo", "Did you mean 'hedgehog'?"),
        ("attention.backend=cuda", "attention.backend='cuda' is not one of auto, reference, triton"),
        ("attention.softmax_layers=[1,-1]", "holds a negative layer index"),
        ("attention.mix=2", "attention.mix=2.0 must lie in [0, 1]"),
    ],
)
def test_bad_value_names_key_and_fix(override, message):
    with pytest.raises(ValueError) as err:
        build_config(override)
    assert message in str(err.value)


def test_random_model_needs_architecture():
    with pytest.raises(ValueError, match="init=random but no model.architecture"):
        build_config("model=llama3-8b", "model.init=random")


def test_pretrained_model_needs_path():
    with pytest.raises(ValueError, match="model.path is empty"):
        build_config("model=llama3-8b", "model.path=null")


def test_unknown_group_option_lists_choices():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("model=gpt5")
    text = str(err.value)
    assert "Could not find 'model/gpt5'" in text
    for option in _options("model"):
        assert option in text


def test_unknown_key_and_wrong_type_fail_while_composing():
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train.lrr=1")
    assert isinstance(err.value.__cause__, ConfigAttributeError)
    assert "lrr" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException) as err:
        compose_config("train.lr=abc")
    assert isinstance(err.value.__cause__, ValidationError)
    assert "abc" in str(err.value.__cause__)


def test_text_data_requires_files():
    with pytest.raises(ValueError, match=r"names neither data.files nor data.hub; set e.g."):
        build_config("data=text")


def test_env_sets_data_and_cache_dirs(monkeypatch, tmp_path):
    monkeypatch.setenv("LINEARIZE_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("LINEARIZE_CACHE", str(tmp_path / "c"))
    cfg = build_config()
    assert cfg.data_dir == str(tmp_path / "d") and cfg.cache_dir == str(tmp_path / "c")
