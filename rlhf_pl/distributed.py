"""Data-parallel processes under Hydra: which process this is, and how the other ranks are started.

Lightning's DDP strategy (``trainer=ddp``, ``trainer=ddp_cpu``) starts ranks 1…W−1 of a node by
running the command line again. Under Hydra its own command (``sys.argv`` + ``hydra.run.dir``) goes
wrong in two ways: a ``-m`` sweep is started again in every child (each sweeping the whole grid
itself), and each child writes a Hydra log file of its own into the run directory. The command
built here instead re-runs *this job*: ``python -m rlhf_pl`` with the job's own overrides (one
point of a sweep, without ``-m``), in the job's output directory, with no ``.hydra/`` copy and no
log file (``hydra/job_logging=none``: a child's warnings still reach the terminal). So one run has
one run directory, one ``config.yaml`` and ``summary.json`` (:func:`rlhf_pl.run.run_stage` writes
them on rank 0 only), one log file and one ``index.json`` update.

A DDP run that is not started by ``python -m rlhf_pl`` (a notebook, a test calling ``run_stage``)
cannot be copied this way; :func:`check_launchable` refuses it with the command to use instead.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Optional

from rlhf_pl.errors import ConfigError

# environment variables that hold a process's global rank or its place on the node (Lightning's children get
# LOCAL_RANK and NODE_RANK; torchrun sets RANK; SLURM sets SLURM_PROCID)
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "JSM_NAMESPACE_RANK")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, decided from the environment, so before (or without) any
    process group: a process started as another rank always has one of :data:`RANK_VARIABLES` non-zero."""
    return all(os.environ.get(name, "0") in ("", "0") for name in RANK_VARIABLES)


def child_command(local_rank: int) -> tuple[list[str], Optional[str]]:
    """The command that starts ``local_rank`` of this Hydra job, and its working directory (None: this one).
    Replaces Lightning's ``_hydra_subprocess_cmd`` (:func:`install`)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    return ([sys.executable, "-m", "rlhf_pl", *map(str, hydra_cfg.overrides.task),
             f'hydra.run.dir="{hydra_cfg.runtime.output_dir}"', "hydra.output_subdir=null",
             f"hydra.job.name=rank_{local_rank}", "hydra/job_logging=none", "hydra/hydra_logging=none"], None)


def install() -> None:
    """Make Lightning (Trainer and Fabric) start the other ranks with :func:`child_command` (idempotent).
    Lightning looks the function up in its launcher modules at launch time, so replacing it there is enough."""
    from lightning.fabric.strategies.launchers import subprocess_script as fabric_launcher
    from lightning.pytorch.strategies.launchers import subprocess_script as trainer_launcher

    trainer_launcher._hydra_subprocess_cmd = fabric_launcher._hydra_subprocess_cmd = child_command


def launch_processes(trainer_cfg: Any) -> Any:
    """For a stage that samples without a Lightning trainer (collect): the data-parallel processes that
    ``trainer.*`` asks for, started by Lightning Fabric (the same strategies and cluster environments as the
    trainer's), with the process group ready; None when that is one process."""
    import lightning as L

    fabric = L.Fabric(accelerator=trainer_cfg.accelerator, devices=trainer_cfg.devices, strategy=trainer_cfg.strategy,
                      num_nodes=trainer_cfg.num_nodes)
    if fabric.world_size == 1:
        return None
    _refuse_outside_rlhf_pl(fabric._strategy.launcher, fabric.world_size, trainer_cfg.strategy)
    fabric.launch()
    return fabric


def check_launchable(trainer: Any) -> None:
    """Refuse a multi-process trainer whose other ranks Lightning would start by re-running a command line
    that is not this project's (pytest, a notebook): they would run that program instead."""
    _refuse_outside_rlhf_pl(getattr(trainer.strategy, "launcher", None), trainer.num_devices,
                            type(trainer.strategy).__name__)


def _refuse_outside_rlhf_pl(launcher: Any, processes: int, strategy: str) -> None:
    from hydra.core.hydra_config import HydraConfig
    from lightning.fabric.strategies.launchers.subprocess_script import _SubprocessScriptLauncher as FabricLauncher
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if (isinstance(launcher, (_SubprocessScriptLauncher, FabricLauncher)) and processes > 1 and is_rank_zero()
            and not HydraConfig.initialized()):
        raise ConfigError(
            f"trainer.strategy={strategy!r} with {processes} processes starts the other processes by running the "
            "command line again, and this process was not started by `python -m rlhf_pl` (its command line: "
            + " ".join(sys.argv[:3]) + " …); run the stage with `python -m rlhf_pl +stage=<name> trainer=ddp_cpu "
            "...`, or use trainer.devices=1 here")


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` without a process group). A collective: every rank
    must call it at the same point."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def world_size() -> int:
    """Processes in the default process group (1 without one)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
