"""Benchmark dropping ended rows from the KV cache (``generation.compact``): seconds to sample answers
that end at EOS, as eval and collect sample them, with and without it.

A batch decodes until its longest answer. Without compaction every step runs on all its rows, the
ended ones included; with it (the default), once at most half of the rows the cache holds are still
unended, the ended ones are dropped and later steps run on the rest. The sampler still draws for
every row, so both ways draw the same random numbers from the same seed; the logits of a step over fewer
rows may round differently in bfloat16 (another matrix shape), so an answer can differ where a draw
falls near a token's boundary. The tool counts the answers that differ.

Setting: a policy directory (``--policy``: an SFT ``model/`` or a PPO ``policy/``; its answers' lengths
are what matter, so use the loop's own), the first ``--num-prompts`` prompts of ``--prompts``
chat-templated, ``--k`` samples each at ``--temperature`` with EOS allowed, ``--batch-size`` sequences
per batch, under bfloat16 autocast with the linear weights stored in bfloat16, as eval holds its frozen
models. The two ways alternate in one process (ABBA: compact first in even rounds), ``--warmup`` rounds
not measured, then ``--repeats`` measured rounds; reported: each run's seconds, the median of each way
and their ratio, and the new tokens (the same both ways). ``--json FILE`` writes it all.

Usage::

    python tools/bench_compaction.py --policy outputs/runs/<iterate run>/round_0/sft/model   # eval's best-of-16
    python tools/bench_compaction.py --policy <dir> --prompts embedded:prompts --k 8 --batch-size 64   # collect
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

WAYS = ("compact", "all_rows")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", type=Path, required=True, help="policy directory (an SFT model/ or PPO policy/)")
    parser.add_argument("--prompts", default="embedded:eval_prompts", help="prompt source")
    parser.add_argument("--num-prompts", type=int, default=32, help="use the first N prompts")
    parser.add_argument("--k", type=int, default=16, help="samples per prompt (eval's best-of-n: 16)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per answer at most")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (each runs both ways once)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not measured")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (the same in every run)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for key, low in (("num_prompts", 1), ("k", 1), ("max_new_tokens", 1), ("batch_size", 1), ("repeats", 1),
                     ("warmup", 0)):
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if not args.policy.is_dir():
        parser.error(f"--policy {args.policy} is not a directory")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def run_once(compact: bool, model: Any, tokenizer: Any, prompt_ids: list[list[int]], sampler: Any,
             args: argparse.Namespace) -> tuple[dict, list[list[str]]]:
    """K answers to every prompt with or without compaction: its seconds and new tokens, and the texts."""
    from rlhf_pl.generation import HFGeneration
    from rlhf_pl.plugins.specs import HFGenerationConfig
    from rlhf_pl.sampling import sample_texts

    backend = HFGeneration(HFGenerationConfig(compact=compact))
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        started = time.perf_counter()
        samples = sample_texts(model, tokenizer, prompt_ids, args.k, sampler, args.max_new_tokens,
                               batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed),
                               backend=backend)
        seconds = time.perf_counter() - started
    tokens = sum(len(s.tokens) for per_prompt in samples for s in per_prompt)
    return {"seconds": seconds, "new_tokens": tokens}, [[s.text for s in per_prompt] for per_prompt in samples]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from omegaconf import OmegaConf

    from rlhf_pl import registry
    from rlhf_pl.config import ModelConfig
    from rlhf_pl.data.chat import tokenize_prompt
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.io import write_json
    from rlhf_pl.models.adapters import store_linears_in_
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.outputs import model_config_at

    model, tokenizer, _ = load_model_and_tokenizer(
        model_config_at(OmegaConf.structured(ModelConfig(name=args.policy.name)), args.policy))
    model.eval().requires_grad_(False)
    store_linears_in_(model, torch.bfloat16)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    prompt_ids = [tokenize_prompt(tokenizer, p.messages) for p in prompts]
    sampler = registry.build_by_name("samplers", "temperature", temperature=args.temperature)
    print(f"{args.policy}: {len(prompts)} prompts of {args.prompts}, K={args.k} at T = {args.temperature}, "
          f"{args.max_new_tokens} new tokens at most, batch {args.batch_size}, {torch.get_num_threads()} threads",
          file=sys.stderr)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    texts: dict[str, list[list[str]]] = {}
    for round_no in range(args.warmup + args.repeats):
        for way in (WAYS if round_no % 2 == 0 else WAYS[::-1]):
            result, texts[way] = run_once(way == "compact", model, tokenizer, prompt_ids, sampler, args)
            measured = round_no >= args.warmup
            if measured:
                runs[way].append(result)
            print(f"round {round_no + 1}{'' if measured else ' (warm-up)'} {way:>8}: {result['seconds']:7.2f} s, "
                  f"{result['new_tokens']} new tokens")
    median = {way: statistics.median(r["seconds"] for r in runs[way]) for way in WAYS}
    pairs = [(a, b) for x, y in zip(texts["compact"], texts["all_rows"]) for a, b in zip(x, y)]
    differ = sum(a != b for a, b in pairs)
    print(f"median seconds: compact {median['compact']:.2f}, all rows {median['all_rows']:.2f}; "
          f"all rows / compact = {median['all_rows'] / median['compact']:.2f}; answers that differ: {differ} of "
          f"{len(pairs)}")
    if args.json is not None:
        write_json(args.json, {"setting": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "threads": torch.get_num_threads(), "runs": runs, "median_seconds": median,
                               "speedup": median["all_rows"] / median["compact"], "answers": len(pairs),
                               "answers_that_differ": differ})
        print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
