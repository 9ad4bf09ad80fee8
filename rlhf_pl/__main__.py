"""``python -m rlhf_pl +stage=<name> [overrides]``: compose the config, run the chosen stage."""
from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from rlhf_pl.config import register_configs

log = logging.getLogger("rlhf_pl")


@hydra.main(version_base="1.3", config_path="pkg://rlhf_pl.conf", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from rlhf_pl.stages import usage

    if cfg.stage is None:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    from rlhf_pl.run import run_from_config

    summary = run_from_config(cfg)
    # The returned value is what Hydra sweepers optimise; stages name their headline metric.
    return summary.get("objective")


def main() -> None:
    register_configs()
    _run()


if __name__ == "__main__":
    main()
