"""K-wise ranking loss (rlhf_pl.rl.ranking): hand-computed values, K = 2 equivalence, stability."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_pl.rl.ranking import all_pairs, group_positions, kwise_ranking_loss

# Ranking ((2,), (0, 3), (1,)): completion 2 best, 0 and 3 tied, 1 worst.
GROUPS = ((2,), (0, 3), (1,))


def _softplus_neg(x: float) -> float:
    """−log σ(x), written out."""
    return math.log(1.0 + math.exp(-x))


def test_all_pairs_skips_ties_and_orders_best_first():
    winners, losers = all_pairs(GROUPS)
    assert winners.tolist() == [2, 2, 2, 0, 3]
    assert losers.tolist() == [0, 3, 1, 1, 1]  # no (0, 3) pair: they tie
    assert all_pairs(((0,), (1,))).winners.tolist() == [0]
    assert len(all_pairs(((0,), (1,), (2,), (3,))).winners) == 6  # strict K = 4: C(4, 2)


def test_all_pairs_refuses_a_repeated_index():
    with pytest.raises(ValueError, match="more than once"):
        all_pairs(((0,), (1, 0)))


def test_group_positions():
    assert group_positions(GROUPS, 4).tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError, match=r"do not rank completions \[3\]"):
        group_positions(((0,), (1, 2)), 4)


def test_k4_with_tie_matches_hand_computed_value():
    # rewards of completions 0..3; pairs (2,0) (2,3) (2,1) (0,1) (3,1) have margins 1, -1, 3, 2, 4
    rewards = torch.tensor([1.0, -1.0, 2.0, 3.0])
    winners, losers = all_pairs(GROUPS)
    out = kwise_ranking_loss(rewards, torch.stack([winners, losers], 1), torch.zeros(5, dtype=torch.long), 1)
    # (softplus(-1) + softplus(1) + softplus(-3) + softplus(-2) + softplus(-4)) / 5
    #   = (0.3132617 + 1.3132617 + 0.0485874 + 0.1269280 + 0.0181499) / 5 = 0.3640377
    expected = sum(_softplus_neg(m) for m in (1, -1, 3, 2, 4)) / 5
    assert expected == pytest.approx(0.3640377, abs=1e-7)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    assert out.accuracy.item() == pytest.approx(4 / 5)
    assert out.margin.item() == pytest.approx(9 / 5)


def test_each_prompt_weighs_one_regardless_of_k():
    # prompt 0: the K = 4 example above (5 pairs); prompt 1: K = 2 with margin 0 (loss log 2)
    rewards = torch.tensor([1.0, -1.0, 2.0, 3.0, 0.5, 0.5])
    winners, losers = all_pairs(GROUPS)
    pair_index = torch.cat([torch.stack([winners, losers], 1), torch.tensor([[4, 5]])])
    pair_prompt = torch.tensor([0, 0, 0, 0, 0, 1])
    out = kwise_ranking_loss(rewards, pair_index, pair_prompt, 2)
    assert out.loss.item() == pytest.approx((0.3640377331 + math.log(2)) / 2, abs=1e-6)  # 0.5285925
    assert out.per_prompt_loss.tolist() == pytest.approx([0.3640377331, math.log(2)], abs=1e-6)
    assert out.accuracy.item() == pytest.approx(4 / 6)  # a zero margin is not a correct pair
    assert out.margin.item() == pytest.approx(9 / 6)


def test_k2_equals_pairwise_formula():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(7), torch.randn(7)
    rewards = torch.stack([chosen, rejected], 1).flatten()  # (14,): prompt p owns rows 2p, 2p+1
    pair_index = torch.stack([torch.arange(0, 14, 2), torch.arange(1, 14, 2)], 1)
    out = kwise_ranking_loss(rewards, pair_index, torch.arange(7), 7)
    pairwise = -F.logsigmoid(chosen - rejected).mean()
    assert out.loss.item() == pytest.approx(pairwise.item(), abs=1e-6)
    assert out.accuracy.item() == pytest.approx((chosen > rejected).float().mean().item())


def test_large_margins_stay_finite_and_gradients_flow():
    rewards = torch.tensor([1000.0, -1000.0, -1000.0, 1000.0], requires_grad=True)
    out = kwise_ranking_loss(rewards, torch.tensor([[0, 1], [2, 3]]), torch.tensor([0, 1]), 2)
    assert out.per_prompt_loss.tolist() == pytest.approx([0.0, 2000.0])
    out.loss.backward()
    assert torch.isfinite(rewards.grad).all()
    assert rewards.grad.tolist() == pytest.approx([0.0, 0.0, -0.5, 0.5])  # d/dr_w = −σ(−m)/2 with m = −2000


def test_prompt_without_pairs_is_left_out_of_the_mean():
    rewards = torch.tensor([2.0, 0.0, 5.0])
    out = kwise_ranking_loss(rewards, torch.tensor([[0, 1]]), torch.tensor([0]), 2)
    assert out.loss.item() == pytest.approx(_softplus_neg(2.0), abs=1e-6)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="rewards must have shape"):
        kwise_ranking_loss(torch.zeros(2, 2), torch.tensor([[0, 1]]), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="pair_index must have shape"):
        kwise_ranking_loss(torch.zeros(2), torch.tensor([0, 1]), torch.tensor([0]), 1)
    with pytest.raises(ValueError, match="no comparison pairs"):
        kwise_ranking_loss(torch.zeros(2), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, dtype=torch.long), 1)
