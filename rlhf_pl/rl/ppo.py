"""PPO math for RLHF: masked statistics, per-token rewards, GAE, clipped losses, diagnostics.

Pure tensor functions (no modules, no config); every item of RLHF_REFERENCE.md 15–21 and 25 that is
a formula lives here. Conventions:

- ``b`` is the batch (responses), ``n`` the number of response tokens (right-padded).
- ``mask`` is a bool or 0/1 float tensor of shape (b, n): nonzero on response tokens up to and
  including EOS, zero after it. Masked positions never influence a statistic, a reward or a loss:
  values there are *selected away* (``torch.where``), not multiplied by zero, so inf/NaN in padding
  (e.g. a ``-inf`` logprob) cannot leak in. Outputs are 0 at masked positions.
- Results with several parts are NamedTuples; diagnostics in them are detached tensors (no
  ``.item()``, so nothing forces a device sync, except the checks that raise on invalid input).
- ``all_reduce``: an optional callable that returns the element-wise **sum** of a tensor over all
  DDP ranks, e.g. ``lambda t: fabric.all_reduce(t, reduce_op="sum")`` or
  ``lambda t: (torch.distributed.all_reduce(t), t)[1]``. When given, statistics are global: each
  function reduces the sums and valid-token counts, never per-rank means, so ranks with different
  numbers of valid tokens are weighted correctly.
"""
from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]


# --- masked statistics ---------------------------------------------------------------------------


def valid_only(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` on valid entries, 0 elsewhere, selected (not multiplied) so inf/NaN padding is dropped.

    Applied to the *inputs* of a nonlinear computation, it also keeps gradients finite: autograd
    multiplies the zero gradient of a dropped entry by the local derivative, and 0·inf is NaN.

    Shape:
        x, mask: (b, n); returns (b, n).
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _masked_sum_count(x: Tensor, mask: Tensor, dim: Optional[int], all_reduce: Optional[AllReduce]):
    """Sum of valid entries and number of valid entries (reduced over ranks when asked).

    Shape:
        x, mask: (b, n) (any shape, equal); returns two tensors reduced over ``dim`` (all if None).
    """
    valid = mask.bool()
    values = valid_only(x, mask)
    counts = valid.to(x.dtype)
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    total, count = values.sum(dim=dims), counts.sum(dim=dims)
    if all_reduce is not None:
        reduced = all_reduce(torch.stack([total, count]))
        total, count = reduced[0], reduced[1]
    return total, count


def masked_mean(
    x: Tensor, mask: Tensor, dim: Optional[int] = None, all_reduce: Optional[AllReduce] = None
) -> Tensor:
    """Mean of ``x`` over valid entries; 0 where there is no valid entry.

    Args:
        x: values.
        mask: nonzero where valid.
        dim: reduce over this dimension only (e.g. ``dim=1`` for a per-response mean); all if None.
        all_reduce: sums over DDP ranks (module docstring); global mean = Σ sums / Σ counts.

    Shape:
        x, mask: (b, n); returns a scalar, or (b,) with ``dim=1``, or (n,) with ``dim=0``.
    """
    total, count = _masked_sum_count(x, mask, dim, all_reduce)
    return torch.where(count > 0, total / count.clamp_min(1.0), torch.zeros_like(total))


def _masked_moments(x: Tensor, mask: Tensor, unbiased: bool, all_reduce: Optional[AllReduce]):
    """Mean and variance over all valid entries, two-pass (mean, then squared deviations).

    With ``all_reduce`` each pass reduces [sum, count] once: two collective calls in all.

    Shape:
        x, mask: (b, n); returns two scalars.
    """
    x = valid_only(x, mask)
    mean = masked_mean(x, mask, all_reduce=all_reduce)
    sq_dev, count = _masked_sum_count((x - mean).square(), mask, None, all_reduce)
    if not unbiased:
        return mean, torch.where(count > 0, sq_dev / count.clamp_min(1.0), torch.zeros_like(sq_dev))
    if count.item() < 2:  # the one host sync in this module, and only on this path
        raise ValueError(f"unbiased masked_var needs at least 2 valid entries, got {int(count.item())}")
    return mean, sq_dev / (count - 1)


def masked_var(
    x: Tensor, mask: Tensor, unbiased: bool = True, all_reduce: Optional[AllReduce] = None
) -> Tensor:
    """Variance of ``x`` over all valid entries (0 if there is none).

    Args:
        unbiased: divide by N − 1 (Bessel) instead of N, N = number of valid entries.
        all_reduce: sums over DDP ranks; both passes are reduced, so the result is the variance of
            the valid entries of all ranks together.

    Shape:
        x, mask: (b, n); returns a scalar.

    Raises:
        ValueError: with ``unbiased=True`` and fewer than 2 valid entries.
    """
    return _masked_moments(x, mask, unbiased, all_reduce)[1]


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: Optional[AllReduce] = None,
    unbiased: bool = False,
    eps: float = 1e-8,
) -> Tensor:
    """Whiten over valid entries: (x − μ)/√(σ² + eps), mean and variance over all valid entries.

    Advantage whitening (item 19) uses ``shift_mean=True``: the valid entries get mean 0 and std 1.
    Reward whitening (item 17) uses ``shift_mean=False``: only the scale changes, μ is added back,
    giving (x − μ)/σ + μ. With ``all_reduce`` the statistics are those of every rank's valid
    entries (sums and counts reduced), as item 19 asks under DDP. The default variance is the
    biased one (divide by N), as in openai/lm-human-preferences' ``whiten``; ``unbiased=True``
    divides by N − 1 (TRL's choice). Masked positions are 0 in the result.

    Shape:
        x, mask: (b, n); returns (b, n).
    """
    x = valid_only(x, mask)
    mean, var = _masked_moments(x, mask, unbiased, all_reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return valid_only(whitened, mask)


# --- rewards -------------------------------------------------------------------------------------


class RewardsOutput(NamedTuple):
    """Per-token rewards.

    Attributes:
        rewards: −β·kl_t on every valid token plus the score on the last valid token. Shape (b, n).
        non_score: the KL part alone, −β·kl_t (logged as "non-score reward"). Shape (b, n).
    """

    rewards: Tensor
    non_score: Tensor


def last_valid_index(mask: Tensor) -> Tensor:
    """Position of the last valid token of each row, read from the mask (never from token ids).

    Shape:
        mask: (b, n); returns (b,) long.

    Raises:
        ValueError: if a row has no valid token (its score would have nowhere to go).
    """
    valid = mask.bool()
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no valid response token (mask all zero)")
    return last


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
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: Optional[float] = 0.2
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


# --- diagnostics ---------------------------------------------------------------------------------


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 − Var[R − V] / Var[R] over valid tokens (1: perfect critic, ≤ 0: no better than a constant).

    Both variances are the biased ones over the same tokens (the N vs N−1 factor cancels). NaN
    when the returns have zero variance (explained variance is undefined there).

    Shape:
        values, returns, mask: (b, n); returns a scalar.
    """
    var_returns = masked_var(returns, mask, unbiased=False)
    var_residual = masked_var(returns - values, mask, unbiased=False)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan).detach()
