"""Run one stage: its run directory, the resolved config, seeding, the summary, the output index.

A run directory (Hydra's output dir, ``outputs/runs/<time>_<stage>_<model>`` by default) holds:

- ``config.yaml``: the resolved config of the run (Hydra's own copy is in ``.hydra/``);
- ``tensorboard/``: metrics, sample tables; ``csv/`` with ``logger=csv``;
- ``checkpoints/``; the stage's exported outputs (``model/``, ``reward_model/``, ``policy/``);
- ``summary.json``: the final metrics; plots (``*.png``) and sample tables (``samples.md``).

Every one of these files is written atomically (:mod:`rlhf_pl.io`); the outputs are recorded in
``outputs/index.json`` (:mod:`rlhf_pl.outputs`) once the stage has finished.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from rlhf_pl import distributed, outputs
from rlhf_pl.config import validate_config
from rlhf_pl.distributed import is_rank_zero
from rlhf_pl.io import write_json, write_text
from rlhf_pl.stages import StageResult, stage_module

log = logging.getLogger(__name__)


def current_run_dir(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job, or a fresh one below ``paths.output_root`` outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = Path(cfg.paths.output_root) / "runs" / f"{stamp}_{cfg.stage}_{cfg.model.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def run_stage(cfg: DictConfig, run_dir: Optional[Path] = None, inputs: Optional[Mapping[str, Path]] = None,
              *, record: bool = True, **stage_kwargs: Any) -> StageResult:
    """Run stage ``cfg.stage`` in ``run_dir`` (default: Hydra's, else a new one) on ``inputs``
    (name -> path; the rest resolved from the config and the output index); write ``config.yaml``
    and ``summary.json`` (with the process's peak memory); with ``record``, record its outputs as
    the latest of this model. A stage that trains nothing (``USES_LIGHTNING = False``: iterate, whose
    sub-stages run in their own processes, and the app) is run without importing Lightning here."""
    validate_config(cfg)  # before the heavy imports: a bad value fails at once
    module = stage_module(cfg.stage)
    if getattr(module, "USES_LIGHTNING", True):
        _prepare_training_process(cfg)
    rank_zero = is_rank_zero()  # data parallel: the other ranks write no file of their own (rlhf_pl.distributed)
    run_dir = Path(run_dir) if run_dir is not None else current_run_dir(cfg)
    if rank_zero:
        write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run directory: %s", run_dir.resolve())
    started = time.perf_counter()
    result: StageResult = module.run(cfg, run_dir, outputs.Inputs(cfg, module.INPUTS, inputs), **stage_kwargs)
    result.metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
    result.metrics["peak_rss_mib"] = peak_rss_mib()
    result.metrics.update({f"{name}_dir": str(path) for name, path in result.outputs.items()})
    summary = {"stage": cfg.stage, "model": cfg.model.name, "run_dir": str(run_dir.resolve()), **result.metrics}
    if rank_zero:
        write_json(run_dir / "summary.json", summary)
        if record:
            outputs.record(cfg, cfg.stage, result.outputs)
    scalars = {k: v for k, v in result.metrics.items() if not isinstance(v, (list, dict))}
    log.info("summary: %s", json.dumps(scalars, default=str))
    return result


def _prepare_training_process(cfg: DictConfig) -> None:
    """Quiet library logging, retain freed memory (``retain_freed_memory``), seed everything, and have
    data-parallel ranks started as copies of this Hydra job (:func:`rlhf_pl.distributed.install`)."""
    import lightning as L

    _quiet_library_logging()
    distributed.install()
    if cfg.retain_freed_memory:
        from rlhf_pl.runtime import retain_freed_memory

        retain_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)


def peak_rss_mib() -> Optional[float]:
    """This process's peak resident memory in MiB (None where the OS does not report it). Linux:
    VmHWM of this program image (``ru_maxrss`` would also count the image before ``exec``, e.g. a
    large parent that started it); elsewhere ``ru_maxrss``."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)  # macOS: bytes; else KiB


def _quiet_library_logging() -> None:
    """Lightning adds its own console handler; under Hydra (which configures the root logger) that
    prints every line twice. Let its records go to the root handlers only."""
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).handlers.clear()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel probing noise at import
