"""Sample completions of prompts from a causal LM and, optionally, score them: the one
generate-then-score path of the project (PPO rollouts and its reference baseline, RM
normalisation samples, SFT sample answers, comparison collection, the reward-spread tool).

Two levels:

- :func:`sample`: one batch of LEFT-padded prompt tensors → :class:`Completions` (tensors: the
  sequences, the response mask cut at EOS or a stop string, whether each ended; the scores when a
  scorer is given). The sampler plugin draws the tokens; the generation backend
  (:mod:`rlhf_pl.generation`, ``generation=hf|static``, built by :func:`build_backend`) runs the model.
- :func:`sample_texts`: ``n`` completions of each of a list of tokenized prompts (or a count per
  prompt), batched by prompt length, with progress → one list of :class:`Sample` (decoded text, tokens, ended,
  reward) per prompt. The ``n`` completions of a prompt share one prefill of it
  (``generate(..., num_samples=n)``).

Shapes: ``b`` sequences, ``p`` prompt columns (left-padded), ``n`` response columns.
"""
from __future__ import annotations

import itertools
import logging
import sys
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from rlhf_pl import registry
from rlhf_pl.data.collate import pad_left
from rlhf_pl.generation import GenerationBackend, HFGeneration
from rlhf_pl.plugins.specs import HFGenerationConfig
from rlhf_pl.rl.masked import AllReduce
from rlhf_pl.runtime import weights_cast_once

log = logging.getLogger(__name__)

#: ``scorer(sequences (b, t), attention_mask (b, t)) -> RewardOutput`` with (b,) fields, read at the
#: last attended token. :class:`rlhf_pl.models.reward.RewardModel` is one; tests inject rule-based ones.
#: A scorer with ``takes_prefix_length = True`` also gets ``prefix_length=p``: rows sharing the first p
#: columns (the K samples of a prompt) may run them once.
Scorer = Callable[[Tensor, Tensor], Any]

HF = HFGeneration(HFGenerationConfig())  # the backend when a caller passes none


def build_backend(cfg: Any) -> GenerationBackend:
    """The generation backend a composed config selects (``cfg.generation``: ``generation=hf|static``)."""
    return registry.build("generation", cfg.generation)


class Completions(NamedTuple):
    """One batch of sampled completions."""

    sequences: Tensor  # (b, p + n) long: prompt, then response (pad after the end)
    attention_mask: Tensor  # (b, p + n) long: prompt mask, then ``mask``
    prompt_length: int  # p
    mask: Tensor  # (b, n) long: 1 on response tokens up to and including EOS / the stop-string end
    ended: Tensor  # (b,) bool: the response reached EOS or a stop string
    scores: Any = None  # the scorer's RewardOutput ((b,) rewards, …) when a scorer was given

    @property
    def response(self) -> Tensor:
        """(b, n) long: the response columns."""
        return self.sequences[:, self.prompt_length:]

    def texts(self, tokenizer: Any) -> list[str]:
        """Each response's valid tokens decoded without special tokens, stripped of surrounding white space."""
        response = self.response
        return [tokenizer.decode(response[i, self.mask[i].bool()].tolist(), skip_special_tokens=True).strip()
                for i in range(response.shape[0])]


def cut_at_stop_strings(response: Tensor, mask: Tensor, tokenizer: Any,
                        stop_strings: Sequence[str]) -> tuple[Tensor, Tensor]:
    """End each response after the first token whose decoded prefix contains a stop string.

    Shapes: response, mask (b, n) -> mask (b, n) long (0 after the cut), stopped (b,) bool.
    """
    mask, stopped = mask.clone(), torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if not stop_strings:
        return mask, stopped
    for row in range(response.shape[0]):
        tokens = response[row, mask[row].bool()].tolist()
        for k in range(1, len(tokens) + 1):
            text = tokenizer.decode(tokens[:k], skip_special_tokens=False)
            if any(stop in text for stop in stop_strings):
                mask[row, k:] = 0
                stopped[row] = True
                break
    return mask, stopped


@torch.no_grad()
def sample(model: Any, prompt_ids: Tensor, prompt_mask: Tensor, sampler: Any, max_new_tokens: int, tokenizer: Any, *,
           stop_strings: Sequence[str] = (), generator: Optional[torch.Generator] = None,
           scorer: Optional[Scorer] = None, num_samples: int = 1,
           backend: Optional[GenerationBackend] = None, sync_ranks: Optional[AllReduce] = None) -> Completions:
    """Sample ``num_samples`` (K) completions per prompt row, cut each at EOS or the first stop
    string, and score them with ``scorer`` if given. The K completions of a prompt share its prefill
    (:func:`rlhf_pl.models.generate.generate`); row ``i·K + j`` is sample ``j`` of prompt ``i``.
    ``backend``: the generation backend (None: ``generation=hf``); ``sync_ranks``: for a model
    sharded over processes, the all-reduce that keeps their decode steps in lockstep (``generate``).
    Under autocast each weight is cast once for the whole generation (the weights are fixed while
    sampling). Shapes: prompt_ids, prompt_mask (b, p) on the model's device -> :class:`Completions`
    with b·K rows (the prompt repeated; the scorer scores all b·K)."""
    with weights_cast_once(prompt_ids.device):
        gen = (backend or HF).generate(model, prompt_ids, prompt_mask, sampler, max_new_tokens,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                       generator=generator, num_samples=num_samples, sync_ranks=sync_ranks)
    mask, stopped = cut_at_stop_strings(gen.response, gen.response_mask, tokenizer, stop_strings)
    prompt_mask = prompt_mask.long().repeat_interleave(num_samples, dim=0)  # (b·K, p)
    completions = Completions(gen.sequences, torch.cat([prompt_mask, mask], dim=1), gen.prompt_length, mask,
                              gen.ended | stopped)
    return completions if scorer is None else score(completions, scorer)


@torch.no_grad()
def score(completions: Completions, scorer: Scorer) -> Completions:
    """``completions`` with the scorer's output over prompt + response (read at the last valid token)."""
    kwargs = {"prefix_length": completions.prompt_length} if getattr(scorer, "takes_prefix_length", False) else {}
    return completions._replace(scores=scorer(completions.sequences, completions.attention_mask, **kwargs))


class Sample(NamedTuple):
    """One sampled completion of prompt ``prompt_index``."""

    prompt_index: int
    text: str  # decoded without special tokens, stripped
    tokens: tuple[int, ...]  # the response's valid tokens (EOS included when it ended)
    ended: bool  # EOS or a stop string (False: cut at max_new_tokens)
    reward: Optional[float] = None  # the scorer's (normalised) reward, when a scorer was given


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def sample_texts(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], n: int | Sequence[int], sampler: Any,
                 max_new_tokens: int, *, batch_size: int = 16, stop_strings: Sequence[str] = (),
                 generator: Optional[torch.Generator] = None, scorer: Optional[Scorer] = None,
                 progress: Optional[str] = None, backend: Optional[GenerationBackend] = None) -> list[list[Sample]]:
    """``n`` completions of each tokenized prompt (chat-templated ids ending with the generation
    prompt), or ``n[i]`` of prompt i (0 allowed: collect's resampling asks each prompt for the
    completions it still lacks). About ``batch_size`` sequences at a time: a batch holds
    ``max(1, batch_size // n)`` distinct prompts of one count n, each prefilled once and then sampled
    n times (``sample(..., num_samples=n)``). Prompts are sorted by count, then length (stable), so
    that a batch pads little. ``progress``: a label to show a progress bar over the sequences (a log
    line per batch when stderr is not a terminal). ``backend``: the generation backend (None:
    ``generation=hf``). Returns one list of ``n[i]`` samples per prompt, in prompt order."""
    counts = [n] * len(prompts) if isinstance(n, int) else list(n)
    smallest = 1 if isinstance(n, int) else 0
    if len(counts) != len(prompts) or any(count < smallest for count in counts) or batch_size < 1:
        raise ValueError(f"n={n} must be >= 1 (or one count >= 0 per prompt, {len(prompts)} prompts) "
                         f"and batch_size={batch_size} >= 1")
    results: list[list[Sample]] = [[] for _ in prompts]
    device = model_device(model)
    with _Progress(progress, sum(counts)) as bar:
        for count, batch in _batches(prompts, counts, batch_size):
            ids, mask = pad_left([list(prompts[i]) for i in batch], tokenizer.pad_token_id)
            out = sample(model, ids.to(device), mask.to(device), sampler, max_new_tokens, tokenizer,
                         stop_strings=stop_strings, generator=generator, scorer=scorer, num_samples=count,
                         backend=backend)
            rows = len(batch) * count  # row r is sample r % count of prompt batch[r // count]
            rewards = out.scores.rewards.float().tolist() if out.scores is not None else [None] * rows
            for row, text in enumerate(out.texts(tokenizer)):
                index = batch[row // count]
                tokens = tuple(out.response[row, out.mask[row].bool()].tolist())
                results[index].append(Sample(index, text, tokens, bool(out.ended[row]), rewards[row]))
            bar.advance(rows)
    return results


def _batches(prompts: Sequence[Sequence[int]], counts: list[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """``(count, prompt indices)`` per batch: prompts of one count, sorted by (count, length),
    ``max(1, batch_size // count)`` to a batch; prompts of count 0 in none."""
    order = sorted((i for i in range(len(prompts)) if counts[i]), key=lambda i: (counts[i], len(prompts[i])))
    batches: list[tuple[int, list[int]]] = []
    for count, group in itertools.groupby(order, key=counts.__getitem__):
        indices = list(group)
        per_batch = max(1, batch_size // count)
        batches += [(count, indices[start:start + per_batch]) for start in range(0, len(indices), per_batch)]
    return batches


class _Progress:
    """A rich progress bar over ``total`` sequences on a terminal; a log line per batch elsewhere
    (where rich would draw nothing until the end); nothing without a label."""

    def __init__(self, label: Optional[str], total: int) -> None:
        self.label, self.total, self.done, self.started, self.bar = label, total, 0, time.perf_counter(), None

    def __enter__(self) -> _Progress:
        if self.label and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=self.total)
        return self

    def advance(self, count: int) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.advance(self.task, count)
        elif self.label:
            log.info("%s: %d/%d sequences, %.0f s", self.label, self.done, self.total,
                     time.perf_counter() - self.started)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
