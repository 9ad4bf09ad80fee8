"""Padding (and trimming it), the SFT collator and a length-grouped batch sampler.

Masks are always built from sequence lengths, never from ``token == pad_id``: the pad token may be
the EOS token (SmolLM2, the tiny tokenizer), and EOS inside a sequence is a real, trained token.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from rlhf_pl.data.chat import TokenizedExample

IGNORE_INDEX = -100  # label value ignored by torch.nn.functional.cross_entropy


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, *, left: bool) -> tuple[Tensor, Tensor]:
    if not seqs:
        raise ValueError("pad: expected at least one sequence, got an empty batch")
    t = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), t), dtype=torch.long)
    for row, seq in enumerate(seqs):
        start = t - len(seq) if left else 0
        ids[row, start : start + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, start : start + len(seq)] = 1
    return ids, mask


def pad_right(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad to the longest sequence. Returns ids (b, t) and attention mask (b, t), both long."""
    return _pad(seqs, pad_id, left=False)


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad (for generation) to the longest sequence. Returns ids (b, t) and mask (b, t), long."""
    return _pad(seqs, pad_id, left=True)


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all of ``seqs`` share, at most the shortest length − 1 (every row keeps a token)."""
    shortest = min(len(s) for s in seqs)
    n = 0
    while n < shortest - 1 and all(s[n] == seqs[0][n] for s in seqs):
        n += 1
    return n


def pad_shared_prefix(groups: Sequence[Sequence[Sequence[int]]], pad_id: int) -> tuple[Tensor, Tensor, int]:
    """Rows of groups (a prompt's K completions) laid out so that a group's rows share columns [0, P).

    Each group's rows split after their :func:`common_prefix_length`; the prefixes are left-padded to
    the longest one (P), the rest right-padded after column P. Returns ids (n, P + S) and mask
    (n, P + S), both long, rows in order, and P (:func:`rlhf_pl.models.forward.forward_columns`'s
    ``prefix_length``).
    """
    if not groups or not all(groups):
        raise ValueError("pad_shared_prefix: expected groups of at least one sequence each")
    splits = [common_prefix_length(g) for g in groups]
    head_ids, head_mask = pad_left([s[:c] for g, c in zip(groups, splits) for s in g], pad_id)
    tail_ids, tail_mask = pad_right([s[c:] for g, c in zip(groups, splits) for s in g], pad_id)
    return torch.cat([head_ids, tail_ids], dim=1), torch.cat([head_mask, tail_mask], dim=1), head_ids.shape[1]


def trim_left_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row (a subset of a left-padded batch).
    Shapes: ids, mask (b, p) -> (b, p') with p' <= p."""
    first = int(mask.any(0).long().argmax()) if bool(mask.any()) else 0
    return ids[:, first:], mask[:, first:]


@dataclass(frozen=True)
class SFTCollator:
    """Batches :class:`TokenizedExample` s for causal-LM training on the masked tokens.

    Returns ``input_ids`` (b, t), ``attention_mask`` (b, t) and ``labels`` (b, t): the input id where
    the loss mask is 1, ``-100`` elsewhere (prompt tokens and padding). Labels are not shifted: the
    model (Hugging Face convention) shifts them.
    """

    pad_id: int

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, Tensor]:
        for i, ex in enumerate(examples):
            if len(ex.input_ids) != len(ex.loss_mask):
                raise ValueError(f"SFTCollator: example {i} has {len(ex.input_ids)} input ids but "
                                 f"{len(ex.loss_mask)} loss-mask entries")
        input_ids, attention_mask = pad_right([ex.input_ids for ex in examples], self.pad_id)
        loss_mask, _ = pad_right([ex.loss_mask for ex in examples], 0)
        labels = torch.where(loss_mask.bool(), input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class _EpochOf:
    """``batch_sampler.sampler`` for Lightning: it starts every epoch with ``sampler.set_epoch(epoch)``
    on the loader's sampler and on its batch sampler's ``.sampler``, but not on the batch sampler."""

    def __init__(self, owner: LengthGroupedBatchSampler) -> None:
        self.owner = owner

    def set_epoch(self, epoch: int) -> None:
        self.owner.set_epoch(epoch)


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of indices with similar lengths, in a shuffled order.

    Each epoch: shuffle all indices (seeded by ``seed + epoch``), cut them into mega-batches of
    ``50 * batch_size``, sort each mega-batch by length (longest first), cut it into batches, then
    shuffle the order of the batches. With ``shuffle=False`` indices are taken in order and batches
    stay in order (still sorted inside each mega-batch). Every index appears exactly once per epoch
    (unless ``drop_last`` drops the one incomplete batch).

    With ``group=False`` the mega-batch sort is skipped (plain shuffled or in-order batches).

    For data-parallel training give ``num_replicas`` (W) and ``rank``: the batches above are cut
    with ``batch_size · W`` indices (global batches) and each rank takes every W-th index of each
    (``global[rank::W]``; a length-sorted global batch so gives every rank similar lengths). So W
    processes with ``batch_size`` b step through exactly the batches one process with b·W does, and
    every rank has the same number of batches. A last global batch with fewer than W indices is
    filled up with its own first indices (no rank gets an empty batch); ``drop_last`` drops an
    incomplete global batch instead. Lightning cannot inject its distributed sampler into a batch
    sampler, so the stages shard with these two arguments and build their trainers with
    ``use_distributed_sampler=False``.
    """

    MEGA_BATCH_FACTOR = 50

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True,
                 drop_last: bool = False, *,
                 group: bool = True, num_replicas: int = 1, rank: int = 0):
        if batch_size < 1:
            raise ValueError(f"LengthGroupedBatchSampler: batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"LengthGroupedBatchSampler: rank must be in [0, num_replicas={num_replicas}), got {rank}")
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self.num_replicas, self.rank, self.group = num_replicas, rank, group
        self.epoch = 0
        # Lightning calls batch_sampler.sampler.set_epoch(epoch), never batch_sampler.set_epoch
        self.sampler = _EpochOf(self)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order ``__iter__`` yields (each epoch a different shuffle)."""
        self.epoch = epoch

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        """Batches per epoch: the same on every rank (the number of global batches)."""
        n, size = len(self.lengths), self.global_batch_size
        return n // size if self.drop_last else math.ceil(n / size)

    def _global_batches(self) -> list[list[int]]:
        """Every global batch (``batch_size · num_replicas`` indices) of this epoch, in order."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        n, size = len(self.lengths), self.global_batch_size
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        mega = self.MEGA_BATCH_FACTOR * size
        batches: list[list[int]] = []
        for start in range(0, n, mega):
            chunk = order[start : start + mega]
            if self.group:
                chunk = sorted(chunk, key=lambda i: -self.lengths[i])
            batches += [chunk[j : j + size] for j in range(0, len(chunk), size)]
        if self.drop_last:
            batches = [b for b in batches if len(b) == size]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._global_batches():
            if len(batch) < self.num_replicas:  # fill up so that no rank gets an empty batch
                batch = batch + [batch[i % len(batch)] for i in range(self.num_replicas - len(batch))]
            yield batch[self.rank :: self.num_replicas]


def batched_loader(dataset: Sequence[Any], lengths: Sequence[int], collate_fn: Callable[[list[Any]], Any],
                   batch_size: int,
                   seed: int, *, shuffle: bool, group: bool = True, world_size: int = 1, rank: int = 0) -> DataLoader:
    """A DataLoader whose batches come from :class:`LengthGroupedBatchSampler`: grouped by
    ``lengths`` (one per item; padded cost) unless ``group=False``, this rank's share of them.
    The trainer that consumes it must have ``use_distributed_sampler=False``."""
    sampler = LengthGroupedBatchSampler(lengths, batch_size, seed, shuffle=shuffle, group=group,
                                        num_replicas=world_size, rank=rank)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn)

