"""Benchmark comparison collection: completions/s when the K completions of a prompt share one prefill
of it, against K independent generations of the same prompt.

Setting: SmolLM2-135M-Instruct (the ``smollm2_135m`` preset of tools/make_comparisons.py, loaded
through :mod:`rlhf_pl.models.loading`), the first ``--num-prompts`` prompts of ``embedded:prompts``
(chat-templated), K = ``--k`` completions each of ``--max-new-tokens`` tokens, temperature sampling
with EOS banned (every completion runs to the full length, so both ways decode the same tokens),
``--batch-size`` sequences per batch, on the CPU in float32 or under bfloat16 autocast (``--bf16``:
float32 weights, each cast once per generation). The two ways, through
:func:`rlhf_pl.sampling.sample_texts`:

- shared: ``sample_texts(prompts, n=K)``: a batch holds batch_size / K distinct prompts, prefilled
  once (b rows), then the KV cache is repeated and every step decodes b·K rows;
- independent: ``sample_texts(each prompt repeated K times, n=1)``: the same batch_size rows per
  batch, each prompt prefilled K times.

They alternate in one process (ABBA order: shared first in even rounds, independent first in odd
ones), ``--warmup`` rounds not measured, then ``--repeats`` measured rounds. Reported: each run's
seconds and completions/s, the median completions/s of each way, the ratio of the medians
(shared / independent), and the rows every way prefilled (from forward hooks; shared: one per prompt).
``--json FILE`` writes it all (through :func:`rlhf_pl.io.write_json`).

Usage::

    python tools/bench_collect.py [--num-prompts 32] [--k 4] [--max-new-tokens 32] [--batch-size 32]
                                  [--repeats 3] [--warmup 1] [--bf16] [--threads N] [--json outputs/bench_collect.json]
    python tools/bench_collect.py --model tiny --num-prompts 4 --repeats 1 --warmup 0   # a quick smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf_pl.config import model_preset, model_presets
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.formats import load_prompts
from rlhf_pl.io import write_json
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.plugins.samplers import NoEOSSampler
from rlhf_pl.precision import native_bf16
from rlhf_pl.sampling import sample_texts

WAYS = ("shared", "independent")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "),
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--num-prompts", type=int, default=32, help="the first N prompts of embedded:prompts")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per completion (EOS banned)")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch (a multiple of --k)")
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling temperature")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds (each runs both ways once)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not measured")
    parser.add_argument("--bf16", action="store_true", help="run under torch.autocast('cpu', bfloat16)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (the same in every run)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    for key, low in (("num_prompts", 1), ("k", 2), ("max_new_tokens", 1), ("repeats", 1), ("warmup", 0),
                     ("threads", 0)):
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if args.batch_size < args.k or args.batch_size % args.k:
        parser.error(f"--batch-size must be a multiple of --k (both ways then run batches of the same rows), got "
                     f"--batch-size {args.batch_size} with --k {args.k}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    return args


def count_prefill_rows(model: Any) -> tuple[list[int], Any]:
    """A list that collects the rows of every forward call over more than one column (a prefill), and the hook."""
    rows: list[int] = []

    def hook(_module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            rows.append(ids.shape[0])

    return rows, model.register_forward_pre_hook(hook, with_kwargs=True)


def run_once(way: str, model: Any, tokenizer: Any, prompt_ids: list[list[int]], args: argparse.Namespace) -> dict:
    """One collection of K completions of every prompt, the ``way`` given; its seconds, completions/s, prefill rows."""
    sampler = NoEOSSampler(args.temperature, tokenizer.eos_token_id)
    generator = torch.Generator().manual_seed(args.seed)
    if way == "shared":
        prompts, n = prompt_ids, args.k
    else:
        prompts, n = [ids for ids in prompt_ids for _ in range(args.k)], 1
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    rows, handle = count_prefill_rows(model)
    try:
        with autocast:
            started = time.perf_counter()
            samples = sample_texts(model, tokenizer, prompts, n, sampler, args.max_new_tokens,
                                   batch_size=args.batch_size, generator=generator)
            seconds = time.perf_counter() - started
    finally:
        handle.remove()
    completions = sum(len(per_prompt) for per_prompt in samples)
    if completions != len(prompt_ids) * args.k:
        raise RuntimeError(f"{way}: {completions} completions, expected {len(prompt_ids) * args.k}")
    return {"seconds": seconds, "completions_per_s": completions / seconds, "prefill_rows": sum(rows)}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = load_prompts("embedded:prompts", limit=args.num_prompts)
    if len(prompts) < args.num_prompts:
        raise SystemExit(f"--num-prompts {args.num_prompts}: embedded:prompts has only {len(prompts)} prompts")
    bf16_native, bf16_evidence = native_bf16("cpu")
    if args.bf16 and not bf16_native:
        print(f"warning: {bf16_evidence}: bfloat16 autocast is emulated here (slower than float32)", file=sys.stderr)
    loaded = load_model_and_tokenizer(model_preset(args.model), torch_dtype=torch.float32)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    prompt_ids = [tokenize_prompt(tokenizer, p.messages) for p in prompts]
    print(f"{len(prompts)} prompts (mean {statistics.mean(map(len, prompt_ids)):.0f} tokens), model {args.model} "
          f"from {loaded.source}; K={args.k}, {args.max_new_tokens} new tokens, batch {args.batch_size} sequences, "
          f"{'bf16 autocast' if args.bf16 else 'fp32'}, {torch.get_num_threads()} threads", file=sys.stderr)
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for round_no in range(args.warmup + args.repeats):
        for way in (WAYS if round_no % 2 == 0 else WAYS[::-1]):
            result = run_once(way, model, tokenizer, prompt_ids, args)
            measured = round_no >= args.warmup
            if measured:
                runs[way].append(result)
            print(f"round {round_no + 1}{'' if measured else ' (warm-up)'} {way:>11}: {result['seconds']:7.2f} s, "
                  f"{result['completions_per_s']:7.2f} completions/s, {result['prefill_rows']} prefill rows")
    median = {way: statistics.median(r["completions_per_s"] for r in runs[way]) for way in WAYS}
    ratio = median["shared"] / median["independent"]
    print(f"median completions/s: shared {median['shared']:.2f}, independent {median['independent']:.2f}; "
          f"shared / independent = {ratio:.2f}")
    if args.json is not None:
        write_json(args.json, {
            "setting": {"model": args.model, "source": loaded.source, "num_prompts": len(prompts), "k": args.k,
                        "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                        "temperature": args.temperature, "bf16_autocast": args.bf16, "seed": args.seed,
                        "warmup": args.warmup, "repeats": args.repeats, "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "native_bf16": bf16_native, "bf16_evidence": bf16_evidence},
            "runs": runs,
            "median_completions_per_s": median,
            "ratio_shared_over_independent": ratio,
        })
        print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
