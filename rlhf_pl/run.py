"""What every stage shares: the run directory, the Lightning trainer, the summary, the output index.

A run directory (Hydra's output dir, ``outputs/runs/<time>_<stage>_<model>`` by default) holds:

- ``config.yaml``: the resolved config of the run (Hydra's own copy is in ``.hydra/``);
- ``tensorboard/``: metrics, sample tables; ``csv/`` with ``logger=csv``;
- ``checkpoints/``: Lightning checkpoints; the stage's exported model (``model/``, ``reward_model/``);
- ``summary.json``: the final metrics; plots (``*.png``) and sample tables (``samples.md``).

``outputs/index.json`` remembers the latest output of each stage per model name, so that a later
stage (``+stage=rm`` after ``+stage=sft``) finds its input without being told where it is.
All of these files are written atomically (temp file + ``os.replace``).
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


# --- atomic files ---------------------------------------------------------------------------------


def atomic_write_text(path: Path | str, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: Path | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # tensors and numpy scalars
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- run directory ----------------------------------------------------------------------------------


def current_run_dir(cfg: DictConfig) -> Path:
    """Hydra's output directory for this job, or a fresh one below ``paths.output_root`` outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir = Path(cfg.paths.output_root) / "runs" / f"{stamp}_{cfg.stage}_{cfg.model.name}"
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def write_summary(run_dir: Path, cfg: DictConfig, metrics: dict[str, Any]) -> Path:
    """``summary.json``: stage, model, final metrics. ``objective`` is what sweeps minimise."""
    summary = {"stage": cfg.stage, "model": cfg.model.name, "run_dir": str(run_dir.resolve()), **metrics}
    return atomic_write_json(run_dir / "summary.json", summary)


def run_from_config(cfg: DictConfig) -> dict[str, Any]:
    """Run the stage chosen in ``cfg.stage`` in its run directory; return its summary."""
    import lightning as L

    from rlhf_pl.stages import stage_runner

    _quiet_library_logging()
    if cfg.retain_freed_memory:
        from rlhf_pl.runtime import retain_freed_memory

        retain_freed_memory()
    run_dir = current_run_dir(cfg)
    atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    log.info("run directory: %s", run_dir.resolve())
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    started = time.perf_counter()
    metrics = stage_runner(cfg.stage)(cfg, run_dir)
    metrics["wall_time_s"] = round(time.perf_counter() - started, 2)
    write_summary(run_dir, cfg, metrics)
    log.info("summary: %s", json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, default=str))
    return metrics


def _quiet_library_logging() -> None:
    """Lightning adds its own console handler; under Hydra (which configures the root logger) that
    prints every line twice. Let its records go to the root handlers only."""
    if logging.getLogger().handlers:
        for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
            logging.getLogger(name).handlers.clear()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel probing noise at import


# --- stage output index -------------------------------------------------------------------------------


def _index_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_root) / "index.json"


def record_output(cfg: DictConfig, stage: str, path: Path) -> None:
    """Remember ``path`` as the latest output of ``stage`` for ``cfg.model.name``."""
    index_file = _index_path(cfg)
    index = json.loads(index_file.read_text()) if index_file.exists() else {}
    index.setdefault(stage, {})[cfg.model.name] = str(Path(path).resolve())
    atomic_write_json(index_file, index)


def latest_output(cfg: DictConfig, stage: str) -> Path | None:
    """The latest recorded output of ``stage`` for this model, if it still exists."""
    index_file = _index_path(cfg)
    if not index_file.exists():
        return None
    path = json.loads(index_file.read_text()).get(stage, {}).get(cfg.model.name)
    return Path(path) if path and Path(path).exists() else None


# --- trainer ----------------------------------------------------------------------------------------


def build_precision(cfg: DictConfig):
    """The precision plugin, checked against the accelerator and ``trainer.precision`` before any
    model is loaded."""
    from rlhf_pl import registry

    strategy = registry.build("precision", cfg.precision)
    strategy.check(cfg.trainer.accelerator, cfg.trainer.precision)
    return strategy


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    precision: Any,
    *,
    callbacks: Iterable[Any] = (),
    manual_optimization: bool = False,
    **overrides: Any,
):
    """A ``lightning.Trainer`` from ``cfg.trainer`` writing into ``run_dir``.

    With ``manual_optimization`` the options Lightning refuses in manual mode (gradient clipping,
    accumulation) must be unset; the stage clips itself.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    loggers = []
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="", default_hp_metric=False))
    if cfg.logger.csv:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
    all_callbacks = [ModelCheckpoint(dirpath=run_dir / "checkpoints", save_last=True, save_top_k=0), *callbacks]
    if loggers:
        all_callbacks.append(LearningRateMonitor(logging_interval="step"))
    if t.enable_progress_bar:
        all_callbacks.append(RichProgressBar(leave=True))
    kwargs: dict[str, Any] = dict(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        precision=precision.trainer_precision,
        log_every_n_steps=t.log_every_n_steps,
        val_check_interval=t.val_check_interval,
        limit_train_batches=t.limit_train_batches,
        limit_val_batches=t.limit_val_batches,
        fast_dev_run=t.fast_dev_run,
        enable_progress_bar=t.enable_progress_bar,
        deterministic=t.deterministic,
        logger=loggers or False,
        callbacks=all_callbacks,
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
    )
    if manual_optimization:
        if t.accumulate_grad_batches != 1:
            raise ValueError(
                f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: stage {cfg.stage} uses manual "
                "optimisation, where Lightning cannot accumulate; set it to 1 and use the stage's minibatch settings"
            )
    else:
        kwargs.update(gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches)
    kwargs.update(overrides)
    return L.Trainer(**kwargs)


def tensorboard_writer(trainer: Any):
    """The SummaryWriter of the trainer's TensorBoard logger, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it) of string-able cells."""
    if not rows:
        return ""
    header = list(rows[0])
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)
