"""Benchmark: SFT training throughput and model-FLOP utilisation (MFU).

Runs the real SFT LightningModule (rlhf_pl.stages.sft.SFTModule) under a Lightning Trainer on
SmolLM2-135M-Instruct (or --model tiny), batch 8 × sequence 256, for fp32 and bf16-mixed, and
measures the machine's matmul peak in the same run:

    MFU = 6 · params · tokens/s  ÷  peak matmul FLOP/s (of the same dtype)

Usage:  python tools/bench_sft.py [--model smollm2_135m|tiny] [--steps 4] [--warmup 1]
        [--precisions fp32 bf16-mixed] [--out outputs/bench/sft.json]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from rlhf_pl.config import model_preset, model_presets
from rlhf_pl.precision import COMPUTE


class StepTimer:
    """Lightning callback: wall time of each optimisation step (forward, backward, optimizer)."""

    def __init__(self) -> None:
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_start(cb, trainer, module, batch, idx):  # noqa: N805
                self._start = time.perf_counter()

            def on_train_batch_end(cb, trainer, module, outputs, batch, idx):  # noqa: N805
                self.times.append(time.perf_counter() - self._start)

        self.times: list[float] = []
        self.callback = _CB()


def bench_precision(model_cfg, precision: str, steps: int, warmup: int, batch: int, seq: int) -> dict:
    import lightning as L
    from torch.utils.data import DataLoader

    from rlhf_pl.config import OptimConfig
    from rlhf_pl.models.loading import load_model_and_tokenizer
    from rlhf_pl.stages.sft import SFTModule

    model = load_model_and_tokenizer(model_cfg).model
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (steps + warmup, batch, seq), generator=gen)
    data = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision=COMPUTE[precision][0],
        max_steps=steps + warmup, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer.callback],
    )
    module = SFTModule(model.train(), OptimConfig(lr=1e-5, warmup_ratio=0.0, schedule="constant"))
    trainer.fit(module, DataLoader(data, batch_size=None))
    step_s = sorted(timer.times[warmup:])[len(timer.times[warmup:]) // 2]  # median of measured steps
    tokens_per_s = batch * seq / step_s
    return {"precision": precision, "params": n_params, "step_s": round(step_s, 3),
            "tokens_per_s": round(tokens_per_s, 1), "model_flops_per_s": 6 * n_params * tokens_per_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m")
    parser.add_argument("--steps", type=int, default=4, help="measured optimisation steps per precision")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16-mixed"], choices=["fp32", "bf16-mixed"])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/sft.json"))
    args = parser.parse_args()
    from rlhf_pl.runtime import matmul_peak, retain_freed_memory

    retain_freed_memory()  # as `python -m rlhf_pl` runs do

    from rich.console import Console
    from rich.table import Table

    from rlhf_pl.io import write_json

    console = Console()
    # fp32's peak is every row's second denominator; bf16's is measured only where bf16 is benchmarked
    # (without native bf16 each emulated product takes seconds: docs/benchmarks.md)
    peaks = {p: matmul_peak(COMPUTE[p][1]) for p in dict.fromkeys(["fp32", *args.precisions])}
    console.print("matmul peak: " + ", ".join(f"{p} {v / 1e9:.1f} GFLOP/s" for p, v in peaks.items())
                  + f" ({torch.get_num_threads()} threads)")
    rows = []
    for precision in args.precisions:
        result = bench_precision(model_preset(args.model), precision, args.steps, args.warmup, args.batch, args.seq)
        result["peak_flops_per_s"] = peaks[precision]
        result["mfu_vs_own_dtype_peak"] = round(result["model_flops_per_s"] / peaks[precision], 3)
        result["mfu_vs_fp32_peak"] = round(result["model_flops_per_s"] / peaks["fp32"], 3)
        rows.append(result)
    table = Table(title=f"SFT training, {args.model}, batch {args.batch} × seq {args.seq}")
    for col in ("precision", "step s", "tokens/s", "model GFLOP/s", "MFU (own-dtype peak)", "MFU (fp32 peak)"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["precision"], f"{r['step_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                      f"{r['model_flops_per_s'] / 1e9:.1f}", f"{r['mfu_vs_own_dtype_peak']:.0%}",
                      f"{r['mfu_vs_fp32_peak']:.0%}")
    console.print(table)
    write_json(args.out, {"model": args.model, "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
                                 "peaks_flops_per_s": peaks, "results": rows})
    console.print(f"written {args.out}")


if __name__ == "__main__":
    main()
