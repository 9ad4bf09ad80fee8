"""``python -m rlhf_pl +stage=<name> [overrides]``: compose the config, run the chosen stage.

An error the project raises on purpose (:class:`rlhf_pl.errors.UserError`: a bad config value, bad
data, a missing stage input, …) is printed as ``error: <message>`` and exits with code 2, without a
traceback; ``HYDRA_FULL_ERROR=1`` shows the traceback instead. Any other exception is a bug and keeps
its traceback.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

import hydra
from omegaconf import DictConfig

from rlhf_pl.config import register_configs
from rlhf_pl.errors import UserError

log = logging.getLogger("rlhf_pl")
T = TypeVar("T")


def _reporting_user_errors(call: Callable[[], T]) -> T:
    """``call()``; a UserError becomes one line on stderr and exit code 2 (unless HYDRA_FULL_ERROR=1)."""
    try:
        return call()
    except UserError as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _log_to_files(err)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def _log_to_files(err: UserError) -> None:
    """Put the error in the run's log file too (Hydra's file handler), not twice on the console."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (err,), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(version_base="1.3", config_path="pkg://rlhf_pl.conf", config_name="config")
def _run(cfg: DictConfig) -> float | None:
    from rlhf_pl.stages import usage

    if cfg.stage is None:
        print(usage(), file=sys.stderr)
        sys.exit(2)
    from rlhf_pl.run import run_stage

    result = _reporting_user_errors(lambda: run_stage(cfg))
    # The returned value is what Hydra sweepers optimise; stages name their headline metric.
    return result.metrics.get("objective")


def main() -> None:
    _reporting_user_errors(register_configs)  # a broken plugin package is named (PluginError)
    _run()


if __name__ == "__main__":
    main()
