"""Build a comparison set with ``+stage=collect`` — by default the embedded one,
``rlhf_pl/data/default/comparisons.jsonl`` — and print how informative its rankings are.

A thin call of the collect stage (:mod:`rlhf_pl.stages.collect`): the options below become its
overrides (``collect.*``, ``sampler.temperature``, ``labeler.*``, ``data.limit``, ``seed``), the
stage runs in a temporary run directory without touching ``outputs/index.json``, and its
``comparisons.jsonl`` is copied to ``--out`` (atomically). Then, for the ``rule`` labeler's
verdicts, it prints the fraction of correct completions overall and among the best- and
worst-ranked ones (the rankings are informative when the best is correct more often than the
worst), per task.

Usage::

    python tools/make_comparisons.py                          # the base SmolLM2 model, 300 prompts, K = 4
    python tools/make_comparisons.py --policy outputs/runs/<sft run>/model --temperature 1.0 --out new.jsonl
    python tools/make_comparisons.py --model tiny --num-prompts 16 --out /tmp/c.jsonl   # a quick try
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "rlhf_pl" / "data" / "default" / "comparisons.jsonl"
MODELS = ("smollm2_135m", "tiny")  # conf/model presets
PRECISIONS = {"float32": "fp32", "bfloat16": "bf16-mixed"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--prompts", default="embedded:prompts", help="prompt source (needs 'task'/'answer' keys)")
    parser.add_argument("--num-prompts", type=int, default=300, help="use the first N prompts of the source")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--model", choices=MODELS, default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--policy", type=Path, default=None,
                        help="sample from this model directory instead of the base model (an SFT run's model/ or "
                             "a PPO run's policy/: on-policy comparisons)")
    parser.add_argument("--dtype", choices=sorted(PRECISIONS), default="bfloat16",
                        help="compute while sampling: precision=bf16-mixed or fp32")
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (diversity)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion at most")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences generated together")
    parser.add_argument("--resample-rounds", type=int, default=2,
                        help="extra rounds that replace empty/duplicate completions")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--noise", type=float, default=0.0, help="labeler.noise: fraction of rankings made random")
    parser.add_argument("--labeler-seed", type=int, default=0, help="labeler.seed (for the noise)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl file")
    args = parser.parse_args(argv)
    if args.policy is not None and not (args.policy / "config.json").is_file():
        parser.error(f"--policy {args.policy}: not a model directory (no config.json); pass an SFT run's model/ or "
                     "a PPO run's policy/")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    return args


def overrides(args: argparse.Namespace, output_root: Path) -> list[str]:
    """The collect stage's config for these options (its schema checks the values)."""
    return [
        "+stage=collect", f"model={args.model}", f"precision={PRECISIONS[args.dtype]}", f"seed={args.seed}",
        f"paths.output_root={output_root}", f"collect.policy_from={args.policy if args.policy else 'base'}",
        f"collect.sources=[{args.prompts}]", f"data.limit={args.num_prompts}", f"collect.k={args.k}",
        f"collect.max_new_tokens={args.max_new_tokens}", f"collect.batch_size={args.batch_size}",
        f"collect.resample_rounds={args.resample_rounds}", f"sampler.temperature={args.temperature}",
        "labeler=rule", f"labeler.noise={args.noise}", f"labeler.seed={args.labeler_seed}",
        "trainer.enable_progress_bar=false",
    ]


def correctness(records: list[dict]) -> dict[str, float]:
    """Fractions of correct completions (the rule labeler's verdict) overall, among the best- and the
    worst-ranked ones, and per task."""
    from rlhf_pl import registry
    from rlhf_pl.data.formats import Message, Prompt

    labeler = registry.build_by_name("labelers", "rule")
    correct = best = worst = 0.0
    per_task: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for r in records:
        meta = {"task": r.get("task"), "answer": r.get("answer")}
        prompt = Prompt(tuple(Message(**m) for m in r["prompt"]), "", meta)
        ok = [b.correct for b in labeler.label(prompt, r["completions"]).breakdowns]
        groups = [[g] if isinstance(g, int) else g for g in r["ranking"]]
        correct += sum(ok) / len(ok)
        best += sum(ok[i] for i in groups[0]) / len(groups[0])
        worst += sum(ok[i] for i in groups[-1]) / len(groups[-1])
        per_task[str(r.get("task"))][0] += sum(ok)
        per_task[str(r.get("task"))][1] += len(ok)
    n = max(len(records), 1)
    return {"correct": correct / n, "best_ranked_correct": best / n, "worst_ranked_correct": worst / n,
            **{f"correct[{task}]": ok / total for task, (ok, total) in sorted(per_task.items())}}


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs
    from rlhf_pl.errors import UserError
    from rlhf_pl.io import write_text
    from rlhf_pl.run import run_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    register_configs()
    with tempfile.TemporaryDirectory(prefix="make_comparisons-") as tmp:
        with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
            cfg = compose("config", overrides=overrides(args, Path(tmp)))
        try:
            result = run_stage(cfg, Path(tmp) / "run", record=False)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        text = result.outputs["comparisons"].read_text(encoding="utf-8")
    write_text(args.out, text)
    records = [json.loads(line) for line in text.splitlines()]
    figures = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))}
    figures.update({k: round(v, 3) for k, v in correctness(records).items()})
    print(f"comparisons written to {args.out} (model {args.policy or args.model})")
    for key, value in figures.items():
        print(f"  {key:32s} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
