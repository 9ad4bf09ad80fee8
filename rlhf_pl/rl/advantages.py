"""Per-token rewards and advantages of a rollout (RLHF_REFERENCE.md items 15, 17–19).

r_t = −β·kl_t plus the score at the last valid token → optional reward whitening → GAE →
optional advantage whitening over the valid tokens of all ranks. Pure tensor math; every setting
is a plain argument. ``b`` responses, ``n`` response tokens; 0 after each response.
"""
from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from rlhf_pl.rl.kl import kl_estimate
from rlhf_pl.rl.masked import AllReduce, masked_mean, masked_var, masked_whiten, valid_only
from rlhf_pl.rl.ppo import gae, per_token_rewards


class Advantages(NamedTuple):
    """Per-token rewards and GAE results, all (b, n), 0 after each response."""

    rewards: Tensor  # −β·kl_t (+ score at the last token), whitened if asked
    non_score: Tensor  # −β·kl_t
    advantages: Tensor  # whitened if asked
    returns: Tensor  # A_t + V_t (before advantage whitening)
    raw_mean: Tensor  # scalar: advantage mean before whitening
    raw_std: Tensor  # scalar: advantage std before whitening


def compute_advantages(logprobs: Tensor, ref_logprobs: Tensor, values: Tensor, scores: Tensor, mask: Tensor, *,
                       beta: float, kl_estimator: str = "k1", whiten_rewards: bool = False, gamma: float = 1.0,
                       lam: float = 0.95, whiten_advantages: bool = True,
                       all_reduce: AllReduce | None = None) -> Advantages:
    """Rewards −β·kl_t (``kl_estimator`` k1 | k2 | k3 of log π − log π_ref) with the score added at
    the last valid token; reward whitening rescales them to std 1 keeping the mean; GAE(γ, λ) with
    the rollout's values; advantage whitening gives mean 0, std 1. Statistics are over the valid
    tokens of all ranks (``all_reduce``). Pass ``beta=0`` when the KL is a loss term instead.

    Shape: logprobs, ref_logprobs, values, mask (b, n); scores (b,) -> :class:`Advantages`.
    """
    kl_tokens = valid_only(kl_estimate(logprobs, ref_logprobs, kl_estimator), mask)
    rewards, non_score = per_token_rewards(scores, kl_tokens, mask, beta)
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    raw_mean = masked_mean(advantages, mask, all_reduce=all_reduce)
    raw_std = masked_var(advantages, mask, unbiased=False, all_reduce=all_reduce).sqrt()
    if whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, all_reduce=all_reduce)
    return Advantages(rewards, non_score, advantages, returns, raw_mean, raw_std)
