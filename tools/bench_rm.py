"""Benchmark: reward-model training throughput in comparisons per second, K = 4 against K = 2.

K-wise batching runs each completion through the model once and scores all K·(K−1)/2 pairs of a
prompt from those K rewards, so with the same number of sequences per step K = 4 yields 6 pairs
per 4 forwards where K = 2 yields 1 per 2: three times the comparisons for the same compute. This
measures it on the real training step (rlhf_pl.stages.rm.RewardModelModule under a Lightning
Trainer) with SmolLM2-135M (or --model tiny), sequences of --seq tokens, fp32 and bf16-mixed.

Usage:  python tools/bench_rm.py [--model smollm2_135m|tiny] [--sequences 8] [--seq 256] [--steps 3]
        [--precisions fp32 bf16-mixed] [--out outputs/bench/rm.json]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from bench_sft import StepTimer  # tools/ is on sys.path when run as a script

from rlhf_pl.config import model_preset, model_presets


def ranking_items(k: int, n_sequences: int, seq: int, vocab: int, steps: int):
    """Synthetic batches: ``n_sequences // k`` prompts × K completions of ``seq`` tokens, strict rankings."""
    from rlhf_pl.stages.rm import RankingCollator, TokenizedRanking

    gen = torch.Generator().manual_seed(k)
    collate = RankingCollator(pad_id=0)
    batches = []
    for _ in range(steps):
        items = []
        for _ in range(n_sequences // k):
            seqs = tuple(tuple(torch.randint(1, vocab, (seq,), generator=gen).tolist()) for _ in range(k))
            items.append(TokenizedRanking(seqs, tuple((i,) for i in range(k))))
        batches.append(collate(items))
    return batches


def bench(model_cfg: Any, k: int, precision: str, n_sequences: int, seq: int, steps: int, warmup: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from rlhf_pl.config import OptimConfig
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.models.reward import RewardModel
    from rlhf_pl.stages.rm import RewardModelModule

    lm = load_model_and_tokenizer(model_cfg).model
    reward_model = RewardModel.from_causal_lm(lm, "linear").train()
    batches = ranking_items(k, n_sequences, seq, lm.config.vocab_size, steps + warmup)
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision={"fp32": "32-true", "bf16-mixed": "bf16-mixed"}[precision],
        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer.callback],
    )
    module = RewardModelModule(reward_model, OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"))
    trainer.fit(module, DataLoader(batches, batch_size=None, collate_fn=lambda b: b))
    measured = sorted(timer.times[warmup:])
    step_s = measured[len(measured) // 2]
    pairs = int(batches[0].pair_index.shape[0])
    return {"k": k, "precision": precision, "prompts_per_step": n_sequences // k, "sequences_per_step": n_sequences,
            "pairs_per_step": pairs, "step_s": round(step_s, 3), "comparisons_per_s": round(pairs / step_s, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m")
    parser.add_argument("--sequences", type=int, default=8, help="sequences per step (a multiple of 4)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16-mixed"], choices=["fp32", "bf16-mixed"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/rm.json"))
    args = parser.parse_args()
    if args.sequences % 4:
        parser.error(f"--sequences={args.sequences} must be a multiple of 4 (both K = 4 and K = 2 fill it)")
    from rlhf_pl.runtime import retain_freed_memory

    retain_freed_memory()  # as `python -m rlhf_pl` runs do

    from rich.console import Console
    from rich.table import Table

    from rlhf_pl.io import write_json

    rows = [bench(model_preset(args.model), k, p, args.sequences, args.seq, args.steps, args.warmup)
            for p in args.precisions for k in (4, 2)]
    table = Table(title=f"Reward-model training, {args.model}, {args.sequences} sequences × {args.seq} tokens per step")
    for col in ("precision", "K", "prompts/step", "pairs/step", "step s", "comparisons/s", "K=4 ÷ K=2"):
        table.add_column(col)
    speedups = {}
    for p in args.precisions:
        k4, k2 = (next(r for r in rows if r["precision"] == p and r["k"] == k) for k in (4, 2))
        speedups[p] = k4["comparisons_per_s"] / k2["comparisons_per_s"]  # unrounded: 2 decimals lose 2% at 0.2
        for r in (k4, k2):
            table.add_row(p, str(r["k"]), str(r["prompts_per_step"]), str(r["pairs_per_step"]), f"{r['step_s']:.2f}",
                          f"{r['comparisons_per_s']:.2f}", f"{speedups[p]:.2f}×" if r is k4 else "")
    Console().print(table)
    write_json(args.out, {"model": args.model, "seq": args.seq, "threads": torch.get_num_threads(),
                                 "results": rows, "k4_over_k2": speedups})
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
