"""How much a reward model separates a policy's own answers: the signal PPO has to work with.

Samples ``--samples`` answers to each of the first ``--num-prompts`` prompts from the policy
(default: this model's latest SFT output), scores them with the reward model (default: the latest
RM output) and prints:

* the spread of the scores *between* prompts (std of the per-prompt means) and *within* a prompt
  (mean over prompts of the std of its answers' scores) — PPO can only move the second;
* best-of-n headroom: mean over prompts of (best answer's score − mean answer's score);
* the correlation of the scores with the ``rule`` labeler's (overall and within a prompt), and with
  the answer length in words;
* the mean token entropy of the sampled answers (nats, at the sampling temperature);
* for prompts whose ``meta`` holds the answer: the reward model's margin of hand-written forms
  of the correct answer ("The answer is X.", "Sure! The answer is X.", ...) over the bare "X.".

Usage::

    python tools/reward_spread.py                      # the latest SFT policy and reward model
    python tools/reward_spread.py --temperature 1.3 --num-prompts 48
    python tools/reward_spread.py --policy outputs/runs/<ppo run>/policy --json spread.json

The sampling is seeded (``--seed``); the figures in docs/results.md come from the defaults.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch

FORMS: dict[str, Callable[[str], str]] = {  # hand-written answers built from meta["answer"]
    "X.": lambda a: f"{a}.",
    "X": lambda a: a,
    "The answer is X.": lambda a: f"The answer is {a}.",
    "Sure! The answer is X.": lambda a: f"Sure! The answer is {a}.",
    "The answer is X. I hope this helps!": lambda a: f"The answer is {a}. I hope this helps!",
    "The answer is 17. (wrong)": lambda a: "The answer is 17.",
}


class Spread(NamedTuple):
    """Statistics of a (prompts × answers) score table."""

    between_std: float  # std over prompts of the per-prompt mean score
    within_std: float  # mean over prompts of the std of that prompt's scores
    best_of_n_gain: float  # mean over prompts of max − mean


def spread(scores: Sequence[Sequence[float]]) -> Spread:
    """Shape: ``scores`` is P lists of n >= 1 scores (population standard deviations)."""
    if not scores or any(len(row) == 0 for row in scores):
        raise ValueError("spread needs at least one prompt with at least one score each")
    means = [statistics.fmean(row) for row in scores]
    return Spread(
        between_std=statistics.pstdev(means),
        within_std=statistics.fmean(statistics.pstdev(row) for row in scores),
        best_of_n_gain=statistics.fmean(max(row) - m for row, m in zip(scores, means)),
    )


def correlation(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"correlation needs two equally long sequences of >= 2 values, got {len(x)} and {len(y)}")
    try:
        return statistics.correlation(x, y)
    except statistics.StatisticsError:
        return math.nan


def within_correlation(x: Sequence[Sequence[float]], y: Sequence[Sequence[float]]) -> float:
    """Mean over prompts of the correlation between two score tables; prompts where either side is
    constant are left out (nan when all are)."""
    values = [c for a, b in zip(x, y) if len(a) > 1 for c in [correlation(a, b)] if not math.isnan(c)]
    return statistics.fmean(values) if values else math.nan


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--policy", type=Path, default=None,
                        help="policy directory (default: this model's latest SFT output)")
    parser.add_argument("--reward", type=Path, default=None,
                        help="reward_model directory (default: the latest RM output)")
    parser.add_argument("--model-name", default="smollm2_135m", help="model.name whose latest outputs are used")
    parser.add_argument("--output-root", default="outputs", help="paths.output_root holding index.json")
    parser.add_argument("--prompts", default="embedded:prompts", help="prompt source")
    parser.add_argument("--num-prompts", type=int, default=24, help="use the first N prompts")
    parser.add_argument("--samples", type=int, default=6, help="answers sampled per prompt")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length limit (the PPO default)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast (CPU/GPU)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.num_prompts < 1 or args.samples < 2 or args.max_new_tokens < 1 or not args.temperature > 0:
        parser.error("--num-prompts >= 1, --samples >= 2, --max-new-tokens >= 1 and --temperature > 0 are required")
    return args


def resolve(path: Path | None, stage: str, output: str, args: argparse.Namespace) -> Path:
    """The given directory, or the latest ``stage`` output recorded in ``<output-root>/index.json``."""
    if path is not None:
        if not path.is_dir():
            raise SystemExit(f"{path} is not a directory")
        return path
    from omegaconf import OmegaConf

    from rlhf_pl import outputs

    found = outputs.latest(OmegaConf.create({"paths": {"output_root": args.output_root},
                                             "model": {"name": args.model_name}}), stage, output)
    if found is None:
        raise SystemExit(f"no {stage} output of {args.model_name} under {args.output_root}/index.json: "
                         f"run `python -m rlhf_pl +stage={stage}` first "
                         f"or pass --{'policy' if stage == 'sft' else 'reward'}")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    from omegaconf import OmegaConf

    from rlhf_pl import registry
    from rlhf_pl.config import ModelConfig
    from rlhf_pl.data.chat import tokenize_prompt
    from rlhf_pl.data.collate import pad_left
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.models.generate import entropy_from_logits, response_logits
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.models.reward import RewardModel
    from rlhf_pl.outputs import model_config_at
    from rlhf_pl.sampling import sample

    policy_dir = resolve(args.policy, "sft", "model", args)
    reward_dir = resolve(args.reward, "rm", "reward_model", args)
    policy_cfg = model_config_at(OmegaConf.structured(ModelConfig(name=policy_dir.name)), policy_dir)
    policy, tokenizer, _ = load_model_and_tokenizer(policy_cfg)
    policy.eval()
    reward_model = RewardModel.from_pretrained(reward_dir).eval()
    labeler = registry.build_by_name("labelers", "rule")
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    sampler = registry.build_by_name("samplers", "temperature", temperature=args.temperature)
    generator = torch.Generator().manual_seed(args.seed)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=args.bf16)
    rm_scores, gold, lengths, entropies, started = [], [], [], [], time.perf_counter()
    with torch.no_grad(), autocast:
        for n, prompt in enumerate(prompts):
            ids, mask = pad_left([tokenize_prompt(tokenizer, prompt.messages)] * args.samples, tokenizer.pad_token_id)
            out = sample(policy, ids, mask, sampler, args.max_new_tokens, tokenizer, generator=generator,
                         scorer=reward_model)
            rm_scores.append(out.scores.rewards.float().tolist())
            logits = (response_logits(policy, out.sequences, out.attention_mask, out.prompt_length).float()
                      / args.temperature)
            entropies.append(float((entropy_from_logits(logits) * out.mask).sum() / out.mask.sum()))
            texts = out.texts(tokenizer)
            gold.append([labeler.score(prompt, t) if prompt.meta.get("answer") is not None else math.nan
                         for t in texts])
            lengths.append([float(len(t.split())) for t in texts])
            print(f"\rsampled {n + 1}/{len(prompts)} prompts", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        with_answer = [p for p in prompts if p.meta.get("answer") is not None]
        forms = {name: reward_model.score([[m.to_dict() for m in p.messages] for p in with_answer],
                                          [make(str(p.meta["answer"])) for p in with_answer],
                                          batch_size=16).float().tolist()
                 for name, make in FORMS.items()} if with_answer else {}

    s = spread(rm_scores)
    flat = lambda table: [v for row in table for v in row]  # noqa: E731
    has_gold = all(not math.isnan(v) for v in flat(gold))
    result = {
        "policy": str(policy_dir), "reward_model": str(reward_dir), "prompts": len(prompts), "samples": args.samples,
        "temperature": args.temperature, "mean_score": statistics.fmean(flat(rm_scores)),
        "between_prompt_std": s.between_std, "within_prompt_std": s.within_std, "best_of_n_gain": s.best_of_n_gain,
        "token_entropy": statistics.fmean(entropies),
        "corr_score_gold": correlation(flat(rm_scores), flat(gold)) if has_gold else None,
        "corr_score_gold_within_prompt": within_correlation(rm_scores, gold) if has_gold else None,
        "corr_score_words": correlation(flat(rm_scores), flat(lengths)),
        "form_margins_over_bare": {name: statistics.fmean(a - b for a, b in zip(v, forms["X."]))
                                   for name, v in forms.items()},
        "seconds": time.perf_counter() - started,
    }
    for key, value in result.items():
        if isinstance(value, dict):
            print(f"{key}:")
            for name, margin in value.items():
                print(f"  {name:40s} {margin:+.3f}")
        else:
            print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json is not None:
        from rlhf_pl.io import write_json

        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
