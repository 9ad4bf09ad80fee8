"""Reward-model over-optimisation on the embedded task (Gao et al. 2022): optimise a weak proxy
reward model with PPO for long, and watch the gold score turn down while the proxy keeps rising.

1. A proxy reward model from few and/or noisy rankings: the first ``--rankings`` records of
   ``--comparisons``, a fraction ``--noise`` of them replaced by seeded random permutations
   (labelers who disagree) — ``+stage=rm`` from the SFT model.
2. PPO from the SFT policy against that proxy for ``--updates`` updates with a weak, fixed KL
   penalty (``--beta``), so that the policy travels far from the SFT policy.
3. Every ``--eval-every`` updates (and before the first), on held-out prompts: sampled answers of
   the current policy, their gold score (the ``rule`` labeler), proxy score and KL to the SFT policy.
4. ``overoptimisation.json`` / ``.md`` / ``.png``: gold and proxy score against d = √KL, with Gao et
   al.'s RL form d(α − β log d) fitted to the gold gain; the fit's peak d* = exp(α/β − 1) is where
   more optimisation of the proxy starts to hurt.

Usage::

    python tools/overoptimisation.py                                # SmolLM2, the latest SFT output
    python tools/overoptimisation.py --sft outputs/runs/<run>/model --rankings 48 --noise 0.3 --updates 64
    python tools/overoptimisation.py --model tiny --sft <dir> --updates 4 --eval-every 2   # a quick try

Figures and the command that made them: docs/results.md.
"""
from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODELS = ("smollm2_135m", "tiny")


@dataclass
class Point:
    """The current policy after ``update`` PPO updates, on the held-out prompts."""

    update: int
    kl: float
    sqrt_kl: float
    gold: float
    proxy: float
    correct: float | None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--sft", type=Path, default=None,
                        help="the SFT policy (a model directory); default: this model's latest SFT output")
    parser.add_argument("--comparisons", default="embedded:comparisons", help="K-wise rankings for the proxy")
    parser.add_argument("--rankings", type=int, default=64, help="train the proxy on the first N rankings")
    parser.add_argument("--noise", type=float, default=0.25, help="fraction of those rankings made random")
    parser.add_argument("--updates", type=int, default=48, help="PPO updates")
    parser.add_argument("--beta", type=float, default=0.005, help="fixed KL coefficient (weak: the policy travels)")
    parser.add_argument("--lr", type=float, default=1e-4, help="ppo.policy_optim.lr (5x the default: it travels)")
    parser.add_argument("--eval-every", type=int, default=8, help="measure gold and proxy every N updates")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts (embedded:eval_prompts)")
    parser.add_argument("--samples", type=int, default=2, help="sampled answers per prompt at each measurement")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/overoptimisation"), help="output directory")
    parser.add_argument("overrides", nargs="*", help="more Hydra overrides (e.g. ppo.batch_size=8)")
    args = parser.parse_args(argv)
    if not 0 <= args.noise <= 1:
        parser.error(f"--noise must be in [0, 1], got {args.noise}")
    for name in ("rankings", "updates", "eval_every", "prompts", "samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.sft is not None and not (args.sft / "config.json").is_file():
        parser.error(f"--sft {args.sft}: not a model directory (no config.json); pass an SFT run's model/")
    return args


def noisy_rankings(source: str, n: int, noise: float, seed: int) -> list[dict[str, Any]]:
    """The first ``n`` records of ``source``; a seeded fraction ``noise`` of them get a random
    permutation as their ranking (best first, no ties)."""
    from rlhf_pl.data.formats import ranking_records

    rng = random.Random(seed)  # a bad file is a clear error, before anything is written
    return [_shuffled(dict(record), rng) if rng.random() < noise else dict(record)
            for record in ranking_records(source, limit=n)]


def _shuffled(record: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """``record`` with a random ranking: a permutation of its K completions, or chosen and
    rejected swapped half of the time (pairwise)."""
    if "completions" in record:
        k = len(record["completions"])
        return {**record, "ranking": rng.sample(range(k), k)}
    if rng.random() < 0.5:
        return {**record, "chosen": record["rejected"], "rejected": record["chosen"]}
    return record


def compose(args: argparse.Namespace, stage: str, extra: Sequence[str] = ()) -> Any:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return hydra_compose("config", overrides=[f"+stage={stage}", f"model={args.model}", f"seed={args.seed}",
                                                  *extra, *args.overrides])


class GoldTracker:
    """A Lightning callback measuring the policy every ``every`` updates (and before the first)."""

    def __init__(self, cfg: Any, prompts: list[Any], every: int, samples: int) -> None:
        from lightning.pytorch.callbacks import Callback

        from rlhf_pl import registry

        self.cfg, self.prompts, self.every, self.samples = cfg, prompts, every, samples
        self.gold = registry.build("labelers", cfg.labeler)
        self.sampler = registry.build("samplers", cfg.sampler)
        self.points: list[Point] = []
        tracker = self

        class _Callback(Callback):
            def on_train_start(self, trainer: Any, module: Any) -> None:
                tracker.measure(module, 0)

            def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
                if module.rollouts_done % tracker.every == 0 or module.rollouts_done == module.ppo.updates:
                    tracker.measure(module, module.rollouts_done)

        self.callback = _Callback()

    def measure(self, module: Any, update: int) -> None:
        import torch

        from rlhf_pl.data.chat import tokenize_prompt
        from rlhf_pl.stages.eval import answers_of, policy_metrics

        ids = [tokenize_prompt(module.tokenizer, p.messages)[-self.cfg.data.max_prompt_length:] for p in self.prompts]
        was_training = module.policy.training
        module.policy.eval()
        # the autocast PPO's own rollouts run under: the frozen models' linear weights are stored in its dtype
        with torch.no_grad(), module.trainer.precision_plugin.forward_context():
            answers = answers_of(module.policy, module.reference, module.tokenizer, ids, self.samples, self.sampler,
                                 self.cfg, module.scorer)
        module.policy.train(was_training)
        m, _ = policy_metrics("policy", self.prompts, answers, self.gold, None, self.samples)
        self.points.append(Point(update, m.kl, m.sqrt_kl, m.gold_sampled, m.proxy_sampled, m.correct_sampled))
        print(f"update {update}: √KL {m.sqrt_kl:.3f}, gold {m.gold_sampled:+.3f}, proxy {m.proxy_sampled:+.3f}",
              flush=True)


def fits(points: list[Point]) -> dict[str, Any]:
    """Gao et al.'s RL form through the gold and the proxy gain over the first point; the gold
    fit's peak d* = exp(α/β − 1) (where its derivative α − β(log d + 1) is 0), if β > 0."""
    from rlhf_pl.rl.eval_metrics import fit_gao

    d = [p.sqrt_kl for p in points]
    out: dict[str, Any] = {}
    for key in ("gold", "proxy"):
        fit = fit_gao(d, [getattr(p, key) - getattr(points[0], key) for p in points], "rl")
        out[key] = fit._asdict() if fit else None
    gold = out["gold"]
    out["gold_peak_sqrt_kl"] = math.exp(gold["alpha"] / gold["beta"] - 1) if gold and gold["beta"] > 0 else None
    return out


def report(out_dir: Path, points: list[Point], fitted: dict[str, Any], settings: dict[str, Any]) -> str:
    from rlhf_pl.io import write_json, write_text
    from rlhf_pl.report import markdown_table, plot_points
    from rlhf_pl.rl.eval_metrics import GaoFit

    write_json(out_dir / "overoptimisation.json", {"settings": settings, "points": [asdict(p) for p in points],
                                                   "fits": fitted})
    rows = [{"update": p.update, "√KL": f"{p.sqrt_kl:.3f}", "gold": f"{p.gold:+.3f}", "proxy": f"{p.proxy:+.3f}",
             "correct": "—" if p.correct is None else f"{p.correct:.3f}"} for p in points]
    peak = fitted["gold_peak_sqrt_kl"]
    table = (f"{markdown_table(rows)}\n\nGold fit's peak: √KL = {peak:.3f}\n" if peak is not None
             else f"{markdown_table(rows)}\n\nThe gold fit has no peak (β ≤ 0, or too few points)\n")
    write_text(out_dir / "overoptimisation.md", f"# Over-optimisation\n\n{table}")
    d = [p.sqrt_kl for p in points]
    panels: dict[str, dict[str, tuple[list[float], list[float], str]]] = {
        "gold": {"PPO": (d, [p.gold for p in points], "o")}, "proxy": {"PPO": (d, [p.proxy for p in points], "o")}}
    xs = [max(d) * i / 40 for i in range(41)]
    for key in ("gold", "proxy"):
        if fitted[key] is not None:
            fit = GaoFit(**fitted[key])
            panels[key]["fit d(α − β log d)"] = (xs, [getattr(points[0], key) + fit.gain(x) for x in xs], "--")
    plot_points(panels, out_dir / "overoptimisation.png", xlabel="√KL to the SFT policy (nats^½)",
                title="gold and proxy score against √KL (PPO on a weak proxy)")
    return table


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    from rlhf_pl import outputs
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.io import write_jsonl
    from rlhf_pl.run import run_stage

    out_dir = args.out
    probe = compose(args, "rm")
    sft = args.sft or outputs.latest(probe, "sft", "model")
    if sft is None:
        print(f"error: no SFT output recorded for model {args.model} in {outputs.index_path(probe)}; run "
              f"`python -m rlhf_pl +stage=sft model={args.model}` first or pass --sft <dir>", file=sys.stderr)
        return 2
    rankings = write_jsonl(out_dir / "proxy_rankings.jsonl",
                           noisy_rankings(args.comparisons, args.rankings, args.noise, args.seed))
    rm_cfg = compose(args, "rm", [f"data.comparisons={rankings}"])
    rm = run_stage(rm_cfg, out_dir / "rm", {"init": sft}, record=False).outputs["reward_model"]

    ppo_cfg = compose(args, "ppo", ["kl_controller=fixed", f"kl_controller.beta={args.beta}",
                                    f"ppo.policy_optim.lr={args.lr}", f"ppo.updates={args.updates}",
                                    f"ppo.checkpoint_every={args.updates}"])
    prompts = load_prompts(ppo_cfg.eval.prompts, limit=args.prompts)
    tracker = GoldTracker(ppo_cfg, prompts, args.eval_every, args.samples)
    run_stage(ppo_cfg, out_dir / "ppo", {"policy": sft, "reward_model": rm}, record=False,
              callbacks=[tracker.callback])
    fitted = fits(tracker.points)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(report(out_dir, tracker.points, fitted, {**settings, "sft": str(sft), "reward_model": str(rm)}))
    print(f"wrote {out_dir / 'overoptimisation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
