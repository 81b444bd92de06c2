"""Entry point: ``python -m linearize stage=STAGE model=MODEL attention=ATTENTION [key=value]``.

Validates the composed config, then hands it to the stage it names. Nothing else.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from linearize.config import register_configs, validate
from linearize.log import get_logger

log = get_logger("linearize")
register_configs()


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here so that `--help` and config errors answer without loading torch.
    from linearize.stages import preflight, run_stage

    try:
        config = validate(cfg)
        preflight(config)
    except Exception as err:  # config, path and data-file errors: the message is the fix
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(2)
    run_stage(config, cfg)


if __name__ == "__main__":
    main()
