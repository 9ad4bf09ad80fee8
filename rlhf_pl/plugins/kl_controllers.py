"""KL controllers: how the KL coefficient β changes from one PPO update to the next.

The PPO stage calls ``controller.update(kl, n)`` once per update with the rollout's KL (nats per
response: sum of k1 over the response tokens, averaged over the batch) and the number of episodes
n in that update (responses, over all ranks), then reads ``controller.value`` as the β of the next
rollout. ``state_dict()`` / ``load_state_dict()`` carry the controller through checkpoints.

Built-ins (specs and configs in :mod:`rlhf_pl.plugins.kl_controller_specs`):

- ``fixed``: β never changes.
- ``adaptive``: Ziegler et al. (2019), openai/lm-human-preferences ``AdaptiveKLController``.
- ``pi``: a proportional-integral controller of log β with anti-windup (:class:`PIKLController`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Protocol, runtime_checkable

from rlhf_pl.plugins.kl_controller_specs import AdaptiveKLConfig, FixedKLConfig, PIKLConfig


@runtime_checkable
class KLController(Protocol):
    """What the PPO stage needs from a KL controller.

    Attributes:
        value: the current β, used for the next rollout's per-token rewards r_t = −β·kl_t.
    """

    value: float

    def update(self, current_kl: float, n_steps: int) -> None:
        """Adapt β after an update whose rollout had mean KL ``current_kl`` over ``n_steps`` episodes."""

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain Python floats/strings)."""

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _check_update(current_kl: float, n_steps: int) -> None:
    if not math.isfinite(current_kl):
        raise ValueError(f"KL controller got a non-finite KL {current_kl!r}; the policy has diverged")
    if n_steps < 0:
        raise ValueError(f"KL controller got n_steps={n_steps!r}; it must be >= 0 (episodes in the update)")


def _read_state(state: Mapping[str, Any], kind: str, keys: tuple[str, ...]) -> list[float]:
    """Check a state dict's controller kind and keys; return the values of ``keys`` as floats."""
    found = state.get("controller")
    if found != kind:
        raise ValueError(f"KL controller state is for {found!r}, cannot load it into the {kind!r} controller")
    missing = [key for key in keys if key not in state]
    if missing:
        raise ValueError(f"{kind} KL controller state lacks {missing}; it has {sorted(state)}")
    return [float(state[key]) for key in keys]


def _relative_error(current_kl: float, target: float, error_clip: float) -> float:
    """e = clip(KL/target − 1, −error_clip, error_clip)."""
    return min(max(current_kl / target - 1.0, -error_clip), error_clip)


class FixedKLController:
    """β stays at its initial value."""

    def __init__(self, beta: float = FixedKLConfig.beta) -> None:
        FixedKLConfig(beta=beta)  # validates, naming the key
        self.value = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        _check_update(current_kl, n_steps)

    def state_dict(self) -> dict:
        return {"controller": "fixed", "beta": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        (self.value,) = _read_state(state, "fixed", ("beta",))


class AdaptiveKLController:
    """Ziegler et al.: e = clip(KL/target − 1, −0.2, 0.2); β ← β·(1 + e·n/horizon).

    In log β this is (to first order) pure integral action on the relative error: β keeps moving
    as long as the KL is off target, and only the ±0.2 clip limits its speed.
    """

    def __init__(
        self,
        init_beta: float = AdaptiveKLConfig.init_beta,
        target: float = AdaptiveKLConfig.target,
        horizon: float = AdaptiveKLConfig.horizon,
    ) -> None:
        AdaptiveKLConfig(init_beta=init_beta, target=target, horizon=horizon)  # validates
        self.value = float(init_beta)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        _check_update(current_kl, n_steps)
        error = _relative_error(current_kl, self.target, 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"controller": "adaptive", "beta": self.value}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        (self.value,) = _read_state(state, "adaptive", ("beta",))


class PIKLController:
    """Proportional-integral control of log β, with anti-windup and β clamped to [beta_min, beta_max].

    Per update, with e = clip(KL/target − 1, ±error_clip) and n episodes::

        f ← smoothing·f + (1 − smoothing)·e                           # smoothed error, f₀ = 0
        I ← clamp(I + ki·e·n/horizon, log beta_min, log beta_max)     # integral, I₀ = log β₀
        β  = clamp(exp(I + kp·f), beta_min, beta_max)

    Why: Ziegler's controller is pure integral action on log β (kp = 0, ki = 1 here, to first
    order). The policy's KL follows β only with a lag (and, while the reward pulls, it integrates
    the imbalance), so integral action alone lets the KL run past the target early in training
    and oscillate around it later. The proportional term acts on the error itself, damping both,
    which in turn allows a larger integral gain and a smaller steady-state error while the β
    needed drifts. ``smoothing`` low-passes the proportional path only, so that a noisy rollout
    KL jitters β less. Anti-windup: the integrator is clamped to the same bounds as β, so after
    a long saturation β leaves the bound as soon as the error changes sign.
    """

    def __init__(
        self,
        init_beta: float = PIKLConfig.init_beta,
        target: float = PIKLConfig.target,
        horizon: float = PIKLConfig.horizon,
        kp: float = PIKLConfig.kp,
        ki: float = PIKLConfig.ki,
        error_clip: float = PIKLConfig.error_clip,
        smoothing: float = PIKLConfig.smoothing,
        beta_min: float = PIKLConfig.beta_min,
        beta_max: float = PIKLConfig.beta_max,
    ) -> None:
        PIKLConfig(init_beta, target, horizon, kp, ki, error_clip, smoothing, beta_min, beta_max)  # validates
        self.target, self.horizon, self.error_clip = float(target), float(horizon), float(error_clip)
        self.kp, self.ki, self.smoothing = float(kp), float(ki), float(smoothing)
        self.log_min, self.log_max = math.log(beta_min), math.log(beta_max)
        self.integral = math.log(init_beta)
        self.smoothed_error = 0.0
        self.value = float(init_beta)

    def _clamp(self, log_beta: float) -> float:
        return min(max(log_beta, self.log_min), self.log_max)

    def update(self, current_kl: float, n_steps: int) -> None:
        _check_update(current_kl, n_steps)
        error = _relative_error(current_kl, self.target, self.error_clip)
        self.smoothed_error = self.smoothing * self.smoothed_error + (1.0 - self.smoothing) * error
        self.integral = self._clamp(self.integral + self.ki * error * n_steps / self.horizon)
        self.value = math.exp(self._clamp(self.integral + self.kp * self.smoothed_error))

    def state_dict(self) -> dict:
        return {"controller": "pi", "beta": self.value, "integral": self.integral,
                "smoothed_error": self.smoothed_error}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        keys = ("beta", "integral", "smoothed_error")
        self.value, self.integral, self.smoothed_error = _read_state(state, "pi", keys)


def fixed_from_config(cfg: FixedKLConfig) -> FixedKLController:
    """Factory of the ``fixed`` plugin."""
    return FixedKLController(beta=cfg.beta)


def adaptive_from_config(cfg: AdaptiveKLConfig) -> AdaptiveKLController:
    """Factory of the ``adaptive`` plugin."""
    return AdaptiveKLController(init_beta=cfg.init_beta, target=cfg.target, horizon=cfg.horizon)


def pi_from_config(cfg: PIKLConfig) -> PIKLController:
    """Factory of the ``pi`` plugin."""
    return PIKLController(
        init_beta=cfg.init_beta, target=cfg.target, horizon=cfg.horizon, kp=cfg.kp, ki=cfg.ki,
        error_clip=cfg.error_clip, smoothing=cfg.smoothing, beta_min=cfg.beta_min, beta_max=cfg.beta_max,
    )
