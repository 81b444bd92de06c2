"""Command-line overrides checked before Hydra composes anything: unknown keys (with the closest
known one), values of the wrong type, unknown group options."""

from __future__ import annotations

import difflib
import typing
from dataclasses import MISSING as NO_DEFAULT
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf

from linearize.config.checks import (
    _finite,
)
from linearize.config.run import Config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> list[str]:
    """The options of a config group: the yaml files in ``configs/<group>/``."""
    return sorted(p.stem for p in (config_dir / group).glob("*.yaml"))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _leaf_paths(cls: type, prefix: str = "") -> list[str]:
    """Every settable dotted key of a schema, nested dataclasses walked into."""
    paths = []
    for name, hint in _hints(cls).items():
        if is_dataclass(hint):
            paths += _leaf_paths(hint, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _closest_key(key: str) -> Optional[str]:
    """The schema key the user most likely meant: same last part (``lr`` -> ``train.lr``), else
    the closest spelling."""
    paths = _leaf_paths(Config)
    same_leaf = [p for p in paths if p.rsplit(".", 1)[-1] == key.rsplit(".", 1)[-1]]
    if len(same_leaf) == 1:
        return same_leaf[0]
    close = difflib.get_close_matches(key, paths, n=1, cutoff=0.6)
    return close[0] if close else None


_TYPE_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _type_word(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return f"{_type_word(args[0])} or null"
    origin = typing.get_origin(hint)
    if origin is list:
        item = typing.get_args(hint)[0]
        return f"a list of {_type_word(item).removeprefix('a ')}s, e.g. {'[0,1]' if item is int else '[a,b]'}"
    if origin is dict:
        return "a mapping, e.g. {key: value}"
    return _TYPE_WORDS.get(hint, str(hint))


def _check_key(key: str, value: Any, override: str) -> None:
    """Walk ``key`` through the schema; raise naming the key (and the closest one) or the type."""
    cls: type = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        hints = _hints(cls)
        if part not in hints:
            guess = _closest_key(key)
            suggestion = f" Did you mean '{guess}'?" if guess else ""
            raise ValueError(
                f"{override}: '{key}' is not a config key.{suggestion} "
                "(`python -m linearize --cfg job` prints every key)"
            )
        hint = hints[part]
        if is_dataclass(hint):
            cls = hint
            continue
        if i < len(parts) - 1:  # under a free-form mapping (model.architecture, adapter.options)
            _finite(key, value)
            return
        from omegaconf.errors import ValidationError

        default = next(f.default for f in fields(cls) if f.name == part)
        node = OmegaConf.structured(cls)
        try:
            node[part] = value
        except ValidationError:
            if isinstance(default, bool):
                default = str(default).lower()
            example = f"; e.g. {key}={default}" if default not in (NO_DEFAULT, MISSING, None) else ""
            raise ValueError(f"{override}: {key} takes {_type_word(hint)}, not {value!r}{example}") from None
        # Hydra parses nan, inf and 1e400 as floats: stop them here, before Hydra makes the run
        # directory. (Ranges need the whole section; validate() checks them after composing.)
        _finite(key, value, default)
        return


def check_overrides(overrides: list[str], config_dir: Path = CONFIG_DIR) -> None:
    """Check command-line overrides against the schema before Hydra composes them.

    Hydra would stop on an unknown key or a wrong type too, but with a bare "Key 'lrr' is not in
    struct"; this names the key, its closest real key and the expected type. Group choices
    (``model=…``) must be files of their group. Sweeps, ``hydra.*`` keys and deletions are left
    to Hydra.

    Raises:
        ValueError: naming the override, what is wrong and the fix ("Did you mean …?").
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType

    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.type == OverrideType.DEL or override.is_sweep_override() or key.startswith("hydra"):
            continue
        text = override.input_line or f"{key}={override.value()}"
        if "." not in key and (config_dir / key).is_dir():
            value, options = override.value(), group_options(key, config_dir)
            if value is not None and value not in options:
                close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
                hint = f" Did you mean '{close[0]}'?" if close else ""
                raise ValueError(
                    f"Could not find '{key}/{value}': {key}= takes one of {', '.join(options)}.{hint}"
                )
            continue
        _check_key(key, override.value(), text)

