"""Masked statistics: means, variances and whitening over the valid tokens of padded batches.

Pure tensor functions (no modules, no config). Conventions, shared by :mod:`rlhf_pl.rl.ppo`,
:mod:`rlhf_pl.rl.kl` and the reward heads:

- ``b`` is the batch (responses), ``n`` the number of response tokens (right-padded).
- ``mask`` is a bool or 0/1 float tensor of shape (b, n): nonzero on response tokens up to and
  including EOS, zero after it. Masked positions never influence a statistic: values there are
  *selected away* (``torch.where``), not multiplied by zero, so inf/NaN in padding (e.g. a
  ``-inf`` logprob) cannot leak in. Outputs are 0 at masked positions.
- ``all_reduce``: an optional callable that returns the element-wise **sum** of a tensor over all
  DDP ranks (:func:`all_reduce_sum`, or e.g. ``lambda t: fabric.all_reduce(t, reduce_op="sum")``).
  When given, statistics are global: each function reduces the sums and valid-token counts, never
  per-rank means, so ranks with different numbers of valid tokens are weighted correctly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

AllReduce = Callable[[Tensor], Tensor]


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum over DDP ranks (torch.distributed, when initialised); ``t`` itself otherwise.
    Shape: any -> the same."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    """Element-wise maximum over DDP ranks; ``t`` itself without a process group. Shape: any -> the same."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t


def token_share(mask: Tensor, world_size: int, all_reduce: AllReduce | None = None) -> Tensor:
    """W · (this rank's valid tokens) / (valid tokens of all W ranks): 1 in one process (exactly).

    A rank's token mean times its share, averaged over the ranks (DDP averages gradients), is the
    mean over every rank's tokens: what one process computes on all their rows together.
    Shape: mask (b, n) -> scalar float32.
    """
    mine = mask.float().sum()
    total = all_reduce(mine.clone()) if all_reduce is not None else mine
    return mine * world_size / total.clamp(min=1)


def valid_only(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` on valid entries, 0 elsewhere, selected (not multiplied) so inf/NaN padding is dropped.

    Applied to the *inputs* of a nonlinear computation, it also keeps gradients finite: autograd
    multiplies the zero gradient of a dropped entry by the local derivative, and 0·inf is NaN.

    Shape:
        x, mask: (b, n); returns (b, n).
    """
    return torch.where(mask.bool(), x, torch.zeros_like(x))


def _masked_sum_count(x: Tensor, mask: Tensor, dim: int | None, all_reduce: AllReduce | None):
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
    x: Tensor, mask: Tensor, dim: int | None = None, all_reduce: AllReduce | None = None
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


def _masked_moments(x: Tensor, mask: Tensor, unbiased: bool, all_reduce: AllReduce | None):
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
    x: Tensor, mask: Tensor, unbiased: bool = True, all_reduce: AllReduce | None = None
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
    all_reduce: AllReduce | None = None,
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


def last_valid_index(mask: Tensor) -> Tensor:
    """Position of the last valid entry of each row: the last position where the mask is nonzero,
    read from positions, never from token ids (right or left padding, pad == EOS).

    Shape:
        mask: (b, n); returns (b,) long.

    Raises:
        ValueError: if a row has no valid entry (a score or reward read there would have nowhere to go).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape (b, n), got {tuple(mask.shape)}")
    valid = mask.bool()
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=-1)
    if bool((last < 0).any()):
        rows = torch.nonzero(last < 0).flatten().tolist()
        raise ValueError(f"rows {rows} have no valid token (mask all zero)")
    return last


def global_mean(x: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """Mean of a per-response tensor over the responses of all ranks. Shape: (b,) -> scalar float32."""
    total = torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)])
    if all_reduce is not None:
        total = all_reduce(total)
    return total[0] / total[1]


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor, all_reduce: AllReduce | None = None) -> Tensor:
    """1 − Var[R − V] / Var[R] over valid tokens (1: perfect critic, ≤ 0: no better than a constant).

    Both variances are the biased ones over the same tokens (the N vs N−1 factor cancels). NaN
    when the returns have zero variance (explained variance is undefined there).

    Shape:
        values, returns, mask: (b, n); returns a scalar. ``all_reduce``: over the tokens of all ranks.
    """
    var_returns = masked_var(returns, mask, unbiased=False, all_reduce=all_reduce)
    var_residual = masked_var(returns - values, mask, unbiased=False, all_reduce=all_reduce)
    nan = torch.full_like(var_returns, float("nan"))
    return torch.where(var_returns > 0, 1.0 - var_residual / var_returns, nan).detach()
