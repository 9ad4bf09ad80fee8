"""PPO math for RLHF: per-token rewards, the missing-EOS penalty, GAE and the clipped losses.

Pure tensor functions (no modules, no config); the formulas of RLHF_REFERENCE.md items 4, 15,
18, 20 and 21. The masked statistics they use (and their conventions: ``b`` responses, ``n``
response tokens, masks, ``all_reduce``) are in :mod:`rlhf_pl.rl.masked`. Results with several parts
are NamedTuples; diagnostics in them are detached tensors.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from rlhf_pl.rl.masked import last_valid_index, masked_mean, valid_only

# --- rewards -------------------------------------------------------------------------------------


class RewardsOutput(NamedTuple):
    """Per-token rewards.

    Attributes:
        rewards: −β·kl_t on every valid token plus the score on the last valid token. Shape (b, n).
        non_score: the KL part alone, −β·kl_t (logged as "non-score reward"). Shape (b, n).
    """

    rewards: Tensor
    non_score: Tensor


def per_token_rewards(scores: Tensor, kl: Tensor, mask: Tensor, beta: float) -> RewardsOutput:
    """r_t = −β·kl_t for every valid token; the score is added at the last valid token (item 15).

    Args:
        scores: reward-model score of each response (already normalised / penalised / clipped).
        kl: per-token KL estimate (:func:`rlhf_pl.rl.kl.kl_estimate`).
        mask: valid response tokens (EOS included).
        beta: the KL coefficient of the controller.

    Shape:
        scores: (b,); kl, mask: (b, n); outputs (b, n), 0 after the last valid token.
    """
    non_score = -beta * valid_only(kl, mask)
    last = last_valid_index(mask)
    rows = torch.arange(kl.shape[0], device=kl.device)
    rewards = non_score.clone()
    rewards[rows, last] += scores.to(rewards.dtype)
    return RewardsOutput(rewards=rewards, non_score=non_score)


def missing_eos_penalty(
    scores: Tensor, ended: Tensor, penalty: float, mode: Literal["replace", "add"] = "replace"
) -> Tensor:
    """Penalise responses that hit the length limit without EOS (item 4).

    ``mode="replace"``: such a response's score becomes ``penalty`` (−1 in Ziegler et al.);
    ``mode="add"``: ``penalty`` is added to its score. Pass a negative number to penalise.

    Shape:
        scores: (b,); ended: (b,) bool, True where the response contains EOS; returns (b,).

    Raises:
        ValueError: for an unknown mode.
    """
    ended = ended.bool()
    if mode == "replace":
        return torch.where(ended, scores, torch.full_like(scores, penalty))
    if mode == "add":
        return torch.where(ended, scores, scores + penalty)
    raise ValueError(f"unknown missing-EOS penalty mode {mode!r}; choose one of: replace, add")


# --- GAE -----------------------------------------------------------------------------------------


class GAEOutput(NamedTuple):
    """Attributes: advantages A_t and returns R_t = A_t + V_t, both (b, n), 0 at masked positions."""

    advantages: Tensor
    returns: Tensor


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> GAEOutput:
    """Generalised advantage estimation over the response tokens (item 18).

    δ_t = r_t + γ·V_{t+1} − V_t and A_t = δ_t + γλ·A_{t+1}, where V_{t+1} and A_{t+1} count as 0
    when position t+1 is masked: the value after the last valid token is 0 and nothing computed
    at padded positions (rewards, values, advantages) reaches a valid one. A zero in the mask
    therefore ends the episode; masks are expected to be valid-prefix (right padding after EOS).

    Shape:
        rewards, values, mask: (b, n); outputs (b, n).
    """
    valid = mask.bool()
    zeros = torch.zeros_like(values)
    rewards, values = valid_only(rewards, mask), valid_only(values, mask)
    next_value = torch.zeros_like(values[:, 0])  # (b,) V_{t+1}
    next_advantage = torch.zeros_like(values[:, 0])  # (b,) A_{t+1}
    advantages = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = torch.where(valid[:, t], delta + gamma * lam * next_advantage, zeros[:, t])
        advantages.append(advantage)
        next_value, next_advantage = values[:, t], advantage  # both 0 where t is masked
    advantages_t = torch.stack(advantages[::-1], dim=1)
    returns = torch.where(valid, advantages_t + values, zeros)
    return GAEOutput(advantages=advantages_t, returns=returns)


# --- losses --------------------------------------------------------------------------------------


class PolicyLossOutput(NamedTuple):
    """Clipped policy loss and its diagnostics (scalars; only ``loss`` carries gradients).

    Attributes:
        loss: mean over valid tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)).
        clip_frac: fraction of valid tokens where the clipped term is the larger one (is used).
        approx_kl: ½·mean((log ρ)²) over valid tokens, log ρ = logp − logp_old.
        ratio_mean: mean of ρ over valid tokens.
    """

    loss: Tensor
    clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_eps: float = 0.2
) -> PolicyLossOutput:
    """PPO clipped surrogate (item 20), with the diagnostics of item 25.

    ``approx_kl`` is ½·(logp − logp_old)² averaged over valid tokens, the estimator of
    openai/lm-human-preferences (the k2 estimator of KL(π_old ‖ π)); it is exactly 0 when the
    ratio is 1, as in the first minibatch of the first PPO epoch (item 2's check).

    Shape:
        logprobs, old_logprobs, advantages, mask: (b, n); outputs are scalars.
    """
    log_ratio = valid_only(logprobs, mask) - valid_only(old_logprobs, mask)  # (b, n), 0 at masked positions
    advantages = valid_only(advantages, mask)
    ratio = torch.exp(log_ratio)  # (b, n), 1 at masked positions
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
        approx_kl = 0.5 * masked_mean(log_ratio.square(), mask)
        ratio_mean = masked_mean(ratio, mask)
    return PolicyLossOutput(loss=loss, clip_frac=clip_frac, approx_kl=approx_kl, ratio_mean=ratio_mean)


class ValueLossOutput(NamedTuple):
    """Attributes: loss ½·mean(max((V−R)², (V_clip−R)²)) and clip_frac (fraction of valid tokens
    where the clipped term is the larger one); scalars."""

    loss: Tensor
    clip_frac: Tensor


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float | None = 0.2
) -> ValueLossOutput:
    """Clipped value loss (item 21): ½·masked_mean(max((V − R)², (clip(V, V_old ± c) − R)²)).

    ``clip_range=None`` turns value clipping off: ½·masked_mean((V − R)²) and clip_frac 0.

    Shape:
        values, old_values, returns, mask: (b, n); outputs are scalars.
    """
    values, old_values, returns = (valid_only(t, mask) for t in (values, old_values, returns))
    unclipped = (values - returns).square()
    if clip_range is None:
        clipped = unclipped
    else:
        values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
        clipped = (values_clipped - returns).square()
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueLossOutput(loss=loss, clip_frac=clip_frac)


# --- minibatches ---------------------------------------------------------------------------------


def minibatch_rows(batch: int, num_minibatches: int, generator: torch.Generator | None) -> list[Tensor]:
    """Row indices of each minibatch: in order without a generator (first epoch: the rollout's
    forward chunks), else a random permutation. Shape: num_minibatches × (batch / num_minibatches,)."""
    order = torch.randperm(batch, generator=generator) if generator is not None else torch.arange(batch)
    return list(order.chunk(num_minibatches))
