"""Per-token KL estimators between the policy and the frozen reference (RLHF_REFERENCE.md item 15).

Both inputs are log-probabilities of the *sampled* tokens: ``logp = log π(y_t)`` under the policy
and ``logq = log π_ref(y_t)`` under the reference, computed from ``logits / T`` with the sampling
temperature T. Because y_t ~ π, each estimator below is an estimator of KL(π ‖ π_ref) per token
(Schulman, "Approximating KL divergence", 2020):

- ``k1 = logp − logq``: unbiased, high variance, can be negative on single tokens;
- ``k2 = ½(logp − logq)²``: biased, low variance, always ≥ 0;
- ``k3 = exp(logq − logp) − 1 − (logq − logp)``: unbiased, always ≥ 0.

The logged KL is :func:`sequence_kl` (sum of k1 over the response) averaged over the batch, whichever
estimator shaped the reward.
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from rlhf_pl.config import KL_ESTIMATORS  # the valid ppo.kl_estimator choices
from rlhf_pl.rl.masked import masked_mean, valid_only

KLEstimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: Tensor, logq: Tensor, estimator: KLEstimator) -> Tensor:
    """Per-token KL estimate from log-probabilities of the sampled tokens.

    Padding is not masked here: callers mask the result (see :func:`sequence_kl`,
    :func:`rlhf_pl.rl.ppo.per_token_rewards`).

    Args:
        logp: log π(y_t) under the policy.
        logq: log π_ref(y_t) under the reference model.
        estimator: ``"k1"``, ``"k2"`` or ``"k3"`` (formulas in the module docstring).

    Returns:
        The estimate per token.

    Shape:
        logp, logq: (b, n); returns (b, n).

    Raises:
        ValueError: for an unknown estimator name, listing the valid ones.
    """
    log_ratio = logp - logq  # log π/π_ref
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        reverse = -log_ratio  # logq − logp
        return torch.expm1(reverse) - reverse  # exp(r) − 1 − r, accurate for small r
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of: {', '.join(KL_ESTIMATORS)}")


def sequence_kl(logp: Tensor, logq: Tensor, mask: Tensor) -> Tensor:
    """KL of each response: the sum of k1 = logp − logq over its valid tokens.

    Values at padded positions (mask 0) are ignored even if they are inf/NaN.

    Shape:
        logp, logq, mask: (b, n); returns (b,).
    """
    return (valid_only(logp, mask) - valid_only(logq, mask)).sum(dim=-1)


def kl_loss(logp: Tensor, logq: Tensor, mask: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """The KL term used as a loss instead of inside the reward (item 15's option).

    Mean over valid tokens of the chosen estimator; gradients flow through ``logp``. k3 (default)
    or k2 are the usual choices here: the gradient of k1 is ∇log π(y_t), whose expectation
    under π is zero, so k1 as a loss carries no KL gradient signal in expectation.

    Shape:
        logp, logq, mask: (b, n); returns a scalar.
    """
    return masked_mean(kl_estimate(valid_only(logp, mask), valid_only(logq, mask), estimator), mask)
