"""Batches of prompts to sample from, and of tokenized demonstrations to train on.

- Prompts: chat-templated (:func:`tokenize_prompts`), left-padded for generation
  (:class:`PromptCollator`); :class:`RolloutBatchSampler` draws each rollout's prompts as a pure
  function of (seed, rollout number), so a resumed run sees the prompts an uninterrupted one would.
- Demonstrations: tokenized with assistant-only labels and the over-length rule
  (:func:`tokenize_split`, as the sft stage trains on them); :class:`DemonstrationBatches` serves
  batch s as a pure function of (seed, s), for PPO-ptx.

Shapes: ``b`` rows, ``p`` prompt columns, ``t`` demonstration columns.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import Sampler

from rlhf_pl.data.chat import LengthReport, TokenizedExample, apply_length_rule, tokenize_conversation, tokenize_prompt
from rlhf_pl.data.collate import SFTCollator, pad_left
from rlhf_pl.data.formats import Conversation, Prompt, load_conversations, load_prompts
from rlhf_pl.errors import ConfigError

# --- prompts --------------------------------------------------------------------------------------


class PromptItem(NamedTuple):
    """One prompt: its index in the data and its chat-templated token ids (ending with the generation prompt)."""

    index: int
    input_ids: list[int]


def load_rollout_prompts(source: str | None, *, split: str, limit: int | None) -> list[Prompt]:
    """The prompts PPO samples its episodes from (``data.prompts``)."""
    if not source:
        raise ConfigError("data.prompts is unset: PPO samples its episodes from prompts "
                          "(e.g. data.prompts=embedded:prompts)")
    return load_prompts(source, split=split, limit=limit)


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, max_prompt_length: int) -> list[PromptItem]:
    """Chat-template every prompt; keep its last ``max_prompt_length`` tokens (the end holds the
    generation prompt the answer follows)."""
    return [PromptItem(i, tokenize_prompt(tokenizer, p.messages)[-max_prompt_length:]) for i, p in enumerate(prompts)]


@dataclass(frozen=True)
class PromptCollator:
    """Left-pads prompts for generation: ``input_ids``, ``attention_mask`` (b, p) long; ``index`` (b,)."""

    pad_id: int

    def __call__(self, items: Sequence[PromptItem]) -> dict[str, Tensor]:
        ids, mask = pad_left([item.input_ids for item in items], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([item.index for item in items])}


class RolloutBatchSampler(Sampler[list[int]]):
    """The prompts of every rollout of the run; rollout u's batch is a pure function of (seed, u).

    Each pass over the data (data epoch e) shuffles the prompts with a generator seeded by
    ``seed + e`` and cuts them into global batches of ``batch_size × num_replicas`` (an incomplete
    last one is dropped); rank r takes the r-th slice. Iteration yields rollouts ``start`` …
    ``updates − 1``: a resumed run starts after the rollouts it has done.
    """

    def __init__(self, n_prompts: int, batch_size: int, seed: int, updates: int, start: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if n_prompts < batch_size * num_replicas:
            raise ConfigError(f"{n_prompts} prompts are fewer than ppo.batch_size={batch_size} × {num_replicas} "
                              "rank(s); lower ppo.batch_size or add prompts (data.prompts, data.limit)")
        self.n_prompts, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.updates, self.start, self.num_replicas, self.rank = updates, start, num_replicas, rank
        self.per_epoch = n_prompts // (batch_size * num_replicas)

    def batch(self, update: int) -> list[int]:
        """Prompt indices of rollout ``update`` on this rank. Shape: (batch_size,)."""
        epoch, position = divmod(update, self.per_epoch)
        order = torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(self.seed + epoch))
        first = (position * self.num_replicas + self.rank) * self.batch_size
        return order[first:first + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.updates - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return (self.batch(u) for u in range(self.start, self.updates))


# --- demonstrations -------------------------------------------------------------------------------


def tokenize_split(conversations: list[Conversation], tokenizer: Any, max_length: int,
                   rule: str) -> tuple[list[TokenizedExample], LengthReport]:
    """Tokenize with assistant masks, then apply the over-length rule (``data.overlong``).
    Returns (examples, report)."""
    examples = [tokenize_conversation(tokenizer, c.messages) for c in conversations]
    return apply_length_rule(examples, max_length, rule)


class DemonstrationBatches:
    """Demonstrations for the PPO-ptx term. Batch s (the s-th optimizer step of the run) is a pure
    function of (seed, s), so a resumed run needs no extra state. Batches are right-padded
    :class:`SFTCollator` dicts: ``input_ids``, ``attention_mask``, ``labels`` (b, t)."""

    def __init__(self, examples: Sequence[Any], pad_id: int, batch_size: int, seed: int) -> None:
        if len(examples) < batch_size:
            raise ConfigError(f"ppo.ptx_batch_size={batch_size} but data.demonstrations has only {len(examples)} "
                              "usable examples")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.collate = SFTCollator(pad_id)
        self.per_epoch = len(self.examples) // batch_size

    def __call__(self, step: int) -> dict[str, Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        generator = torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1))
        order = torch.randperm(len(self.examples), generator=generator)
        rows = order[position * self.batch_size:(position + 1) * self.batch_size].tolist()
        return self.collate([self.examples[i] for i in rows])


def load_demonstrations(source: str | None, tokenizer: Any, *, split: str, limit: int | None, max_length: int,
                        overlong: str, batch_size: int, seed: int) -> DemonstrationBatches:
    """Demonstrations from ``source`` (``data.demonstrations``), tokenized as the sft stage does, in
    batches of ``batch_size``."""
    if not source:
        raise ConfigError("ppo.ptx_coef > 0 needs SFT demonstrations: set data.demonstrations")
    conversations = load_conversations(source, split=split, limit=limit)
    examples, _ = tokenize_split(conversations, tokenizer, max_length, overlong)
    return DemonstrationBatches(examples, tokenizer.pad_token_id, batch_size, seed)
