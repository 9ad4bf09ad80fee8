"""K-wise ranking loss for reward models (pure tensor math, no model, no config).

A labelled ranking of K completions of one prompt is a sequence of *groups*, best first; the
completions inside one group are tied. ``((2,), (0, 3), (1,))`` says: completion 2 is best,
0 and 3 are tied second, 1 is last. Every pair of completions from different groups is one
comparison (winner, loser); tied completions form no pair. A strict ranking of K completions
gives K·(K−1)/2 pairs; pairwise data (chosen, rejected) is the K = 2 case with one pair.

Normalisation (InstructGPT, Ouyang et al. 2022, section 3.5): all pairs of one prompt form ONE
batch element. The loss of a prompt is the mean over its pairs of −log σ(r_w − r_l); the batch
loss is the mean over prompts. Each prompt therefore weighs 1 regardless of K, so a K = 9
ranking (36 correlated pairs) does not dominate a K = 2 one, and the pairs of one prompt are
never split across batches (the reason InstructGPT gives: shuffled pairs overfit in one epoch).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class Pairs(NamedTuple):
    """Winner/loser completion indices of every comparison. Shape: (n_pairs,) each, int64."""

    winners: Tensor
    losers: Tensor


class RankingLossOutput(NamedTuple):
    """Result of :func:`kwise_ranking_loss`.

    Attributes:
        loss: scalar, mean over prompts of the per-prompt mean of −log σ(r_w − r_l).
        accuracy: scalar, fraction of pairs (over the whole batch) with r_w > r_l strictly.
        margin: scalar, mean over pairs of r_w − r_l.
        per_prompt_loss: Shape: (n_prompts,); 0 for a prompt without pairs.
    """

    loss: Tensor
    accuracy: Tensor
    margin: Tensor
    per_prompt_loss: Tensor


def all_pairs(groups: Sequence[Sequence[int]]) -> Pairs:
    """Every (winner, loser) pair of a ranking given as groups of tied indices, best group first.

    Example: ``all_pairs(((2,), (0, 3), (1,)))`` gives winners ``[2, 2, 2, 0, 3]`` and losers
    ``[0, 3, 1, 1, 1]`` (0 and 3 are tied: no pair between them).

    Returns:
        :class:`Pairs` of int64 tensors. Shape: (n_pairs,) each.
    """
    flat = [i for group in groups for i in group]
    if len(set(flat)) != len(flat):
        raise ValueError(f"ranking groups {[list(g) for g in groups]} name a completion more than once")
    winners: list[int] = []
    losers: list[int] = []
    for g, better in enumerate(groups):
        worse = [i for group in groups[g + 1:] for i in group]
        for w in better:
            winners.extend([w] * len(worse))
            losers.extend(worse)
    return Pairs(torch.tensor(winners, dtype=torch.long), torch.tensor(losers, dtype=torch.long))


def kwise_ranking_loss(
    rewards: Tensor, pair_index: Tensor, pair_prompt: Tensor, n_prompts: int
) -> RankingLossOutput:
    """InstructGPT's K-wise ranking loss over a flattened batch of completions.

    Args:
        rewards: reward of every completion in the batch. Shape: (n_completions,).
        pair_index: (winner, loser) indices into ``rewards``. Shape: (n_pairs, 2), int64.
        pair_prompt: batch element (prompt) each pair belongs to, in [0, n_prompts). Shape: (n_pairs,).
        n_prompts: number of prompts in the batch.

    Prompts without any pair (every completion tied) contribute nothing and are left out of the
    mean over prompts. With K = 2 and one pair per prompt, the loss is the mean over the batch of
    −log σ(r_chosen − r_rejected). ``logsigmoid`` keeps large margins finite.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (n_completions,), got {tuple(rewards.shape)}")
    if pair_index.dim() != 2 or pair_index.shape[1] != 2:
        raise ValueError(f"pair_index must have shape (n_pairs, 2), got {tuple(pair_index.shape)}")
    if pair_index.shape[0] == 0:
        raise ValueError("the batch has no comparison pairs (every ranking is a single tie group)")
    margins = rewards[pair_index[:, 0]] - rewards[pair_index[:, 1]]  # (n_pairs,)
    pair_nll = -F.logsigmoid(margins)  # (n_pairs,)
    loss_sum = rewards.new_zeros(n_prompts).index_add(0, pair_prompt, pair_nll)  # (n_prompts,)
    n_pairs = rewards.new_zeros(n_prompts).index_add(0, pair_prompt, torch.ones_like(pair_nll))
    has_pairs = n_pairs > 0
    per_prompt = torch.where(has_pairs, loss_sum / n_pairs.clamp(min=1), torch.zeros_like(loss_sum))
    loss = per_prompt.sum() / has_pairs.sum()
    accuracy = (margins.detach() > 0).float().mean()
    return RankingLossOutput(loss, accuracy, margins.detach().mean(), per_prompt)


def group_positions(groups: Sequence[Sequence[int]], k: int) -> Tensor:
    """Rank position of each completion: the index of its group (0 = best, tied share one).

    Shape: (k,), int64. Used as the target of a rank correlation (negate it: higher = better).
    """
    positions = torch.full((k,), -1, dtype=torch.long)
    for g, group in enumerate(groups):
        for i in group:
            positions[i] = g
    if (positions < 0).any():
        missing = (positions < 0).nonzero().flatten().tolist()
        raise ValueError(f"ranking groups {[list(g) for g in groups]} do not rank completions {missing} of {k}")
    return positions
