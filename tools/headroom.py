"""Where a policy has room to learn from a reward: per task and phrasing, how often its greedy answer is
correct, how often a sample is, and how often any of n samples is (pass@n).

RL moves probability between answers the policy already samples. A prompt whose n samples are never
correct gives no signal even with a perfect reward, and one whose samples agree gives none to a
group baseline; ``mixed`` is the share of prompts whose first ``--group`` samples (PPO's
``samples_per_prompt``) are part correct, part wrong: the prompts a rollout learns from.
Correctness is the ``rule`` labeler's answer match, so the prompts need ``task``/``answer`` keys.

Usage::

    python tools/headroom.py --policy outputs/runs/<sft run>/model                     # held-out prompts
    python tools/headroom.py --policy <dir> --prompts embedded:prompts --samples 16 --temperature 0.7

Seeded (``--seed``); the figures in docs/results.md come from the defaults.
"""
from __future__ import annotations

import argparse
import statistics
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple, Sequence


class PromptResult(NamedTuple):
    """One prompt: its group key, whether the greedy answer is correct, and each sample's correctness."""

    key: tuple[str, str]  # (task, phrasing)
    greedy: bool
    samples: tuple[bool, ...]


class Headroom(NamedTuple):
    """Means over a group's prompts."""

    prompts: int
    greedy: float  # greedy answer correct
    sampled: float  # a sample correct (mean over samples)
    pass_at_n: float  # at least one of the n samples correct
    mixed: float  # the first `group` samples are neither all correct nor all wrong


def headroom(results: Sequence[PromptResult], group: int) -> dict[tuple[str, str], Headroom]:
    """Per (task, phrasing), per task over both phrasings ("all"), and over everything ("all", "all").
    Shape: P results, each with n >= group >= 1 samples -> {key: Headroom}."""
    if any(len(r.samples) < group for r in results) or group < 1:
        raise ValueError(f"every prompt needs >= group = {group} >= 1 samples")
    groups: dict[tuple[str, str], list[PromptResult]] = defaultdict(list)
    for r in results:
        for key in {r.key, (r.key[0], "all"), ("all", "all")}:  # a set: a prompt without a phrasing counts once
            groups[key].append(r)
    return {key: Headroom(len(rs), statistics.fmean(r.greedy for r in rs),
                          statistics.fmean(statistics.fmean(r.samples) for r in rs),
                          statistics.fmean(any(r.samples) for r in rs),
                          statistics.fmean(0 < sum(r.samples[:group]) < group for r in rs))
            for key, rs in sorted(groups.items(), key=lambda kv: (kv[0][0] == "all", kv[0]))}


def table(rows: dict[tuple[str, str], Headroom], n: int) -> str:
    """The Markdown table docs/results.md shows."""
    lines = [f"| task | phrasing | prompts | greedy | sampled | pass@{n} | mixed |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {task} | {phrasing} | {h.prompts} | {h.greedy:.2f} | {h.sampled:.2f} | {h.pass_at_n:.2f} | "
              f"{h.mixed:.2f} |" for (task, phrasing), h in rows.items()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", type=Path, required=True, help="policy directory (an SFT model/ or PPO policy/)")
    parser.add_argument("--prompts", default="embedded:eval_prompts", help="prompt source with task/answer keys")
    parser.add_argument("--num-prompts", type=int, default=128, help="use the first N prompts")
    parser.add_argument("--samples", type=int, default=16, help="answers sampled per prompt (n of pass@n)")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt of a PPO rollout (for 'mixed')")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="answer length limit (eval's default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    args = parser.parse_args(argv)
    if not (args.num_prompts >= 1 and args.samples >= args.group >= 1 and args.temperature > 0):
        parser.error("--num-prompts >= 1, --samples >= --group >= 1 and --temperature > 0 are required")
    if not args.policy.is_dir():
        parser.error(f"--policy {args.policy} is not a directory")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from rlhf_pl import registry
    from rlhf_pl.config import ModelConfig
    from rlhf_pl.data.chat import tokenize_prompt
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.models.adapters import store_linears_in_
    from rlhf_pl.models.generate import GreedySampler
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.outputs import model_config_at
    from rlhf_pl.sampling import sample_texts

    model, tokenizer, _ = load_model_and_tokenizer(
        model_config_at(OmegaConf.structured(ModelConfig(name=args.policy.name)), args.policy))
    model.eval().requires_grad_(False)
    store_linears_in_(model, torch.bfloat16)  # as eval holds its frozen models: no weight cast per decode step
    labeler = registry.build_by_name("labelers", "rule")
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    ids = [tokenize_prompt(tokenizer, p.messages) for p in prompts]
    sampler = registry.build_by_name("samplers", "temperature", temperature=args.temperature)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        greedy = sample_texts(model, tokenizer, ids, 1, GreedySampler(), args.max_new_tokens, batch_size=32,
                              progress="greedy")
        sampled = sample_texts(model, tokenizer, ids, args.samples, sampler, args.max_new_tokens, batch_size=64,
                               generator=torch.Generator().manual_seed(args.seed), progress="samples")
    correct = lambda p, s: labeler.breakdown(p, s.text).correct  # noqa: E731
    results = [PromptResult((str(p.meta.get("task")), str(p.meta.get("phrasing", "all"))), correct(p, g[0]),
                            tuple(correct(p, s) for s in ss)) for p, g, ss in zip(prompts, greedy, sampled)]
    print(f"{args.policy}: {len(prompts)} prompts of {args.prompts}, {args.samples} samples at T = {args.temperature}")
    print(table(headroom(results, args.group), args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
