"""Optimizers and learning-rate schedules for every stage: ``<stage>.optim.*`` (:class:`OptimConfig`)."""
from __future__ import annotations

import importlib
import logging
import warnings
from typing import Any, Iterable

import torch

from rlhf_pl.config import OptimConfig

log = logging.getLogger(__name__)

SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}  # -> transformers' names
OPTIMIZERS = {  # optim.optimizer -> (module, class)
    "adamw": ("torch.optim", "AdamW"),
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit"),
    "paged_adamw8bit": ("bitsandbytes.optim", "PagedAdamW8bit"),
}


def make_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig) -> torch.optim.Optimizer:
    """``optim.optimizer`` over the parameters that require grad. The 8-bit ones (bitsandbytes) keep
    both Adam moments in 8 bits (blockwise) for tensors of >= 4096 elements, 32 bits below that;
    paging (``paged_adamw8bit``) only acts on CUDA: elsewhere it is ``adamw8bit``. torch's AdamW
    runs its fused kernel when every parameter is a floating-point tensor on the CPU or CUDA (on the
    CPU the default is a per-tensor loop, many times slower; docs/benchmarks.md)."""
    trainable = [p for p in params if p.requires_grad]
    module, cls = OPTIMIZERS[optim.optimizer]
    if optim.optimizer.startswith("paged") and trainable and trainable[0].device.type != "cuda":
        log.info("optim.optimizer=%s: paging needs CUDA; on %s it runs unpaged (as adamw8bit)",
                 optim.optimizer, trainable[0].device.type)
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
    optimizer_cls = getattr(importlib.import_module(module), cls)
    fused = optimizer_cls is torch.optim.AdamW and fused_adamw_ok(trainable)
    optimizer = optimizer_cls(trainable, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                              weight_decay=optim.weight_decay, **({"fused": True} if fused else {}))
    if fused:
        # A fused AdamW tells GradScaler it can unscale gradients inside its kernel, and Lightning then
        # refuses gradient clipping under mixed precision (clipping needs unscaled gradients first).
        # Clearing the flag keeps the ordinary order — unscale, clip, step (skipped on inf) — with
        # the fused kernel doing only the Adam update.
        optimizer._step_supports_amp_scaling = False
    return optimizer


def fused_adamw_ok(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these parameters: floating point, on CPU or CUDA."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, total_steps: int) -> dict[str, Any]:
    """``optim.optimizer`` (AdamW, 8-bit AdamW, paged 8-bit AdamW) + linear warm-up, then
    ``optim.schedule`` decay. Returns Lightning's optimizer dict."""
    from transformers import get_scheduler

    optimizer = make_optimizer(params, optim)
    total_steps = max(1, int(total_steps))
    scheduler = get_scheduler(
        SCHEDULES[optim.schedule], optimizer,
        num_warmup_steps=int(optim.warmup_ratio * total_steps), num_training_steps=total_steps,
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
