"""Benchmark one PPO update on SmolLM2-135M: seconds per update, tokens/s per phase, forward counts, MFU.

Setting (the issue's): 8 prompts × 32 new tokens, 1 PPO epoch × 1 minibatch, separate critic, on
the CPU, for ``fp32`` and ``bf16-mixed``. The policy is SmolLM2-135M-Instruct (the embedded default
model, loaded offline through rlhf_pl's cache); the reward model is its trunk with a fresh linear
head (timing only: the scores are meaningless); the critic is a copy of that trunk with a fresh
value head. EOS is banned while sampling so that every response has exactly 32 tokens.

Each precision runs ``--warmup`` updates (not measured), then ``--updates`` measured ones, through
the real :class:`rlhf_pl.stages.ppo.PPOModule` in a Lightning ``Trainer``, with the frozen models held
by the precision strategy as in a run (bf16-mixed: their linear weights stored in bfloat16). Reported per phase:

- generation: new tokens / s (b·n per update; one policy call per new token, KV cache);
- scoring, reference, policy_logprobs, values: sequence tokens / s (b·(p + n) per pass);
- optimisation: sequence tokens / s through policy + critic forward and backward;
- forward calls and rows per model and phase (hooks on the four models), checked against "one
  forward pass per purpose": generation 1 policy call per new token; scoring, reference, policy
  logprobs, values 1 call each over the b rows; optimisation 1 policy + 1 critic call per minibatch;
- model-FLOP utilisation of the optimisation phase: 6·(matmul parameters used)·tokens / time,
  against the machine's matmul peak measured in the same process before and after the updates
  (square matmuls, same dtype; the best short window of either measurement).

The process retains freed memory as ``python -m rlhf_pl`` runs do (:mod:`rlhf_pl.runtime`);
``--no-retain-freed-memory`` measures the allocator's default.

Usage::

    python tools/bench_ppo.py [--out outputs/bench_ppo.json] [--updates 3] [--warmup 1] [--precision fp32 bf16-mixed]
                              [--model smollm2_135m|tiny] [--no-retain-freed-memory] [<config override> ...]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra import compose, initialize_config_module
from torch import nn

from rlhf_pl import registry
from rlhf_pl.config import PPOConfig, register_configs
from rlhf_pl.data.batches import tokenize_prompts
from rlhf_pl.data.formats import load_prompts
from rlhf_pl.models.critic import Critic, ValueHead, freeze
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.models.ppo_models import PPOModels
from rlhf_pl.models.reward import RewardModel, hidden_size_of, trunk_of
from rlhf_pl.plugins.kl_controllers import AdaptiveKLController
from rlhf_pl.plugins.samplers import NoEOSSampler
from rlhf_pl.runtime import matmul_peak, retain_freed_memory
from rlhf_pl.stages.ppo import PPOModule

PHASES = ("generation", "scoring", "reference", "policy_logprobs", "values", "optimisation")
PRECISIONS = {"fp32": ("32-true", torch.float32), "bf16-mixed": ("bf16-mixed", torch.bfloat16)}


class BenchModule(PPOModule):
    """The stage's module, recording the current phase (for the forward hooks), without checkpoints."""

    phase = "other"

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        with super().timed(phase):
            yield
        self.phase = previous

    def save_checkpoint(self):
        return None


def build_models(model_cfg: Any) -> PPOModels:
    """SmolLM2 policy, its frozen reference, a reward model (trunk + fresh linear head) and a critic."""
    policy, tokenizer, source = load_model_and_tokenizer(model_cfg)
    print(f"model: {source}")
    reference = freeze(copy.deepcopy(policy))
    reward = freeze(RewardModel.from_causal_lm(copy.deepcopy(policy), "linear", tokenizer))
    trunk = copy.deepcopy(trunk_of(policy)).requires_grad_(True).train()
    critic = Critic(trunk, ValueHead(hidden_size_of(trunk)))
    return PPOModels(policy.train(), reference, reward, critic, None, tokenizer, "base model", "fresh linear head")


def count_forwards(module: BenchModule) -> tuple[dict[tuple[str, str], list[int]], list[Any]]:
    """Forward hooks on the four models: (phase, model) -> [calls, rows, tokens]; and the hook handles."""
    counts: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    models = {"policy": module.policy, "reference": module.reference, "reward": module.scorer.trunk,
              "critic": module.critic.trunk}
    handles = []
    for name, model in models.items():
        def hook(_mod: nn.Module, args: tuple, kwargs: dict, _out: Any, name: str = name) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            entry = counts[(module.phase, name)]
            entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + int(ids.shape[0]), entry[2] + int(ids.numel())
        handles.append(model.register_forward_hook(hook, with_kwargs=True))
    return counts, handles


def matmul_params(module: BenchModule) -> tuple[int, int]:
    """Parameters of the Linear layers of one transformer trunk (attention + MLP), and of the LM head."""
    trunk = trunk_of(module.policy)
    in_trunk = sum(m.weight.numel() for m in trunk.modules() if isinstance(m, nn.Linear))
    return in_trunk, module.policy.get_output_embeddings().weight.numel()


class Snapshot(L.Callback):
    """Phase timings and forward counts at the end of the warm-up and of the last update; update times."""

    def __init__(self, module: BenchModule, counts: dict, warmup: int) -> None:
        self.module, self.counts, self.warmup = module, counts, warmup
        self.snapshots: list[tuple[dict, dict]] = []
        self.update_seconds: list[float] = []
        self.started = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.warmup:
            self.update_seconds.append(time.perf_counter() - self.started)
        if batch_idx == self.warmup - 1 or batch_idx == trainer.num_training_batches - 1:
            self.snapshots.append((dict(self.module.timings), {k: list(v) for k, v in self.counts.items()}))

    def deltas(self) -> tuple[dict[str, float], dict[str, list[int]]]:
        """Seconds per phase and forward counts ``phase/model -> [calls, rows, tokens]`` of the measured updates."""
        (t0, c0), (t1, c1) = self.snapshots
        seconds = {p: t1.get(p, 0.0) - t0.get(p, 0.0) for p in PHASES}
        forwards = {}
        for (phase, model), after in c1.items():
            before = c0.get((phase, model), [0, 0, 0])
            if after[0] > before[0]:
                forwards[f"{phase}/{model}"] = [a - b for a, b in zip(after, before)]
        return seconds, forwards


def run_precision(name: str, models: PPOModels, prompts: list, items: list, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up + measured updates in one Trainer (fresh copies of policy and critic); the measured figures."""
    trainer_precision, dtype = PRECISIONS[name]
    # score_baseline=none: the per-prompt baseline adds one greedy answer per *new* prompt (a cost that
    # falls as prompts repeat), not a phase of the update
    ppo = PPOConfig(updates=args.warmup + args.updates, batch_size=8, max_new_tokens=32, ppo_epochs=1,
                    num_minibatches=1, checkpoint_every=10 ** 6, sample_every=10 ** 6, num_samples=0,
                    score_baseline="none")
    sampler = NoEOSSampler(0.7, models.tokenizer.eos_token_id)
    strategy = registry.build_by_name("precision", name)  # holds the frozen models as a run would
    fresh = models._replace(policy=copy.deepcopy(models.policy), critic=copy.deepcopy(models.critic),
                            reference=strategy.prepare_frozen(copy.deepcopy(models.reference)),
                            scorer=strategy.prepare_frozen(copy.deepcopy(models.scorer)))
    module = BenchModule(fresh, ppo, sampler, AdaptiveKLController(), prompts, items, seed=0,
                         run_dir=Path(tempfile.mkdtemp()))
    counts, handles = count_forwards(module)
    marker = Snapshot(module, counts, args.warmup)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=trainer_precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, callbacks=[marker])
    peak_before = matmul_peak(dtype)
    trainer.fit(module)
    for handle in handles:
        handle.remove()
    seconds, forwards = marker.deltas()
    peak = max(peak_before, matmul_peak(dtype))
    return figures(name, module, seconds, forwards, marker.update_seconds, args.updates, peak)


def figures(name: str, module: BenchModule, seconds: dict, forwards: dict, update_seconds: list, updates: int,
            peak: float) -> dict:
    """Per-phase tokens/s, the one-forward-per-purpose check and the optimisation phase's MFU."""
    b, n = 8, 32
    trunk, head = matmul_params(module)
    tokens = {phase: forwards.get(key, [0, 0, 0])[2] for phase, key in (
        ("scoring", "scoring/reward"), ("reference", "reference/reference"),
        ("policy_logprobs", "policy_logprobs/policy"), ("values", "values/critic"),
        ("optimisation", "optimisation/policy"))}
    train_flops = 6 * (trunk * forwards["optimisation/policy"][2] + head * updates * b * (n + 1)
                       + trunk * forwards["optimisation/critic"][2]
                       + module.critic.head.proj.weight.numel() * updates * b * n)
    per_phase = {"generation": {"seconds": seconds["generation"] / updates,
                                "tokens_per_s": updates * b * n / seconds["generation"]}}
    for phase in ("scoring", "reference", "policy_logprobs", "values", "optimisation"):
        per_phase[phase] = {"seconds": seconds[phase] / updates, "tokens_per_s": tokens[phase] / seconds[phase]}
    per_phase["optimisation"].update(model_flops_per_s=train_flops / seconds["optimisation"],
                                     mfu=train_flops / seconds["optimisation"] / peak)
    expected = {"generation/policy": [n * updates, n * b * updates], "scoring/reward": [updates, b * updates],
                "reference/reference": [updates, b * updates], "policy_logprobs/policy": [updates, b * updates],
                "values/critic": [updates, b * updates], "optimisation/policy": [updates, b * updates],
                "optimisation/critic": [updates, b * updates]}
    calls_rows = {key: value[:2] for key, value in forwards.items()}
    return {"precision": name, "seconds_per_update": sum(update_seconds) / len(update_seconds), "phases": per_phase,
            "forwards": forwards, "forwards_as_expected": calls_rows == expected, "expected_forwards": expected,
            "matmul_peak_flops": peak, "train_flops_per_update": train_flops / updates,
            "trunk_matmul_params": trunk, "lm_head_params": head}


def print_table(results: list[dict]) -> None:
    print(f"\n{'precision':<11}{'phase':<17}{'s/update':>9}{'tokens/s':>11}  notes")
    for r in results:
        for phase, f in r["phases"].items():
            note = f"MFU {100 * f['mfu']:.1f}% of {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s" if "mfu" in f else ""
            print(f"{r['precision']:<11}{phase:<17}{f['seconds']:>9.2f}{f['tokens_per_s']:>11.1f}  {note}")
        print(f"{r['precision']:<11}{'= per update':<17}{r['seconds_per_update']:>9.2f}{'':>11}  "
              f"one forward per purpose: {'yes' if r['forwards_as_expected'] else 'NO ' + json.dumps(r['forwards'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="outputs/bench_ppo.json")
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--precision", nargs="+", default=list(PRECISIONS), choices=list(PRECISIONS))
    parser.add_argument("--model", default="smollm2_135m",
                        help="model config group option (tiny: a smoke test of this tool)")
    parser.add_argument("--no-retain-freed-memory", dest="retain", action="store_false",
                        help="leave glibc's allocator as it is (runs retain freed memory by default)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, e.g. model.chat_template=null (the model's own chat template)")
    args = parser.parse_args()
    retained = args.retain and retain_freed_memory()
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"model={args.model}", *args.overrides])
    L.seed_everything(0, verbose=False)
    models = build_models(cfg.model)
    prompts = load_prompts("embedded:prompts")
    items = tokenize_prompts(prompts, models.tokenizer, cfg.data.max_prompt_length)
    results = [run_precision(name, models, prompts, items, args) for name in args.precision]
    print_table(results)
    machine = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "torch": torch.__version__, "retain_freed_memory": retained}
    setting = {"prompts": 8, "new_tokens": 32, "ppo_epochs": 1, "minibatches": 1, "critic": "separate"}
    report = {"model": args.model, "overrides": args.overrides, "machine": machine, "setting": setting,
              "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
