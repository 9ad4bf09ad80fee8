"""What every training stage builds the same way: the Lightning trainer, the finite-loss guard and
the data-parallel mean of a loss."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import torch
from omegaconf import DictConfig
from torch import Tensor

from rlhf_pl.distributed import check_launchable
from rlhf_pl.errors import NonFiniteLossError
from rlhf_pl.strategies import build_strategy


def make_trainer(
    cfg: DictConfig,
    run_dir: Path,
    precision: Any,
    *,
    callbacks: Iterable[Any] = (),
    manual_optimization: bool = False,
    **overrides: Any,
):
    """A ``lightning.Trainer`` from ``cfg.trainer`` writing into ``run_dir`` (TensorBoard / CSV
    loggers from ``cfg.logger``, a last-checkpoint callback, LR monitor, progress bar).

    With ``manual_optimization`` the options Lightning refuses in manual mode (gradient clipping,
    accumulation) must be unset; the stage clips itself.
    """
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, RichProgressBar
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    loggers = []
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=str(run_dir), name="tensorboard", version="",
                                         default_hp_metric=False))
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
        strategy=build_strategy(t),  # a name, or a configured FSDP/DeepSpeed strategy (rlhf_pl.strategies)
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
            from rlhf_pl.errors import ConfigError

            raise ConfigError(
                f"trainer.accumulate_grad_batches={t.accumulate_grad_batches}: stage {cfg.stage} uses manual "
                "optimisation, where Lightning cannot accumulate; set it to 1 and use the stage's minibatch settings"
            )
    else:
        kwargs.update(gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches)
    kwargs.update(overrides)
    trainer = L.Trainer(**kwargs)
    check_launchable(trainer)
    return trainer


def check_finite_loss(loss: Any, *, stage: str, step: int, lr: float, lr_key: str) -> None:
    """Stop the run at the first non-finite loss, naming the step, the value and the learning rate
    ``lr`` set by config key ``lr_key`` (a diverged model is neither exported nor recorded)."""
    value = float(loss.detach()) if hasattr(loss, "detach") else float(loss)
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"{stage}: the loss is {value} at step {step} with learning rate {lr:.3g} ({lr_key}); training stopped "
            f"and no model was exported or recorded. Lower {lr_key} and run again.")


class GlobalMean(NamedTuple):
    """A mean over the items of every data-parallel rank (see :func:`global_mean`)."""

    loss: Tensor  # scalar, with grad: backpropagate this one (DDP's gradient average then gives ∇ value)
    value: Tensor  # scalar, detached: Σ totals / Σ counts over the ranks (what to log)
    count: Tensor  # scalar: Σ counts over the ranks


def global_mean(total: Tensor, count: Tensor | float) -> GlobalMean:
    """The mean of per-item losses over all ranks, when each rank holds ``total`` (their sum on this
    rank) and ``count`` (how many it has).

    DDP averages the ranks' gradients, so the mean of per-rank means is what it would optimise; that
    weights an item on a rank with few items (tokens, comparison pairs) more than one on a busy rank,
    and differs from one process on the same global batch. Scaling this rank's sum by
    ``W / Σ counts`` (W ranks in the process group; 1 without one) makes the averaged gradient that of
    Σ totals / Σ counts: W processes with batch b compute what one process with batch W·b does. One
    all-reduce of two numbers per call.
    Shapes: total scalar (with grad), count scalar -> :class:`GlobalMean`.
    """
    from rlhf_pl.distributed import world_size
    from rlhf_pl.rl.masked import all_reduce_sum

    count = torch.as_tensor(count, dtype=torch.float32, device=total.device)
    sums = all_reduce_sum(torch.stack([total.detach().float(), count]))  # (2,) summed over ranks
    denominator = sums[1].clamp(min=1)
    return GlobalMean(total * (world_size() / denominator), sums[0] / denominator, sums[1])
