"""What one PPO update produces: the rollout, each minibatch step's terms and diagnostics, and the
update's statistics (RLHF_REFERENCE.md item 25).

Shapes: ``b`` episodes, ``p`` prompt columns (left-padded), ``n`` response columns (right-padded).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from rlhf_pl.rl.advantages import Advantages
from rlhf_pl.rl.kl import KL_ESTIMATORS, kl_estimate, sequence_kl
from rlhf_pl.rl.masked import AllReduce, explained_variance, global_mean, masked_mean, valid_only
from rlhf_pl.rl.ppo import PolicyLossOutput, ValueLossOutput


class Rollout(NamedTuple):
    """One batch of episodes and everything measured on it without gradients."""

    sequences: Tensor  # (b, p + n) long: prompt, then response
    attention_mask: Tensor  # (b, p + n) long: prompt mask, then ``mask``
    prompt_length: int  # p
    mask: Tensor  # (b, n) long: 1 on response tokens up to and including EOS / the stop-string end
    ended: Tensor  # (b,) bool: the response reached EOS or a stop string
    logprobs: Tensor  # (b, n) log π_old(y_t) at temperature T
    ref_logprobs: Tensor  # (b, n) log π_ref(y_t) at temperature T
    values: Tensor  # (b, n) V_old
    entropy: Tensor  # (b, n) policy entropy at temperature T
    rm_scores: Tensor  # (b,) reward-model scores (normalised, before any penalty)
    scores: Tensor  # (b,) the scores entering the reward (after rlhf_pl.rl.scores.process_scores)
    uncertainty: Tensor | None  # (b,) reward-head uncertainty, if any
    prompt_index: Tensor  # (b,) prompts' indices in the data
    baselines: Tensor | None = None  # (b,) the reference's b(x) subtracted from the scores (score_baseline=reference)


class PolicyTerms(NamedTuple):
    """The policy side of a minibatch step."""

    loss: Tensor  # scalar backpropagated through the policy (includes c_v·vf with a shared critic)
    pg: PolicyLossOutput
    vf: ValueLossOutput | None  # the value loss when the value head sits on the policy trunk, else None
    kl_loss: Tensor  # detached KL loss term before β (0 unless the KL is a loss term)
    ptx_loss: Tensor  # detached ptx NLL before its coefficient (0 without PPO-ptx)
    max_abs_log_ratio: Tensor  # detached max over valid tokens of |logp − logp_old|


class MinibatchStats(NamedTuple):
    """Diagnostics of one minibatch step (detached scalars)."""

    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    policy_clip_frac: Tensor
    value_clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    max_abs_log_ratio: Tensor  # max over valid tokens of |logp − logp_old|: exactly 0 ⇔ ratio exactly 1
    kl_loss: Tensor  # the KL loss term before β
    ptx_loss: Tensor  # the ptx NLL before its coefficient


def mean_stats(steps: Sequence[MinibatchStats]) -> MinibatchStats:
    """Element-wise mean over the minibatch steps of an update (max for ``max_abs_log_ratio``)."""
    stacked = {name: torch.stack([getattr(s, name) for s in steps]) for name in MinibatchStats._fields}
    return MinibatchStats(**{name: v.max() if name == "max_abs_log_ratio" else v.mean() for name, v in stacked.items()})


# token means over a minibatch: scaled by the rank's token share (rlhf_pl.rl.masked.token_share) before reducing
SHARE_SCALED = ("loss", "policy_loss", "value_loss", "policy_clip_frac", "value_clip_frac", "approx_kl", "ratio_mean",
                "kl_loss")


def scale_by_share(stats: MinibatchStats, share: Tensor) -> MinibatchStats:
    """The token-mean fields of one rank's step times its token share (:func:`rlhf_pl.rl.masked.token_share`):
    their sum over the ranks is then the mean over every rank's tokens. Shapes: scalars."""
    return stats._replace(**{name: getattr(stats, name) * share for name in SHARE_SCALED})


def across_ranks(stats: MinibatchStats, world_size: int, all_reduce: AllReduce, all_reduce_max: AllReduce
                 ) -> MinibatchStats:
    """One step's stats over all ranks: the token-mean fields (scaled by :func:`scale_by_share`) summed,
    ``ptx_loss`` averaged over the ranks' demonstration batches, ``max_abs_log_ratio`` the maximum."""
    summed = all_reduce(torch.stack([getattr(stats, name).float() for name in SHARE_SCALED + ("ptx_loss",)]))
    fields = dict(zip(SHARE_SCALED, summed[:-1]))
    return MinibatchStats(**fields, ptx_loss=summed[-1] / world_size,
                          max_abs_log_ratio=all_reduce_max(stats.max_abs_log_ratio.float().clone()))


@dataclass(frozen=True)
class PPOStats:
    """What one update logs, plots and checkpoints; plain floats (nan: not measured in this run)."""

    update: float  # 1-based update (rollout) number
    score: float  # mean reward-model score (normalised, before penalties)
    score_final: float  # mean score entering the reward (after uncertainty, baseline, normalisation, EOS penalty, clip)
    score_vs_reference: float  # mean of score − b(x): gain over the reference's greedy answer to the same prompt
    reference_score: float  # mean b(x) of the batch's prompts
    kl: float  # mean over responses of Σ_t k1 (nats): the KL the controller sees
    kl_k2: float  # the same with k2
    kl_k3: float  # the same with k3
    beta: float  # β used for this rollout's rewards (or KL loss)
    non_score_reward: float  # mean over responses of Σ_t −β·kl_t
    entropy: float  # mean token entropy at temperature T (rollout)
    approx_kl: float  # ½·mean((log ρ)²), averaged over all minibatches of the update
    approx_kl_first: float  # the same in the first minibatch of the first epoch: exactly 0
    max_abs_log_ratio_first: float  # max |log ρ| there: exactly 0 (ratio exactly 1)
    policy_clip_frac: float
    value_clip_frac: float
    explained_variance: float  # of the rollout's values against the returns
    response_length: float  # mean valid response tokens
    eos_rate: float  # fraction of responses that ended (EOS or stop string)
    advantage_mean: float  # before whitening
    advantage_std: float  # before whitening
    return_mean: float
    value_mean: float
    policy_loss: float
    value_loss: float
    loss: float
    kl_loss: float
    ptx_loss: float
    uncertainty: float  # mean reward-head uncertainty
    lr_policy: float
    lr_critic: float
    rollout_seconds: float
    train_seconds: float


def ppo_stats(r: Rollout, adv: Advantages, steps: Sequence[MinibatchStats], *, update: int, beta: float,
              lrs: Sequence[float], rollout_seconds: float, train_seconds: float,
              all_reduce: AllReduce | None = None) -> PPOStats:
    """The statistics of update ``update`` (1-based) as floats; means are over the episodes / valid
    tokens of all ranks (the minibatch losses too, once reduced by :func:`across_ranks`). ``lrs``:
    the policy's and the critic's learning rates (only the policy's without a critic)."""
    mask = r.mask
    per_estimator = {e: valid_only(kl_estimate(r.logprobs, r.ref_logprobs, e), mask).sum(1) for e in KL_ESTIMATORS}
    mean = lambda x: float(global_mean(x, all_reduce))  # noqa: E731
    token_mean = lambda x: float(masked_mean(x, mask, all_reduce=all_reduce))  # noqa: E731
    avg, first = mean_stats(steps), steps[0]
    return PPOStats(
        update=float(update), score=mean(r.rm_scores), score_final=mean(r.scores),
        score_vs_reference=mean(r.rm_scores - r.baselines) if r.baselines is not None else math.nan,
        reference_score=mean(r.baselines) if r.baselines is not None else math.nan,
        kl=mean(sequence_kl(r.logprobs, r.ref_logprobs, mask)), kl_k2=mean(per_estimator["k2"]),
        kl_k3=mean(per_estimator["k3"]),
        beta=beta, non_score_reward=mean(adv.non_score.sum(1)), entropy=token_mean(r.entropy),
        approx_kl=float(avg.approx_kl), approx_kl_first=float(first.approx_kl),
        max_abs_log_ratio_first=float(first.max_abs_log_ratio),
        policy_clip_frac=float(avg.policy_clip_frac), value_clip_frac=float(avg.value_clip_frac),
        explained_variance=float(explained_variance(r.values, adv.returns, mask, all_reduce)),
        response_length=mean(mask.sum(1).float()),
        eos_rate=mean(r.ended.float()), advantage_mean=float(adv.raw_mean), advantage_std=float(adv.raw_std),
        return_mean=token_mean(adv.returns), value_mean=token_mean(r.values),
        policy_loss=float(avg.policy_loss), value_loss=float(avg.value_loss), loss=float(avg.loss),
        kl_loss=float(avg.kl_loss), ptx_loss=float(avg.ptx_loss),
        uncertainty=mean(r.uncertainty.float()) if r.uncertainty is not None else math.nan,
        lr_policy=lrs[0], lr_critic=lrs[1] if len(lrs) > 1 else math.nan, rollout_seconds=rollout_seconds,
        train_seconds=train_seconds,
    )
