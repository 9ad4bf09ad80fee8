"""Stage 2 — comparison collection: K alternative completions of a model-written turn, ranked.

``python -m rlhf_pl +stage=collect [collect.k=4] [collect.sources=[...]] [labeler=rule|human|<installed>]``

Reads top to bottom: the policy (``collect.policy_from``: the latest PPO output, else the latest
SFT output; ``base``: ``model.*`` itself; or a model directory) → the records of
``collect.sources``: a prompt as it is, a conversation cut before one of its assistant turns,
picked at random (seeded; InstructGPT ranks alternatives to a model-written message of a
conversation) → ``collect.k`` completions per prompt from the ``sampler`` plugin, the k samples of
a prompt sharing one prefill (:func:`rlhf_pl.sampling.sample_texts`) → empty and duplicate
completions resampled for up to ``collect.resample_rounds`` more rounds, all a prompt lacks from
one prefill of it; a prompt left with fewer than 2 distinct completions is reported and counted,
one with fewer than k keeps what it has → the ``labeler`` plugin ranks them
(:func:`rlhf_pl.plugins.labelers.rank_all`, which checks every ranking it gets back) → a ranking
in which everything ties compares nothing and is counted, not written → ``comparisons.jsonl``: one
K-wise record per prompt in the data format the reward model reads, with its provenance (source
record and turn, policy, round, labeler, seed), checked by the data validation first and then
written atomically (a failed run leaves none).
Settings: :class:`rlhf_pl.config.CollectConfig` (``collect.*``).
"""
from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from rlhf_pl import registry
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.formats import (
    Conversation,
    DataError,
    Prompt,
    as_dicts,
    check_rankings,
    load_prompts_or_conversations,
)
from rlhf_pl.distributed import gather_objects, launch_processes
from rlhf_pl.errors import ConfigError
from rlhf_pl.io import write_jsonl
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.outputs import InputSpec, model_config_at
from rlhf_pl.plugins.labelers import make_task, rank_all
from rlhf_pl.precision import build_for_stage, inference_autocast
from rlhf_pl.report import SampleLog
from rlhf_pl.sampling import Sample, build_backend, model_device, sample_texts
from rlhf_pl.stages import StageResult

log = logging.getLogger(__name__)

INPUTS = {
    "policy": InputSpec("collect.policy_from", stage="ppo", output="policy", marker="config.json",
                        fallback=(("sft", "model"),)),
}


# --- what to complete ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One prompt to collect comparisons for: the prompt, where it came from, and for a cut
    conversation the turn it was cut before and the original message of that turn."""

    prompt: Prompt
    source: str  # "file.jsonl:12"
    turn: int | None = None  # index of the picked assistant turn in the conversation's messages
    original: str | None = None  # that turn's message


def pick_turn(conversation: Conversation, rng: random.Random) -> Item:
    """Cut ``conversation`` before one of its assistant turns that follows a user turn, chosen with ``rng``."""
    messages = conversation.messages
    turns = [i for i in range(1, len(messages)) if messages[i].role == "assistant" and messages[i - 1].role == "user"]
    if not turns:
        raise DataError(f"{conversation.origin}: no assistant turn that answers a user turn to pick (roles "
                        f"{[m.role for m in messages]}); collect needs one to cut the conversation before it",
                        origin=conversation.origin)
    turn = rng.choice(turns)
    prompt = Prompt(messages[:turn], conversation.origin, dict(conversation.meta))
    return Item(prompt, conversation.origin, turn, messages[turn].content)


def load_items(sources: list[str], *, split: str, limit: int | None, seed: int,
               num_prompts: int | None = None) -> list[Item]:
    """Every record of every source as an :class:`Item`, or a sample of ``num_prompts`` of them (in
    source order); conversations cut at a turn picked with ``random.Random(seed)`` (the same sample
    and turns on every run with this seed)."""
    if not sources:
        raise DataError("collect.sources is empty: name at least one prompt or conversation source")
    rng = random.Random(seed)
    items = []
    for source in sources:
        for record in load_prompts_or_conversations(source, split=split, limit=limit):
            items.append(Item(record, record.origin) if isinstance(record, Prompt) else pick_turn(record, rng))
    if num_prompts is not None and num_prompts < len(items):
        keep = sorted(rng.sample(range(len(items)), num_prompts))
        items = [items[i] for i in keep]
    return items


# --- k distinct completions per prompt ------------------------------------------------------------


@dataclass
class Pool:
    """Distinct non-empty completions collected per prompt, and what was thrown away."""

    k: int
    kept: dict[int, list[Sample]] = field(default_factory=dict)
    empty: int = 0
    duplicates: int = 0

    def add(self, samples: list[Sample]) -> None:
        for s in samples:
            kept = self.kept.setdefault(s.prompt_index, [])
            if len(kept) >= self.k:
                continue
            if not s.text:
                self.empty += 1
            elif any(s.text == other.text for other in kept):
                self.duplicates += 1
            else:
                kept.append(s)

    def missing(self, n_prompts: int) -> list[int]:
        """Per prompt, how many distinct completions it still lacks (0 for a full one)."""
        return [self.k - len(self.kept.get(i, [])) for i in range(n_prompts)]


def sample_pool(model: Any, tokenizer: Any, items: list[Item], cfg: DictConfig, sampler: Any, seed: int,
                backend: Any = None) -> Pool:
    """k distinct non-empty completions per item where the policy gives them: the first round samples
    all k of a prompt from one prefill, later rounds replace empty and duplicate ones, again from one
    prefill per prompt for all it lacks; ``seed`` seeds the sampling generator; ``backend``: the
    generation backend (None: hf)."""
    c = cfg.collect
    originals = [item.original if c.include_original else None for item in items]
    pool = Pool(c.k)
    pool.add([Sample(i, text.strip(), (), True) for i, text in enumerate(originals) if text])
    prompt_ids = [tokenize_prompt(tokenizer, item.prompt.messages)[-cfg.data.max_prompt_length:] for item in items]
    generator = torch.Generator(device=model_device(model)).manual_seed(seed)
    first = sample_texts(model, tokenizer, prompt_ids, c.k - (1 if c.include_original else 0), sampler,
                         c.max_new_tokens, batch_size=c.batch_size, generator=generator, progress="sampling",
                         backend=backend)
    pool.add([s for per_prompt in first for s in per_prompt])
    for round_no in range(1, c.resample_rounds + 1):
        missing = pool.missing(len(items))
        if not any(missing):
            break
        again = sample_texts(model, tokenizer, prompt_ids, missing, sampler, c.max_new_tokens,
                             batch_size=c.batch_size, generator=generator, progress=f"resampling (round {round_no})",
                             backend=backend)
        pool.add([s for per_prompt in again for s in per_prompt])
    return pool


def merged(parts: list[tuple[list[int], Pool]], k: int) -> Pool:
    """One pool over all prompts from the ranks' pools, each over the prompts ``indices`` (local index i
    is prompt ``indices[i]``)."""
    pool = Pool(k)
    for indices, part in parts:
        for i, samples in part.kept.items():
            pool.kept[indices[i]] = [s._replace(prompt_index=indices[i]) for s in samples]
        pool.empty, pool.duplicates = pool.empty + part.empty, pool.duplicates + part.duplicates
    return pool


# --- records --------------------------------------------------------------------------------------

# A source record's keys that a K-wise record cannot carry: its own prompt and comparison (a
# comparison file read as a prompt source keeps only its prompt and other keys, e.g. task, answer).
NOT_COPIED = ("prompt", "completions", "ranking", "chosen", "rejected")


def ranking_json(ranking: tuple[tuple[int, ...], ...]) -> list[int | list[int]]:
    """``((2,), (0, 3), (1,))`` -> ``[2, [0, 3], 1]`` (the data format's best-first list)."""
    return [group[0] if len(group) == 1 else list(group) for group in ranking]


def make_record(item: Item, samples: list[Sample], ranking: Any, provenance: dict[str, Any],
                include_original: bool) -> dict[str, Any]:
    """One K-wise record: the prompt's messages, the completions, the ranking, the prompt's own keys
    (e.g. ``task``, ``answer``; not those in :data:`NOT_COPIED`), which completions ended, and where it
    all came from (``original``: the index of the conversation's own message among the completions, if
    it is one)."""
    texts = [s.text for s in samples]
    original = item.original.strip() if include_original and item.original else None
    return {
        **{k: v for k, v in item.prompt.meta.items() if k not in NOT_COPIED},
        "prompt": as_dicts(item.prompt.messages),
        "completions": texts,
        "ranking": ranking_json(ranking),
        "finished": [s.ended for s in samples],
        "provenance": {**provenance, "source": item.source, "turn": item.turn,
                       "original": texts.index(original) if original in texts else None},
    }


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: Path, inputs: Any) -> StageResult:
    c = cfg.collect
    precision = build_for_stage(cfg, "collect", frozen=("policy",))  # refuses impossible combinations first
    if cfg.labeler is None:
        names = ", ".join(p.name for p in registry.installed("labelers"))
        raise ConfigError(f"labeler is unset; collect ranks with one: labeler=<name> ({names})")
    labeler = registry.build("labelers", cfg.labeler)
    labeler_name = registry.spec_for_config("labelers", cfg.labeler).name
    items = load_items(list(c.sources), split=cfg.data.split, limit=cfg.data.limit, seed=cfg.seed,
                       num_prompts=c.num_prompts)
    base = c.policy_from == "base"
    policy = cfg.model.name_or_path if base else inputs["policy"]
    log.info("%d prompts from %s; policy %s; k=%d; labeler %s", len(items), ", ".join(c.sources), policy, c.k,
             labeler_name)

    # data parallel (trainer=ddp_cpu, ...): rank r samples prompts r, r + W, ...; rank 0 ranks and writes them all
    fabric = launch_processes(cfg.trainer)
    rank, world = (fabric.global_rank, fabric.world_size) if fabric is not None else (0, 1)
    mine = list(range(rank, len(items), world))
    model, tokenizer, _ = load_model_and_tokenizer(cfg.model if base else model_config_at(cfg.model, policy))
    if fabric is not None and fabric.device.type != "cpu":
        model = model.to(fabric.device)
    model = precision.prepare_frozen(model.eval())
    with inference_autocast(precision, model_device(model)):
        part = sample_pool(model, tokenizer, [items[i] for i in mine], cfg, registry.build("samplers", cfg.sampler),
                           seed=cfg.seed + rank, backend=build_backend(cfg))
    pool = merged(gather_objects((mine, part)), c.k)
    if rank != 0:
        return StageResult({}, {"rank": rank})

    counts: Counter[str] = Counter()
    labelled = []
    for i, item in enumerate(items):
        samples = pool.kept.get(i, [])
        if len(samples) < 2:
            counts["fewer_than_2_distinct"] += 1
            log.warning("%s: %d distinct non-empty completion(s) after %d resampling round(s); not ranked",
                        item.source, len(samples), c.resample_rounds)
            continue
        counts["fewer_than_k"] += len(samples) < c.k
        labelled.append((item, samples))
    rankings = rank_all(labeler, [make_task(item.prompt, [s.text for s in samples]) for item, samples in labelled])

    provenance = {"policy": str(policy), "round": c.round, "labeler": labeler_name, "seed": cfg.seed}
    records = []
    for (item, samples), ranking in zip(labelled, rankings):
        if len(ranking) < 2:
            counts["all_tie"] += 1
            continue
        records.append(make_record(item, samples, ranking, provenance, c.include_original))
    if not records:
        raise DataError(f"collect: no prompt of {len(items)} gave a ranking that compares anything "
                        f"({dict(counts)}); more prompts, a higher sampler temperature or collect.k help")
    check_rankings(records, str(run_dir / "comparisons.jsonl"))  # what the reward model will read, before writing
    out = write_jsonl(run_dir / "comparisons.jsonl", records)

    rows = [{"prompt": r["prompt"][-1]["content"], "completions": " / ".join(r["completions"]),
             "ranking": str(r["ranking"])} for r in records[:c.num_samples]]
    SampleLog(run_dir / "samples.md", "Collected rankings", "collect/samples").add(rows, f"round {c.round}", 0)
    metrics = {"prompts": len(items), "rankings": len(records),
               "completions": sum(len(r["completions"]) for r in records),
               "resampled_empty": pool.empty, "resampled_duplicate": pool.duplicates, "labeler": labeler_name,
               "fewer_than_2_distinct": counts["fewer_than_2_distinct"], "fewer_than_k": counts["fewer_than_k"],
               "all_tie": counts["all_tie"], "policy_from": str(policy), "round": c.round,
               "objective": -len(records)}
    log.info("collect: %d rankings of %d prompts (%s)", len(records), len(items),
             ", ".join(f"{k} {v}" for k, v in counts.items() if v) or "all prompts ranked")
    return StageResult({"comparisons": out}, metrics)
