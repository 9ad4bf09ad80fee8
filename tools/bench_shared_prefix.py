"""Benchmark running a prompt once for the rows that share it (:mod:`rlhf_pl.models.forward`) against
one pass over every whole row, in the two places the loop spends most of its time on it:

- ``ppo``: PPO's policy pass. ``--prompts`` (8) prompts of ``embedded:prompts``, chat-templated and
  left-padded, ``--samples`` (4) answers each sampled by the model (T = 0.7, at most 32 new tokens),
  then the logits predicting the answers: :func:`rlhf_pl.models.generate.response_logits` (shared)
  against the one full pass it replaced (``logits_to_keep`` = answer columns + 1), both under the
  stages' :func:`rlhf_pl.runtime.attention_kernel`, without gradient (the rollout's passes) and with
  a backward of a loss on the logprobs (the update);
- ``rm``: a reward-model training step. The first ``--rankings`` (8) rankings of ``--comparisons``
  tokenized as the rm stage does, collated by its :class:`RankingCollator` (shared) against the same
  completions right-padded whole, rewards and a backward of the K-wise ranking loss.

Each under the precision the stages use (``--precision``, default bf16-mixed: weights in float32,
autocast), ``--repeats`` timed calls alternating which path goes first (ABBA), after one warm-up
call of each; the medians, their ratio, and the largest |difference| of the outputs (logprobs /
rewards) between the paths as the rounding scale. Prints a table, writes JSON (``--json``).

Usage::

    python tools/bench_shared_prefix.py [--comparisons <round_1/collect/comparisons.jsonl>] [--repeats 5]
    python tools/bench_shared_prefix.py --tiny   # a smoke run: tiny model, 2 prompts × 3, 1 repeat
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rlhf_pl import registry
from rlhf_pl.config import model_preset, model_presets
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left, pad_right
from rlhf_pl.data.formats import load_prompts, load_rankings
from rlhf_pl.io import write_json
from rlhf_pl.models.forward import position_ids_from_mask
from rlhf_pl.models.generate import logprobs_from_logits, response_logits
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.precision import inference_autocast
from rlhf_pl.rl.ranking import kwise_ranking_loss
from rlhf_pl.runtime import attention_kernel, retain_freed_memory
from rlhf_pl.sampling import sample
from rlhf_pl.stages.rm import RankingCollator, tokenize_rankings

PATHS = ("whole", "shared")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--prompts", type=int, default=8, help="ppo: prompts per batch (ppo.batch_size)")
    parser.add_argument("--samples", type=int, default=4, help="ppo: answers per prompt (ppo.samples_per_prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="ppo: at most this many tokens per answer")
    parser.add_argument("--comparisons", default="embedded:comparisons", help="rm: the rankings to batch")
    parser.add_argument("--rankings", type=int, default=8, help="rm: rankings per batch (rm.batch_size)")
    parser.add_argument("--precision", default="bf16-mixed", help="precision plugin (registry name)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per path and setting")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampled answers")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_shared_prefix.json"), help="results file")
    parser.add_argument("--tiny", action="store_true", help="smoke run: --model tiny --prompts 2 --samples 3 "
                        "--rankings 2 --max-new-tokens 8 --repeats 1 --precision fp32")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.prompts, args.samples, args.rankings = "tiny", 2, 3, 2
        args.max_new_tokens, args.repeats, args.precision = 8, 1, "fp32"
    for key in ("prompts", "samples", "max_new_tokens", "rankings", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def timed(fn: Callable[[], torch.Tensor], autocast: Any) -> tuple[float, torch.Tensor]:
    with autocast:
        started = time.perf_counter()
        out = fn()
        return time.perf_counter() - started, out


def compare(fns: dict[str, Callable[[], torch.Tensor]], precision: Any, repeats: int) -> dict[str, Any]:
    """One warm-up call per path, then ``repeats`` timed calls, ABBA. Each fn returns its output (detached)."""
    outputs = {name: timed(fn, inference_autocast(precision, torch.device("cpu")))[1] for name, fn in fns.items()}
    seconds: dict[str, list[float]] = {name: [] for name in fns}
    for repeat in range(repeats):
        for name in (PATHS if repeat % 2 == 0 else PATHS[::-1]):
            seconds[name].append(timed(fns[name], inference_autocast(precision, torch.device("cpu")))[0])
    medians = {name: statistics.median(s) for name, s in seconds.items()}
    return {"seconds": seconds, "median_seconds": medians, "speedup": medians["whole"] / medians["shared"],
            "max_abs_difference": float((outputs["whole"] - outputs["shared"]).abs().max())}


def ppo_setting(model: Any, tokenizer: Any, args: argparse.Namespace, precision: Any) -> dict[str, Any]:
    """The policy pass over sampled answers: logprobs without gradient, and forward + backward."""
    prompts = load_prompts("embedded:prompts", limit=args.prompts)
    ids, mask = pad_left([tokenize_prompt(tokenizer, p.messages) for p in prompts], tokenizer.pad_token_id)
    sampler = registry.build_by_name("samplers", "temperature", temperature=0.7)
    with inference_autocast(precision, ids.device):
        out = sample(model, ids, mask, sampler, args.max_new_tokens, tokenizer,
                     generator=torch.Generator().manual_seed(args.seed), num_samples=args.samples)
    seq, am, p = out.sequences, out.attention_mask, out.prompt_length
    n = seq.shape[1] - p

    def whole() -> torch.Tensor:  # the full pass response_logits made before (as evaluate_policy calls it)
        with attention_kernel(seq.shape[1], seq.device, model):
            logits = model(input_ids=seq, attention_mask=am, position_ids=position_ids_from_mask(am), use_cache=False,
                           logits_to_keep=n + 1).logits[:, -(n + 1):-1]
        return logprobs_from_logits(logits.float(), seq[:, p:]) * am[:, p:]

    def shared() -> torch.Tensor:
        with attention_kernel(seq.shape[1], seq.device, model):
            logits = response_logits(model, seq, am, p)
        return logprobs_from_logits(logits.float(), seq[:, p:]) * am[:, p:]

    def with_backward(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def step() -> torch.Tensor:
            model.zero_grad(set_to_none=True)
            logprobs = fn()
            logprobs.sum().backward()
            return logprobs.detach()
        return step

    def no_grad(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.no_grad():
                return fn()
        return call

    return {"rows": seq.shape[0], "prompt_columns": p, "answer_columns": n,
            "answer_tokens": int(am[:, p:].sum()),
            "no_grad": compare({"whole": no_grad(whole), "shared": no_grad(shared)}, precision, args.repeats),
            "forward_backward": compare({"whole": with_backward(whole), "shared": with_backward(shared)}, precision,
                                        args.repeats)}


def rm_setting(model: Any, tokenizer: Any, args: argparse.Namespace, precision: Any) -> dict[str, Any]:
    """A reward-model training step on one batch of rankings: rewards, K-wise loss, backward."""
    rankings = load_rankings(args.comparisons, limit=args.rankings)
    items, _ = tokenize_rankings(rankings, tokenizer, max_length=1024, rule="truncate")
    batch = RankingCollator(tokenizer.pad_token_id)(items)
    whole_ids, whole_mask = pad_right([list(s) for item in items for s in item.sequences], tokenizer.pad_token_id)
    rm = RewardModel.from_causal_lm(model, "linear", tokenizer).train()

    def step(ids: torch.Tensor, mask: torch.Tensor, prefix: int) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            rm.zero_grad(set_to_none=True)
            out = rm(ids, mask, prefix)
            kwise_ranking_loss(out.raw, batch.pair_index, batch.pair_prompt, batch.n_prompts).loss.backward()
            return out.raw.detach()
        return call

    return {"rankings": len(items), "rows": whole_ids.shape[0], "tokens_whole": int(whole_mask.sum()),
            "columns_whole": whole_ids.shape[1], "prefix_columns": batch.prefix_length,
            "columns_shared": batch.input_ids.shape[1],
            "forward_backward": compare({"whole": step(whole_ids, whole_mask, 0),
                                         "shared": step(batch.input_ids, batch.attention_mask, batch.prefix_length)},
                                        precision, args.repeats)}


def print_table(results: dict[str, Any]) -> None:
    print(f"\n{'setting':<22}{'whole s':>9}{'shared s':>10}{'speed-up':>10}{'max |Δ|':>10}")
    for name, entry in (("ppo: logprobs", results["ppo"]["no_grad"]),
                        ("ppo: forward+backward", results["ppo"]["forward_backward"]),
                        ("rm: training step", results["rm"]["forward_backward"])):
        m = entry["median_seconds"]
        print(f"{name:<22}{m['whole']:>9.3f}{m['shared']:>10.3f}{entry['speedup']:>9.2f}×"
              f"{entry['max_abs_difference']:>10.2e}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    retained = retain_freed_memory()  # as `python -m rlhf_pl` runs do
    precision = registry.build_by_name("precision", args.precision)
    loaded = load_model_and_tokenizer(model_preset(args.model), torch_dtype=torch.float32)
    model, tokenizer = loaded.model.train(), loaded.tokenizer
    print(f"model {args.model} from {loaded.source}; precision {args.precision}; {torch.get_num_threads()} threads",
          file=sys.stderr)
    results = {"ppo": ppo_setting(model, tokenizer, args, precision),
               "rm": rm_setting(model, tokenizer, args, precision)}
    print_table(results)
    write_json(args.json, {
        "setting": {"model": args.model, "source": str(loaded.source), "precision": args.precision,
                    "prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens,
                    "comparisons": args.comparisons, "rankings": args.rankings, "repeats": args.repeats,
                    "seed": args.seed},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                    "torch": torch.__version__, "retain_freed_memory": retained},
        "results": results,
    })
    print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
