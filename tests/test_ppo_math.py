"""PPO math against hand-computed numbers (RLHF_REFERENCE.md items 4, 15, 17–21, 25)."""
import math
import threading

import pytest
import torch

from rlhf_pl.rl.ppo import (
    explained_variance,
    gae,
    last_valid_index,
    masked_mean,
    masked_var,
    masked_whiten,
    missing_eos_penalty,
    per_token_rewards,
    policy_loss,
    value_loss,
)

INF = float("inf")


# --- masked statistics ---------------------------------------------------------------------------


def test_masked_mean_ignores_padding_even_if_inf_or_nan():
    x = torch.tensor([[1.0, 2.0, 3.0, INF], [4.0, float("nan"), 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.float32)
    # all: (1 + 2 + 3 + 4) / 4 = 2.5; per row: 6/3 = 2, 4/1 = 4
    torch.testing.assert_close(masked_mean(x, mask), torch.tensor(2.5))
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 4.0]))


def test_masked_mean_of_a_row_without_valid_entries_is_zero():
    x = torch.tensor([[1.0, 2.0], [5.0, 6.0]])
    mask = torch.tensor([[True, False], [False, False]])
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([1.0, 0.0]))


def test_masked_var_biased_and_unbiased():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # mean 2; squared deviations 1 + 0 + 1 = 2 → biased 2/3, unbiased 2/2 = 1
    torch.testing.assert_close(masked_var(x, mask, unbiased=False), torch.tensor(2.0 / 3.0))
    torch.testing.assert_close(masked_var(x, mask, unbiased=True), torch.tensor(1.0))


def test_unbiased_masked_var_needs_two_entries():
    with pytest.raises(ValueError, match="at least 2 valid entries, got 1"):
        masked_var(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 0.0]]), unbiased=True)


# valid entries 1, 2, 3 | 4, 5: mean 3, squared deviations 4 + 1 + 0 + 1 + 4 = 10 → biased var 2
WHITEN_X = torch.tensor([[1.0, 2.0, 3.0, 99.0], [4.0, 5.0, -INF, 7.0]])
WHITEN_MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.float32)
SQRT2 = math.sqrt(2.0 + 1e-8)
WHITENED = torch.tensor([[-2 / SQRT2, -1 / SQRT2, 0.0, 0.0], [1 / SQRT2, 2 / SQRT2, 0.0, 0.0]])


def test_masked_whiten_gives_mean_zero_std_one_over_valid_tokens():
    out = masked_whiten(WHITEN_X, WHITEN_MASK)
    torch.testing.assert_close(out, WHITENED)  # (x − 3)/√2, padding 0
    torch.testing.assert_close(masked_mean(out, WHITEN_MASK), torch.tensor(0.0))
    torch.testing.assert_close(masked_var(out, WHITEN_MASK, unbiased=False), torch.tensor(1.0))


def test_masked_whiten_unbiased_divides_by_n_minus_one():
    out = masked_whiten(WHITEN_X, WHITEN_MASK, unbiased=True)
    s = math.sqrt(10.0 / 4.0 + 1e-8)
    torch.testing.assert_close(out[0, :3], torch.tensor([-2 / s, -1 / s, 0.0]))


def test_masked_whiten_without_shift_keeps_the_mean():
    out = masked_whiten(WHITEN_X, WHITEN_MASK, shift_mean=False)
    # (x − 3)/√2 + 3 on valid tokens; padding stays 0
    torch.testing.assert_close(out, torch.where(WHITEN_MASK.bool(), WHITENED + 3.0, torch.zeros(2, 4)))
    torch.testing.assert_close(masked_mean(out, WHITEN_MASK), torch.tensor(3.0))


def test_masked_whiten_gradient_is_finite_with_inf_padding():
    x = WHITEN_X.clone().requires_grad_(True)
    (masked_whiten(x, WHITEN_MASK) * torch.arange(8.0).view(2, 4)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert x.grad[0, 3] == 0 and x.grad[1, 2] == 0 and x.grad[1, 3] == 0


class _ThreadAllReduce:
    """A sum all-reduce across threads, standing in for torch.distributed on 2 ranks."""

    def __init__(self, world_size: int):
        self.slots = [None] * world_size
        self.barrier = threading.Barrier(world_size)

    def for_rank(self, rank: int):
        def all_reduce(t: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = torch.stack(self.slots).sum(dim=0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return total

        return all_reduce


def test_masked_whiten_with_all_reduce_uses_global_statistics():
    # rank 0 holds row 0 (3 valid tokens), rank 1 row 1 (2 valid tokens): the global statistics are
    # those of 1, 2, 3, 4, 5 (mean 3, var 2), not the per-rank ones (rank 0 alone: mean 2).
    reduce = _ThreadAllReduce(2)
    results = [None, None]

    def run(rank: int):
        results[rank] = masked_whiten(WHITEN_X[rank : rank + 1], WHITEN_MASK[rank : rank + 1], all_reduce=reduce.for_rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    torch.testing.assert_close(torch.cat(results), WHITENED)


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
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid response token"):
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


# --- diagnostics ---------------------------------------------------------------------------------


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # residual R − V = [0, 0, 1]: var = mean of (−1/3)², (−1/3)², (2/3)² = 2/9; Var R = 2/3
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, -5.0]]), returns, mask)
    torch.testing.assert_close(ev, torch.tensor(1.0 - (2.0 / 9.0) / (2.0 / 3.0)))
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    assert explained_variance(returns, torch.full((1, 4), 2.0), mask).isnan()  # constant returns


# --- trend of a run's metric ------------------------------------------------------------------------


def test_linear_trend_against_hand_computed_least_squares():
    from rlhf_pl.stages.ppo import linear_trend

    # x = 0..3, x̄ = 1.5, ȳ = 2.5, Sxx = 5, Sxy = 4 -> slope 0.8, rise 0.8·3 = 2.4; fitted 1.3 2.1 2.9 3.7,
    # residuals −0.3 0.9 −0.9 0.3 -> SS 1.8, se = sqrt(1.8 / 2 / 5) = sqrt(0.18), t = 0.8 / 0.42426 = 1.8856
    trend = linear_trend([1.0, 3.0, 2.0, 4.0])
    assert trend.rise == pytest.approx(2.4)
    assert trend.t == pytest.approx(0.8 / math.sqrt(0.18))
    assert trend.start == pytest.approx(1.3) and trend.line(4) == pytest.approx([1.3, 2.1, 2.9, 3.7])
    assert linear_trend([4.0, 2.0, 3.0, 1.0]).t == pytest.approx(-0.8 / math.sqrt(0.18))  # mirrored: falls
    assert linear_trend([1.0, 2.0, 3.0]).t == math.inf  # exactly on a rising line: no noise at all
    two = linear_trend([0.5, 0.2])
    assert two.rise == pytest.approx(-0.3) and two.start == pytest.approx(0.5) and math.isnan(two.t)
    one = linear_trend([0.7])
    assert one.rise == 0.0 and one.start == 0.7 and math.isnan(one.t) and one.line(1) == [0.7]
