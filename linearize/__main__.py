"""Entry point: ``python -m linearize stage=STAGE model=MODEL attention=ATTENTION [key=value]``.

Checks the command line and the composed config, then hands it to the stage it names. Nothing
else. A bad input (an unknown key, a wrong value, a missing or damaged file, too little data)
ends the run with its message, naming the value and the fix, and exit status 2.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from linearize.config import check_overrides, register_configs
from linearize.log import get_logger

log = get_logger("linearize")
register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here so that `--help` and config errors answer without loading torch.
    from hydra.core.hydra_config import HydraConfig

    from linearize.stages import checked_config, run_stage

    overrides = list(HydraConfig.get().overrides.task)
    try:
        config = checked_config(cfg, overrides)
    except Exception as err:  # config, path and data-file errors: the message is the fix
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    try:
        run_stage(config, cfg, overrides)
    except (ValueError, OSError, FloatingPointError) as err:
        # Bad inputs found while loading (tagged by stages.prepare) and a diverged loss carry
        # their fix in the message; anything else keeps its traceback.
        if not (getattr(err, "bad_input", False) or isinstance(err, FloatingPointError)):
            raise
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2 if getattr(err, "bad_input", False) else 1)


def cli() -> None:
    """Check the overrides on the command line (unknown keys, wrong types, unknown options), then
    run Hydra; Hydra's own errors for these lack the closest key and the fix."""
    from hydra._internal.utils import get_args_parser

    try:
        check_overrides(get_args_parser().parse_known_args()[0].overrides)
    except ValueError as err:
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    main()


if __name__ == "__main__":
    cli()
