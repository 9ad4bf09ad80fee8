"""Benchmark: peak resident memory and seconds per PPO update, per precision strategy.

For each strategy (default: fp32, bf16-mixed, int8-frozen, lora, qlora) a *fresh subprocess*:

1. builds the four PPO models from SmolLM2-135M-Instruct the way the strategy holds them
   (the calls the PPO stage is to make, see rlhf_pl.precision)::

       policy    = s.prepare_trainable(load())                      # lora/qlora: adapters (qlora: NF4 base)
       reference = s.reference_from_policy(policy) if s.shares_reference else s.prepare_frozen(load())
       reward    = s.prepare_frozen(RewardModel.from_causal_lm(load(), "linear"))   # int8/nf4/qlora: quantised
       critic    = s.prepare_trainable(Critic(trunk_of(load()), ValueHead(d)))      # lora/qlora: trunk adapters

   loading one model at a time, so at most one float32 copy exists while quantising;
2. hands them to the real PPO update, ``rlhf_pl.stages.ppo.PPOModule``, under a Lightning
   Trainer with ``precision=s.trainer_precision``: per update one rollout of 8 prompts × up to 32
   new tokens (generate, score, reference logprobs, values) and ``ppo_epochs`` (4) × 1 minibatch
   optimisation steps of policy and critic (Adam, the stage's defaults);
3. reports the peak resident set size during the PPO updates (VmHWM, reset after loading; the
   float weights are first copied out of the lazily mapped safetensors files, so that RSS counts
   what the models hold and not file pages of weights that were quantised away), the peak while
   loading (separately: it depends on the loading order, not on the strategy's steady state),
   wall-clock and CPU seconds per update (CPU time is steadier on a shared machine), the RSS after
   the imports (baseline), the weight bytes each model holds, and the median seconds per update
   after ``--warmup`` updates.

The PPO stage holds its models the same way (``rlhf_pl.models.ppo_models.build_models``, from the SFT
and RM outputs); this tool starts policy, reward model and critic from the base model instead, so
that no SFT/RM run is needed (memory and time do not depend on the weights' values), and reuses
the stage's update loop unchanged. Responses may end before 32 tokens
(EOS); the mean response length is reported.

Workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (see MMAP_THRESHOLD). Each strategy runs
without and with activation checkpointing (``model.gradient_checkpointing``):
at 8 × ~250 tokens the saved activations of policy and critic outweigh the weights and optimizer
states, and only checkpointing removes them.

Usage:  python tools/bench_memory.py [--model smollm2_135m|tiny] [--strategies fp32 lora ...]
        [--gc off on] [--updates 1] [--warmup 0] [--out outputs/bench/memory.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rlhf_pl.config import model_preset, model_presets

DEFAULT_STRATEGIES = ["fp32", "bf16-mixed", "int8-frozen", "lora", "qlora"]
RESULT = "BENCH_RESULT "
# glibc's mmap threshold adapts upwards (up to 32 MiB) as large blocks are freed; blocks below it come
# from the heap, whose freed pages stay resident. RSS then depends on the allocation history more than
# on what is alive. A fixed threshold makes tensors >= 128 KiB their own mappings, returned on free.
MMAP_THRESHOLD = 128 * 1024


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    return _status_mb("VmRSS")


def peak_rss_mb() -> float:
    """Peak resident set size since the start or since :func:`reset_peak_rss` (VmHWM), MiB."""
    return _status_mb("VmHWM")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def materialize(*modules) -> None:
    """Copy every float parameter and buffer into process memory and release what is free.

    transformers maps safetensors files lazily (mmap): a float weight is resident only once touched,
    and the pages of a float weight that was quantised away stay counted in the RSS for as long as
    the file stays mapped. After this, RSS = what the models really hold (tied weights stay tied:
    the same Parameter object gets the copy)."""
    import ctypes
    import gc

    import torch

    with torch.no_grad():
        for module in modules:
            if isinstance(module, torch.nn.Module):
                for t in [*module.parameters(), *module.buffers()]:
                    if t.is_floating_point():
                        t.data = t.data.clone()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the allocator keeps freed pages; the measurement is only less tight
        return


def weight_mb(module) -> float:
    """Bytes of a module's parameters and buffers (quantised layers count their packed bytes; tied
    tensors once)."""
    if module is None or not hasattr(module, "state_dict"):
        return 0.0
    tensors = {t.data_ptr(): t.numel() * t.element_size() for t in module.state_dict().values()}
    return sum(tensors.values()) / 2**20


# --- worker (one strategy, fresh process) -------------------------------------------------------


def build_models(strategy_name: str, model_name: str, gradient_checkpointing: bool = False):
    """The four PPO models held per the strategy; loads one float model at a time."""
    from rlhf_pl import registry
    from rlhf_pl.models.critic import Critic, ValueHead
    from rlhf_pl.models.loading import load_causal_lm, load_tokenizer
    from rlhf_pl.models.ppo_models import PPOModels
    from rlhf_pl.models.reward import RewardModel, hidden_size_of, trunk_of

    s = registry.build_by_name("precision", strategy_name)
    s.check("cpu", None, stage="ppo", frozen=("reference", "reward model"))
    cfg = dataclasses.replace(model_preset(model_name), gradient_checkpointing=gradient_checkpointing)
    tokenizer = load_tokenizer(cfg)
    policy = s.prepare_trainable(load_causal_lm(cfg)).train()
    reference = s.reference_from_policy(policy) if s.shares_reference else s.prepare_frozen(load_causal_lm(cfg))
    reward = s.prepare_frozen(RewardModel.from_causal_lm(load_causal_lm(cfg), "linear", tokenizer))
    trunk = trunk_of(load_causal_lm(cfg))  # the critic: a trunk (PPO: the reward model's) + a fresh value head
    critic = s.prepare_trainable(Critic(trunk, ValueHead(hidden_size_of(trunk)))).train()
    models = PPOModels(policy, reference, reward, critic, None, tokenizer, str(cfg.name_or_path),
                       "base model + linear head", str(cfg.name_or_path))
    return s, models


def worker(strategy_name: str, model_key: str, updates: int, warmup: int, batch: int, new_tokens: int,
           gradient_checkpointing: bool) -> dict:
    import lightning as L
    import torch

    from rlhf_pl import registry
    from rlhf_pl.config import PPOConfig
    from rlhf_pl.data.batches import tokenize_prompts
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.stages.ppo import PPOModule

    baseline = rss_mb()
    L.seed_everything(0, verbose=False)
    started = time.perf_counter()
    s, models = build_models(strategy_name, model_key, gradient_checkpointing)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mb()
    materialize(models.policy, models.reference, models.scorer, models.critic)
    after_load = rss_mb()
    if not reset_peak_rss():
        raise RuntimeError("cannot reset the peak RSS counter (/proc/self/clear_refs): peak would include loading")
    weights = {"policy": weight_mb(models.policy), "reference": weight_mb(models.reference),
               "reward": weight_mb(models.scorer), "critic": weight_mb(models.critic)}
    trainable = sum(p.numel() for m in (models.policy, models.critic) for p in m.parameters() if p.requires_grad)

    total = warmup + updates + 1  # stopped after the last measured update (before the stage's final checkpoint)
    # the whole batch in one minibatch: the peak this tool has always measured
    ppo = PPOConfig(updates=total, batch_size=batch, max_new_tokens=new_tokens, sample_every=10**6,
                    checkpoint_every=10**6, ppo_epochs=4, num_minibatches=1,
                    score_baseline="none")  # figures comparable across versions; the baseline adds no gradient memory
    prompts = load_prompts("embedded:prompts")
    items = tokenize_prompts(prompts, models.tokenizer, 256)
    sampler = registry.build_by_name("samplers", "temperature")
    kl = registry.build_by_name("kl_controllers", "adaptive")
    times: list[float] = []
    cpu_times: list[float] = []
    peak: dict[str, float] = {}

    class Timer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch_, batch_idx):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch_, batch_idx):
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)
            if len(times) == warmup + updates:
                peak["mb"] = peak_rss_mb()  # everything up to the end of the last measured update
                trainer.should_stop = True

    with tempfile.TemporaryDirectory() as run_dir:
        module = PPOModule(models, ppo, sampler, kl, prompts, items, 0, Path(run_dir))
        trainer = L.Trainer(accelerator="cpu", devices=1, precision=s.trainer_precision, max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False, num_sanity_val_steps=0, callbacks=[Timer()])
        trainer.fit(module)
    measured = sorted(times[warmup:warmup + updates])
    measured_cpu = sorted(cpu_times[warmup:warmup + updates])
    tokens = module.rows_forwarded["generation_tokens"] / max(1, module.rows_forwarded["reward"])
    return {
        "strategy": strategy_name, "gradient_checkpointing": gradient_checkpointing,
        "trainer_precision": s.trainer_precision, "threads": torch.get_num_threads(),
        "peak_rss_mb": round(peak.get("mb", peak_rss_mb()), 1), "baseline_rss_mb": round(baseline, 1),
        "rss_after_models_mb": round(after_load, 1), "load_peak_rss_mb": round(load_peak, 1),
        "weights_mb": {k: round(v, 1) for k, v in weights.items()},
        "trainable_params": trainable, "load_s": round(load_s, 1),
        "s_per_update": round(measured[len(measured) // 2], 2), "update_times_s": [round(t, 2) for t in times],
        "cpu_s_per_update": round(measured_cpu[len(measured_cpu) // 2], 1),
        "mean_response_tokens": round(tokens, 1),
    }


# --- driver -------------------------------------------------------------------------------------------


def run_strategy(name: str, gc: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", name, "--model", args.model, "--updates", str(args.updates),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--new-tokens", str(args.new_tokens), "--gc", gc]
    env = {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD), **os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"strategy {name}: worker exited with {proc.returncode}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def markdown(rows: list[dict], reference: str = "fp32") -> str:
    """One row per (strategy, checkpointing); "vs fp32" compares with fp32 at the same checkpointing setting."""
    base = {r["gradient_checkpointing"]: r["peak_rss_mb"] for r in rows if r["strategy"] == reference}
    head = ("| precision | grad. checkpointing | peak RSS, PPO update (MiB) | vs fp32 "
            "| weights: policy / ref / RM / critic (MiB) | trainable params | wall s / update | CPU s / update "
            "| peak RSS while loading (MiB) |")
    lines = [head, "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        w, gc = r["weights_mb"], r["gradient_checkpointing"]
        ratio = f"{r['peak_rss_mb'] / base[gc]:.0%}" if gc in base else "–"
        ref = "shared" if w["reference"] == 0 else f"{w['reference']:.0f}"
        lines.append(f"| {r['strategy']} | {'on' if gc else 'off'} | {r['peak_rss_mb']:.0f} | {ratio} "
                     f"| {w['policy']:.0f} / {ref} / {w['reward']:.0f} / {w['critic']:.0f} "
                     f"| {r['trainable_params'] / 1e6:.2f} M | {r['s_per_update']:.1f} "
                     f"| {r.get('cpu_s_per_update', float('nan')):.0f} | {r['load_peak_rss_mb']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=model_presets(), default="smollm2_135m")
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    parser.add_argument("--updates", type=int, default=1, help="measured PPO updates per strategy")
    parser.add_argument("--warmup", type=int, default=0, help="unmeasured updates first")
    parser.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    parser.add_argument("--new-tokens", type=int, default=32, help="max new tokens per response")
    parser.add_argument("--gc", nargs="+", default=["off", "on"], choices=["off", "on"],
                        help="model.gradient_checkpointing settings to run each strategy with")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench/memory.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import logging

        logging.basicConfig(level=logging.WARNING)
        result = worker(args.worker, args.model, args.updates, args.warmup, args.batch, args.new_tokens,
                        args.gc == ["on"])
        print(RESULT + json.dumps(result), flush=True)
        return

    from rlhf_pl.io import write_json

    rows = []
    for gc in args.gc:
        for name in args.strategies:
            started = time.perf_counter()
            rows.append(run_strategy(name, gc, args))
            print(f"{name} (checkpointing {gc}): peak {rows[-1]['peak_rss_mb']:.0f} MiB, "
                  f"{rows[-1]['s_per_update']:.1f} s/update ({time.perf_counter() - started:.0f} s)", flush=True)
            table = markdown(rows)
            write_json(args.out, {"model": args.model, "batch": args.batch, "new_tokens": args.new_tokens,
                                  "updates": args.updates, "warmup": args.warmup, "results": rows, "table_md": table})
    print(f"\nPPO update, {args.model}, {args.batch} prompts × {args.new_tokens} new tokens, "
          f"{rows[0]['threads']} threads\n\n{table}\n\nwritten {args.out}")


if __name__ == "__main__":
    main()
