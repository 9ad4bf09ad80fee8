"""Masked statistics (rlhf_pl.rl.masked) against hand-computed numbers: padding never leaks in, even
as inf/NaN; global statistics across ranks; last valid index; explained variance; global mean."""
import math
import threading

import pytest
import torch

from rlhf_pl.rl.masked import (
    explained_variance,
    global_mean,
    last_valid_index,
    masked_mean,
    masked_var,
    masked_whiten,
)

INF = float("inf")


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


def on_two_ranks(fn) -> list:
    """``fn(rank, all_reduce)`` on two threads standing in for two DDP ranks; the results by rank."""
    reduce, results = _ThreadAllReduce(2), [None, None]

    def run(rank: int) -> None:
        results[rank] = fn(rank, reduce.for_rank(rank))

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_masked_whiten_with_all_reduce_uses_global_statistics():
    # rank 0 holds row 0 (3 valid tokens), rank 1 row 1 (2 valid tokens): the global statistics are
    # those of 1, 2, 3, 4, 5 (mean 3, var 2), not the per-rank ones (rank 0 alone: mean 2).
    results = on_two_ranks(lambda rank, reduce: masked_whiten(WHITEN_X[rank:rank + 1], WHITEN_MASK[rank:rank + 1],
                                                              all_reduce=reduce))
    torch.testing.assert_close(torch.cat(results), WHITENED)


# --- diagnostics ---------------------------------------------------------------------------------


def test_explained_variance():
    returns = torch.tensor([[1.0, 2.0, 3.0, 10.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # residual R − V = [0, 0, 1]: var = mean of (−1/3)², (−1/3)², (2/3)² = 2/9; Var R = 2/3
    ev = explained_variance(torch.tensor([[1.0, 2.0, 2.0, -5.0]]), returns, mask)
    torch.testing.assert_close(ev, torch.tensor(1.0 - (2.0 / 9.0) / (2.0 / 3.0)))
    torch.testing.assert_close(explained_variance(returns, returns, mask), torch.tensor(1.0))
    assert explained_variance(returns, torch.full((1, 4), 2.0), mask).isnan()  # constant returns


# --- positions and per-response means --------------------------------------------------------------


def test_last_valid_index_right_left_and_inner_gaps():
    mask = torch.tensor([
        [1, 1, 1, 0, 0],  # right-padded: last real token at 2
        [0, 0, 1, 1, 1],  # left-padded: 4
        [1, 1, 1, 1, 1],  # unpadded: 4
        [1, 0, 0, 0, 0],  # one token: 0
    ])
    assert last_valid_index(mask).tolist() == [2, 4, 4, 0]


def test_last_valid_index_refuses_empty_rows_and_other_shapes():
    with pytest.raises(ValueError, match=r"rows \[1\] have no valid token"):
        last_valid_index(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match=r"mask must have shape \(b, n\), got \(3,\)"):
        last_valid_index(torch.tensor([1, 1, 0]))


def test_global_mean_over_ranks_weights_every_response_once():
    # rank 0 holds 3 responses, rank 1 one: the global mean is (1 + 2 + 3 + 10) / 4, not the mean of 2 and 10
    parts = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0])]
    results = on_two_ranks(lambda rank, reduce: global_mean(parts[rank], reduce))
    assert [float(r) for r in results] == [4.0, 4.0]
    assert float(global_mean(torch.tensor([1, 0, 1, 1]))) == 0.75  # bool/int inputs as floats, one rank

