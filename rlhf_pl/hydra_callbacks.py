"""Hydra callbacks the cluster presets install (``conf/hydra/launcher/*.yaml``).

:class:`RequireSlurm` runs when a multirun starts, before the sweeper or the launcher exists: on a
machine without SLURM's ``sbatch`` it prints one line (``error: ...``) and exits with code 2, the
way :mod:`rlhf_pl.__main__` reports a user error, so nothing is submitted and no model is loaded.
"""
from __future__ import annotations

import shutil
import sys
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf


def slurm_problem(config: DictConfig, sbatch: Optional[str]) -> Optional[str]:
    """Why a SLURM launch of ``config`` cannot go ahead (``sbatch``: its path, or None), or None."""
    if sbatch is None:
        return ("hydra/launcher=slurm_gpu submits jobs with SLURM's sbatch, which is not on this machine's PATH "
                "(no SLURM here): run it on the cluster's login node, or drop hydra/launcher to run the sweep "
                "here one job after another")
    devices = OmegaConf.select(config, "trainer.devices")
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        return (f"trainer.devices={devices!r} with hydra/launcher=slurm_gpu: SLURM starts trainer.devices tasks "
                "per node (one per GPU), so it must be a number >= 1, e.g. trainer.devices=8")
    return None


class RequireSlurm(Callback):
    """Stop a multirun before anything is submitted when SLURM is not available (see module doc)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problem = slurm_problem(config, shutil.which("sbatch"))
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
