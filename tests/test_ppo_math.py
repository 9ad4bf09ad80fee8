"""PPO math against hand-computed numbers (RLHF_REFERENCE.md items 4, 15, 18, 20, 21): per-token
rewards, the missing-EOS penalty, GAE, the clipped losses, minibatch rows; and the run's trend line."""
import math

import pytest
import torch

from rlhf_pl.rl.masked import last_valid_index
from rlhf_pl.rl.ppo import gae, minibatch_rows, missing_eos_penalty, per_token_rewards, policy_loss, value_loss

INF = float("inf")


# --- rewards -------------------------------------------------------------------------------------


def test_per_token_rewards_put_the_score_at_the_last_valid_token():
    scores = torch.tensor([1.0, 2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, INF], [0.5, 0.6, 0.7, 0.8]])  # garbage after EOS
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)  # right padding
    out = per_token_rewards(scores, kl, mask, beta=0.1)
    # non-score −0.1·kl on valid tokens: [−0.01, −0.02, −0.03, 0], [−0.05, −0.06, 0, 0]
    torch.testing.assert_close(out.non_score, torch.tensor([[-0.01, -0.02, -0.03, 0.0], [-0.05, -0.06, 0.0, 0.0]]))
    # score at index 2 (row 0) and 1 (row 1): −0.03 + 1 = 0.97, −0.06 + 2 = 1.94; 0 after EOS
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.01, -0.02, 0.97, 0.0], [-0.05, 1.94, 0.0, 0.0]]))


def test_rewards_after_eos_are_zero_when_pad_equals_eos():
    # token ids [5, 2(EOS), 2(pad = EOS), 2]: the mask, not the ids, says where the response ends
    mask = torch.tensor([[True, True, False, False]])
    out = per_token_rewards(torch.tensor([3.0]), torch.full((1, 4), 0.5), mask, beta=0.2)
    # [−0.1, −0.1 + 3, 0, 0]
    torch.testing.assert_close(out.rewards, torch.tensor([[-0.1, 2.9, 0.0, 0.0]]))
    torch.testing.assert_close(last_valid_index(mask), torch.tensor([1]))


def test_per_token_rewards_refuse_an_empty_response():
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid token"):
        per_token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), beta=0.1)


def test_missing_eos_penalty_replace_and_add():
    scores = torch.tensor([0.5, 2.0])
    ended = torch.tensor([True, False])
    torch.testing.assert_close(missing_eos_penalty(scores, ended, -1.0, "replace"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(missing_eos_penalty(scores, ended, -1.0, "add"), torch.tensor([0.5, 1.0]))  # 2 − 1
    with pytest.raises(ValueError, match="'drop'.*replace, add"):
        missing_eos_penalty(scores, ended, -1.0, "drop")


# --- GAE -----------------------------------------------------------------------------------------


def _gae_reference(rewards: list[float], values: list[float], gamma: float, lam: float) -> tuple[list, list]:
    """Textbook GAE over one unpadded episode, V after the last token = 0."""
    advantages, next_value, next_advantage = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_advantage = delta + gamma * lam * next_advantage
        advantages[t], next_value = next_advantage, values[t]
    return advantages, [a + v for a, v in zip(advantages, values)]


def test_gae_one_row_of_three_tokens_with_a_padded_fourth():
    rewards = torch.tensor([[0.1, -0.2, 1.0, 5.0]])  # position 3 is padding: 5.0 and 9.0 must not leak
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: δ = 1.0 + 0.9·0 − 0.3 = 0.7;                 A2 = 0.7
    # t=1: δ = −0.2 + 0.9·0.3 − 0.4 = −0.33;            A1 = −0.33 + 0.72·0.7 = 0.174
    # t=0: δ = 0.1 + 0.9·0.4 − 0.5 = −0.04;             A0 = −0.04 + 0.72·0.174 = 0.08528
    torch.testing.assert_close(out.advantages, torch.tensor([[0.08528, 0.174, 0.7, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.58528, 0.574, 1.0, 0.0]]))
    advantages, returns = _gae_reference([0.1, -0.2, 1.0], [0.5, 0.4, 0.3], gamma=0.9, lam=0.8)
    torch.testing.assert_close(out.advantages[0, :3], torch.tensor(advantages))
    torch.testing.assert_close(out.returns[0, :3], torch.tensor(returns))


def test_gae_rows_of_different_lengths_match_each_row_alone():
    rewards = torch.tensor([[0.0, 0.0, 1.0, -7.0], [-0.1, 2.0, -INF, 3.0]])
    values = torch.tensor([[0.2, 0.3, 0.4, 11.0], [0.6, 0.5, 8.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
    out = gae(rewards, values, mask)  # γ = 1, λ = 0.95 (item 18)
    a0, r0 = _gae_reference([0.0, 0.0, 1.0], [0.2, 0.3, 0.4], 1.0, 0.95)
    a1, r1 = _gae_reference([-0.1, 2.0], [0.6, 0.5], 1.0, 0.95)
    torch.testing.assert_close(out.advantages, torch.tensor([a0 + [0.0], a1 + [0.0, 0.0]]))
    torch.testing.assert_close(out.returns, torch.tensor([r0 + [0.0], r1 + [0.0, 0.0]]))


# --- policy loss ---------------------------------------------------------------------------------


def test_policy_loss_with_ratio_one():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -INF]], requires_grad=True)
    advantages = torch.tensor([[1.0, -2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = policy_loss(logprobs, logprobs.detach().clone(), advantages, mask, clip_eps=0.2)
    # ρ = 1 everywhere: loss = −mean(A) = −(1 − 2 + 3)/3
    torch.testing.assert_close(out.loss, torch.tensor(-2.0 / 3.0))
    assert out.clip_frac.item() == 0.0
    assert out.approx_kl.item() == 0.0
    assert out.ratio_mean.item() == 1.0
    out.loss.backward()
    # dρ/dlogp = ρ = 1: gradient −A/3 on valid tokens, 0 on padding
    torch.testing.assert_close(logprobs.grad, torch.tensor([[-1 / 3, 2 / 3, -1.0, 0.0]]))


def test_policy_loss_clipped_case():
    ratios = [1.5, 0.5, 0.9, 0.5]
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logprobs = (old + torch.log(torch.tensor([ratios + [100.0]]))).requires_grad_(True)  # padding: ρ = 100
    advantages = torch.tensor([[1.0, -1.0, 2.0, 1.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    out = policy_loss(logprobs, old, advantages, mask, clip_eps=0.2)
    # token 0: A=1,  ρ=1.5: max(−1.5, −1.2) = −1.2  (clipped term used)
    # token 1: A=−1, ρ=0.5: max(0.5, 0.8)   = 0.8   (clipped term used)
    # token 2: A=2,  ρ=0.9: max(−1.8, −1.8) = −1.8  (inside the clip range)
    # token 3: A=1,  ρ=0.5: max(−0.5, −0.8) = −0.5  (unclipped: the pessimistic bound)
    torch.testing.assert_close(out.loss, torch.tensor((-1.2 + 0.8 - 1.8 - 0.5) / 4))
    torch.testing.assert_close(out.clip_frac, torch.tensor(0.5))
    approx_kl = 0.5 * sum(math.log(r) ** 2 for r in ratios) / 4
    torch.testing.assert_close(out.approx_kl, torch.tensor(approx_kl))
    torch.testing.assert_close(out.ratio_mean, torch.tensor(sum(ratios) / 4))  # 0.85
    out.loss.backward()
    # clipped tokens get no gradient; others −A·ρ/4: token 2 −2·0.9/4 = −0.45, token 3 −1·0.5/4
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -0.45, -0.125, 0.0]]))


# --- value loss ----------------------------------------------------------------------------------

V = torch.tensor([[0.5, -0.1, 0.3, 40.0]])
V_OLD = torch.tensor([[0.0, 0.0, 0.0, -40.0]])
RETURNS = torch.tensor([[1.0, 0.5, -1.0, INF]])
V_MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])


def test_value_loss_clipped_case():
    values = V.clone().requires_grad_(True)
    out = value_loss(values, V_OLD, RETURNS, V_MASK, clip_range=0.2)
    # token 0: (0.5 − 1)² = 0.25; clip(0.5, ±0.2) = 0.2 → (0.2 − 1)² = 0.64 → 0.64 (clipped used)
    # token 1: V = −0.1 inside the range → both (−0.6)² = 0.36
    # token 2: (0.3 + 1)² = 1.69; clipped 0.2 → 1.2² = 1.44 → 1.69 (unclipped)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (0.64 + 0.36 + 1.69) / 3))
    torch.testing.assert_close(out.clip_frac, torch.tensor(1.0 / 3.0))
    out.loss.backward()
    # d/dV of ½·(V − R)²/3 = (V − R)/3 where the unclipped term wins; 0 where the clipped one does
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, -0.6 / 3, 1.3 / 3, 0.0]]))


def test_value_loss_without_clipping():
    out = value_loss(V, V_OLD, RETURNS, V_MASK, clip_range=None)
    torch.testing.assert_close(out.loss, torch.tensor(0.5 * (0.25 + 0.36 + 1.69) / 3))
    assert out.clip_frac.item() == 0.0


# --- minibatches ---------------------------------------------------------------------------------


def test_minibatches_first_epoch_in_rollout_order_later_shuffled():
    assert [r.tolist() for r in minibatch_rows(6, 3, None)] == [[0, 1], [2, 3], [4, 5]]
    shuffled = minibatch_rows(6, 2, torch.Generator().manual_seed(3))
    assert sorted(torch.cat(shuffled).tolist()) == list(range(6)) and torch.cat(shuffled).tolist() != list(range(6))
