"""Specs of the built-in KL controllers (entry-point group ``rlhf_pl.kl_controllers``).

Light on purpose: config dataclasses and :class:`~rlhf_pl.registry.PluginSpec` objects only. The
controllers live in :mod:`rlhf_pl.plugins.kl_controllers` and are imported when one is selected
(``kl_controller=pi kl_controller.target=4``). The ranges are field metadata, checked when the
config is composed (:func:`rlhf_pl.config.validate_config`); each config also validates itself when
it is built (``OmegaConf.to_object`` calls ``__post_init__``). Errors name the offending key.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from rlhf_pl.config import setting
from rlhf_pl.registry import PluginSpec

_GROUP = "kl_controller"


def _require(ok: bool, key: str, value: object, rule: str) -> None:
    if not ok:
        raise ValueError(f"{_GROUP}.{key} must be {rule}, got {value!r}")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(key: str, value: float) -> None:
    _require(_finite(value) and value > 0, key, value, "a finite number > 0")


def _non_negative(key: str, value: float) -> None:
    _require(_finite(value) and value >= 0, key, value, "a finite number >= 0")


@dataclass
class FixedKLConfig:
    """A constant KL coefficient β (0.02–0.05 is the common range)."""

    beta: float = setting(0.05, ge=0)  # the KL coefficient, never changed

    def __post_init__(self) -> None:
        _non_negative("beta", self.beta)


@dataclass
class AdaptiveKLConfig:
    """Ziegler et al. (2019): e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n/horizon)."""

    init_beta: float = setting(0.15, gt=0)  # β before the first update
    target: float = setting(6.0, gt=0)  # KL (nats per response, sum of k1 over tokens) to hold
    horizon: float = setting(10000.0, gt=0)  # episodes over which a 100% error would move β by about 20%

    def __post_init__(self) -> None:
        _positive("init_beta", self.init_beta)
        _positive("target", self.target)
        _positive("horizon", self.horizon)


@dataclass
class PIKLConfig:
    """Proportional-integral controller of log β (see rlhf_pl.plugins.kl_controllers.PIKLController).

    e = clip(KL/target − 1, ±error_clip); f ← smoothing·f + (1 − smoothing)·e (f₀ = 0);
    I ← clamp(I + ki·e·n/horizon, log beta_min, log beta_max); β = clamp(exp(I + kp·f), beta_min, beta_max).
    With kp = 0, ki = 1 it is Ziegler's controller (to first order); the proportional term damps the
    overshoot and oscillation of pure integral action. Defaults tuned with tools/plot_kl_controllers.py.
    """

    init_beta: float = setting(0.15, gt=0)  # β before the first update (the integrator starts at log init_beta)
    target: float = setting(6.0, gt=0)  # KL (nats per response, sum of k1 over tokens) to hold
    horizon: float = setting(10000.0, gt=0)  # episodes; sets the integral rate exactly as in Ziegler's controller
    kp: float = setting(2.5, ge=0)  # proportional gain: log β moves by kp·e at once
    ki: float = setting(2.0, gt=0)  # integral gain, in units of Ziegler's rate (1 = same speed)
    error_clip: float = setting(0.2, gt=0)  # |e| is clipped to this (Ziegler: 0.2)
    smoothing: float = setting(0.5, ge=0, lt=1)  # EMA weight of the previous error in the proportional term (0: none)
    beta_min: float = setting(0.001, gt=0)  # β never goes below (the integrator is clamped too: anti-windup)
    beta_max: float = setting(10.0, gt=0)  # β never goes above

    def __post_init__(self) -> None:
        for key in ("init_beta", "target", "horizon", "ki", "error_clip", "beta_min", "beta_max"):
            _positive(key, getattr(self, key))
        _non_negative("kp", self.kp)
        _require(_finite(self.smoothing) and 0 <= self.smoothing < 1, "smoothing", self.smoothing, "in [0, 1)")
        _require(self.beta_min < self.beta_max, "beta_min", self.beta_min,
                 f"< kl_controller.beta_max ({self.beta_max})")
        _require(
            self.beta_min <= self.init_beta <= self.beta_max, "init_beta", self.init_beta,
            f"within [beta_min, beta_max] = [{self.beta_min}, {self.beta_max}]",
        )


FIXED = PluginSpec(
    "fixed", FixedKLConfig, "rlhf_pl.plugins.kl_controllers:fixed_from_config", "constant KL coefficient β"
)
ADAPTIVE = PluginSpec(
    "adaptive", AdaptiveKLConfig, "rlhf_pl.plugins.kl_controllers:adaptive_from_config",
    "Ziegler et al.'s proportional-error controller: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon)",
)
PI = PluginSpec(
    "pi", PIKLConfig, "rlhf_pl.plugins.kl_controllers:pi_from_config",
    "proportional-integral controller of log β with anti-windup: holds the KL target with less oscillation",
)
