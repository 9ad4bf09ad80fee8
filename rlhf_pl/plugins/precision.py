"""Built-in precision strategies: fp32, bf16-mixed, fp16-mixed.

A precision strategy names the Lightning ``Trainer(precision=...)`` value to use and checks, before
any model is loaded, that it can work on the chosen accelerator and does not contradict an explicit
``trainer.precision``. Weights stay float32 in all three; the mixed ones autocast the compute.
"""
from __future__ import annotations

from typing import Optional, Protocol, Union, runtime_checkable

import torch

from rlhf_pl.plugins.specs import BF16MixedConfig, FP16MixedConfig, FP32Config

# Lightning's aliases for the three values the built-in strategies use.
_LIGHTNING_ALIASES: dict[str, str] = {
    "32": "32-true", "32-true": "32-true",
    "bf16": "bf16-mixed", "bf16-mixed": "bf16-mixed",
    "16": "16-mixed", "16-mixed": "16-mixed",
}
_CHOICES = "precision=fp32, precision=bf16-mixed, precision=fp16-mixed"


class PrecisionError(ValueError):
    """The precision plugin cannot work with this accelerator or contradicts trainer.precision."""


@runtime_checkable
class PrecisionStrategy(Protocol):
    """What the trainer needs from a precision plugin."""

    name: str  # the plugin name used in the config (precision=<name>)
    trainer_precision: str  # Lightning's Trainer(precision=...) value

    def check(self, accelerator: str, trainer_precision: Optional[Union[str, int]]) -> None:
        """Raise :class:`PrecisionError` if this strategy cannot work; call before loading models."""
        ...


def resolve_accelerator(accelerator: str) -> str:
    """``"auto"`` → ``"cuda"`` when a CUDA device is available, else ``"cpu"``; ``"gpu"`` → ``"cuda"``."""
    value = str(accelerator).lower()
    if value == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if value == "gpu" else value


def _check_agreement(name: str, own: str, trainer_precision: Optional[Union[str, int]]) -> None:
    """A trainer.precision that is set must mean the same as the plugin's value."""
    if trainer_precision is None:
        return
    given = str(trainer_precision)
    if _LIGHTNING_ALIASES.get(given, given) != own:
        raise PrecisionError(
            f"trainer.precision={given} disagrees with precision={name} (Lightning precision {own}); "
            f"drop trainer.precision and choose the precision plugin instead ({_CHOICES})"
        )


class _Strategy:
    name = ""
    trainer_precision = ""

    def check(self, accelerator: str, trainer_precision: Optional[Union[str, int]]) -> None:
        _check_agreement(self.name, self.trainer_precision, trainer_precision)
        self._check_device(resolve_accelerator(accelerator))

    def _check_device(self, accelerator: str) -> None:
        """Refuse an accelerator this precision cannot run on (default: any is fine)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(trainer_precision={self.trainer_precision!r})"


class FullPrecision(_Strategy):
    """float32 weights and compute; works everywhere."""

    name = "fp32"
    trainer_precision = "32-true"

    def __init__(self, config: FP32Config) -> None:
        self.config = config


class BF16Mixed(_Strategy):
    """float32 weights, bfloat16 autocast (CPU, and CUDA devices with bfloat16 support)."""

    name = "bf16-mixed"
    trainer_precision = "bf16-mixed"

    def __init__(self, config: BF16MixedConfig) -> None:
        self.config = config

    def _check_device(self, accelerator: str) -> None:
        if accelerator == "cuda" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise PrecisionError(
                f"precision=bf16-mixed needs a CUDA GPU with bfloat16 support; "
                f"{torch.cuda.get_device_name()} has none: use precision=fp16-mixed or precision=fp32"
            )


class FP16Mixed(_Strategy):
    """float32 weights, float16 autocast with loss scaling; CUDA only."""

    name = "fp16-mixed"
    trainer_precision = "16-mixed"

    def __init__(self, config: FP16MixedConfig) -> None:
        self.config = config

    def _check_device(self, accelerator: str) -> None:
        if accelerator != "cuda":
            where = "CPU" if accelerator == "cpu" else f"accelerator={accelerator}"
            raise PrecisionError(
                f"precision=fp16-mixed needs a CUDA GPU; on {where} use precision=bf16-mixed or precision=fp32"
            )
