"""KL estimators against hand-computed numbers (RLHF_REFERENCE.md item 15)."""
import math

import pytest
import torch

from rlhf_pl.rl.kl import kl_estimate, kl_loss, sequence_kl

# One response of 3 tokens plus one padded position (whose logprob is -inf: must not leak).
LOGP = torch.tensor([[-1.0, -2.0, -0.5, float("-inf")]])
LOGQ = torch.tensor([[-1.5, -1.0, -0.5, -3.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
# d = logp − logq on the valid tokens = [0.5, −1.0, 0.0]


def test_k1_is_log_ratio():
    got = kl_estimate(LOGP[:, :3], LOGQ[:, :3], "k1")
    torch.testing.assert_close(got, torch.tensor([[0.5, -1.0, 0.0]]))


def test_k2_is_half_squared_log_ratio():
    got = kl_estimate(LOGP[:, :3], LOGQ[:, :3], "k2")
    # ½·0.5² = 0.125; ½·(−1)² = 0.5; ½·0² = 0
    torch.testing.assert_close(got, torch.tensor([[0.125, 0.5, 0.0]]))


def test_k3_is_exp_minus_one_minus_reverse_log_ratio():
    got = kl_estimate(LOGP[:, :3], LOGQ[:, :3], "k3")
    # r = logq − logp = [−0.5, 1.0, 0.0]; k3 = e^r − 1 − r
    expected = [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0, 0.0]  # [0.1065307, 0.7182818, 0]
    torch.testing.assert_close(got, torch.tensor([expected]))


def test_k3_is_accurate_for_tiny_differences():
    logp = torch.tensor([[0.0]], dtype=torch.float64)
    logq = torch.tensor([[1e-6]], dtype=torch.float64)
    # e^r − 1 − r = r²/2 + r³/6 + … = 5e-13 + 1.7e-19
    torch.testing.assert_close(kl_estimate(logp, logq, "k3"), torch.tensor([[5e-13 + 1e-18 / 6]], dtype=torch.float64))


def test_unknown_estimator_lists_the_valid_ones():
    with pytest.raises(ValueError, match="k4.*k1, k2, k3"):
        kl_estimate(LOGP, LOGQ, "k4")


def test_sequence_kl_sums_k1_over_valid_tokens_only():
    # 0.5 + (−1.0) + 0.0 = −0.5; the padded −inf − (−3) is ignored
    torch.testing.assert_close(sequence_kl(LOGP, LOGQ, MASK), torch.tensor([-0.5]))


def test_sequence_kl_per_row_with_bool_mask():
    logp = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -0.5, -9.0]])
    logq = torch.tensor([[-1.2, -1.5, -1.0], [-1.0, -1.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    # row 0: 0.2 + 0.5 + 0.0 = 0.7; row 1: −1.0 + 0.5 = −0.5
    torch.testing.assert_close(sequence_kl(logp, logq, mask), torch.tensor([0.7, -0.5]))


def test_kl_loss_is_masked_mean_of_estimator_with_gradient():
    logp = LOGP.clone().requires_grad_(True)
    loss = kl_loss(logp, LOGQ, MASK, "k3")
    # (0.1065307 + 0.7182818 + 0) / 3
    expected = (math.exp(-0.5) - 0.5 + math.exp(1.0) - 2.0) / 3
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    # d k3 / d logp = 1 − e^(logq − logp) per token, divided by 3 valid tokens; padding gets 0
    grad = [(1 - math.exp(-0.5)) / 3, (1 - math.exp(1.0)) / 3, 0.0, 0.0]
    torch.testing.assert_close(logp.grad, torch.tensor([grad]))
