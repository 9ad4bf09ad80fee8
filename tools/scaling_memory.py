"""Memory per GPU of PPO's four models, per strategy and precision, for policies of 135M to 70B
parameters; what fits on 80 GB GPUs; and where an update's time goes, scaled from the CPU profile.

Parameter counts come from each architecture's published config dimensions (hidden size, layers,
attention and KV heads, MLP size, vocabulary, tied embeddings), never from a typed-in total.

Bytes per parameter (``B`` = bytes, ``N`` = GPUs the model is sharded over):

- trained model (policy, critic), Adam: fp32 = weights 4 + gradients 4 + Adam moments 8 = 16;
  bf16-mixed = fp32 master weights 4 + bf16 compute copy 2 + fp32 gradients 4 + Adam 8 = 18
  (DDP: Lightning's autocast keeps the fp32 weights and casts them for the matmuls). DDP keeps all
  of it on every GPU; ZeRO-2 (DeepSpeed stage 2, FSDP SHARD_GRAD_OP) keeps the compute copy whole
  and shards the rest (gradients bf16 under mixed precision, as DeepSpeed keeps them); ZeRO-3
  (FSDP FULL_SHARD, DeepSpeed stage 3) shards everything (16/N under both precisions), plus two
  gathered decoder layers in the compute dtype (the one running and the one prefetched).
- frozen model (reference, reward model): weights only; fp32 4; bf16-mixed: transformer linear
  weights 2, the rest (embeddings, norms, output layer, heads) 4, as ``rlhf_pl.precision`` stores
  them; int8-frozen: linear weights 1 + one fp32 scale per output row; nf4: 0.5 per linear weight
  + block scales (blocks of 64: an fp32 absmax each, or with double quantisation an 8-bit one plus
  an fp32 scale per 256 blocks). Frozen models are not sharded (``trainer=fsdp``: every process
  holds them); the ``zero3-all`` rows shard them too, which no preset does (see docs/scaling.md).
- lora / qlora: the trained model's base is frozen (fp32, or NF4 under qlora) and sharded with it
  under FSDP; adapters r·(in+out) per adapted linear (all of a layer's linears) and the value/reward
  head are trained (16 B/param); the reference is the policy with adapters off (no memory).

Activations (one micro-batch of ``batch`` sequences of ``length`` tokens per GPU, bf16, a fused
attention kernel that saves no (length × length) matrix): per decoder layer and token the tensors
saved for backward, 6·hidden + 2·kv_dim + 4·intermediate elements (two norms' inputs and outputs,
q, k, v, the attention output, the MLP's gate, up, activation and product), plus the output layer's
logits (bf16 logits, their fp32 copy and the fp32 log-softmax: 10 B per vocabulary entry). With
activation checkpointing: each layer's input (hidden) plus one layer's full activations.

Usage::

    python tools/scaling_memory.py                        # the tables, in the terminal
    python tools/scaling_memory.py --markdown docs/scaling_tables.md
    python tools/scaling_memory.py --batch 8 --length 2048 --gpus 8
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

GIB = 2**30
GPU_GIB = 80.0  # an 80 GB A100/H100 (81,920 MiB)
USABLE = 0.9  # of it for the models and activations: CUDA context, NCCL buffers, allocator fragmentation
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STRATEGIES = ("ddp", "zero2", "zero3", "zero3-all")
PRECISIONS = ("fp32", "bf16-mixed", "int8-frozen", "nf4-frozen", "lora", "qlora")
# what the presets refuse (rlhf_pl.strategies): PPO's lora and qlora under sharding; and sharding int8/nf4 frozen
# models, which zero3-all would do
REFUSED = ({(s, p) for s in ("zero2", "zero3", "zero3-all") for p in ("lora", "qlora")}
           | {("zero3-all", "int8-frozen"), ("zero3-all", "nf4-frozen")})
MODELS = ("policy", "critic", "reference", "reward model")


@dataclass(frozen=True)
class Architecture:
    """A Llama-family decoder's published config dimensions."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # output layer shares the embedding matrix

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def layer_linears(self) -> list[tuple[int, int]]:
        """(in, out) of the linears of one decoder layer: q, k, v, o, gate, up, down."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


# config.json of each model on the Hugging Face hub
ARCHITECTURES = {
    "135M": Architecture("SmolLM2-135M", 576, 30, 9, 3, 1536, 49152, True),
    "1B": Architecture("Llama-3.2-1B", 2048, 16, 32, 8, 8192, 128256, True),
    "7B": Architecture("Llama-2-7B", 4096, 32, 32, 32, 11008, 32000, False),
    "70B": Architecture("Llama-2-70B", 8192, 80, 64, 8, 28672, 32000, False),
}


class ParamCounts(NamedTuple):
    """Parameters of one model by kind (a causal LM, or a trunk with a scalar head)."""

    linear: int  # transformer linear weights (quantised / stored in bf16 when frozen)
    linear_rows: int  # their output rows (one int8 scale each)
    other: int  # embeddings, norms, output layer, heads: kept float32
    adapters: int  # LoRA adapter parameters for rank r on every linear (0 without)
    layer: int  # one decoder layer's parameters (what FSDP gathers at a time)
    head: int  # the scalar head (reward / value), fully trained under lora too; 0 for a causal LM

    @property
    def total(self) -> int:
        return self.linear + self.other


def param_counts(arch: Architecture, *, head: bool = False, lora_r: int = 8) -> ParamCounts:
    """Counts for the causal LM (``head=False``: embeddings, layers, final norm, output layer unless
    tied) or the reward model / critic (``head=True``: the trunk without the output layer, plus a
    scalar head of hidden + 1)."""
    linears = arch.layer_linears()
    per_layer_linear = sum(i * o for i, o in linears)
    norms = 2 * arch.hidden * arch.layers + arch.hidden
    embedding = arch.vocab * arch.hidden
    output = arch.hidden + 1 if head else (0 if arch.tied else arch.vocab * arch.hidden)
    adapters = lora_r * sum(i + o for i, o in linears) * arch.layers
    return ParamCounts(
        linear=per_layer_linear * arch.layers, linear_rows=sum(o for _, o in linears) * arch.layers,
        other=embedding + norms + output, adapters=adapters, layer=per_layer_linear + 2 * arch.hidden,
        head=arch.hidden + 1 if head else 0)


def nf4_bytes_per_weight(double_quant: bool = True) -> float:
    """0.5 B per weight + block scales: 4 B per 64 weights, or 1 B per 64 + 4 B per 64·256 (double)."""
    return 0.5 + (1 / 64 + 4 / (64 * 256) if double_quant else 4 / 64)


def frozen_bytes(counts: ParamCounts, precision: str) -> float:
    """Bytes of a frozen model held as ``precision`` holds it (linears stored/quantised, rest fp32)."""
    if precision in ("fp32", "lora"):
        return 4.0 * counts.total
    if precision == "bf16-mixed":
        return 2.0 * counts.linear + 4.0 * counts.other
    if precision == "int8-frozen":
        return 1.0 * counts.linear + 4.0 * counts.linear_rows + 4.0 * counts.other
    if precision in ("nf4-frozen", "qlora"):
        return nf4_bytes_per_weight() * counts.linear + 4.0 * counts.other
    raise ValueError(f"precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")


class TrainedBytes(NamedTuple):
    """A trained model's memory on one GPU, by component (bytes)."""

    weights: float  # what the forward reads: fp32 weights, or the frozen base under lora/qlora
    compute_copy: float  # bf16 copy of fp32 weights under mixed precision (0 in fp32)
    gradients: float
    optimizer: float  # Adam's two moments
    gathered: float  # ZeRO-3: two decoder layers gathered whole

    @property
    def total(self) -> float:
        return self.weights + self.compute_copy + self.gradients + self.optimizer + self.gathered


def trained_bytes(counts: ParamCounts, precision: str, strategy: str, gpus: int) -> TrainedBytes:
    """A trained model's bytes per GPU under ``strategy`` over ``gpus`` GPUs (see the module doc)."""
    n = gpus if strategy in ("zero3", "zero3-all") else 1
    shard = gpus if strategy != "ddp" else 1  # ZeRO-2 and ZeRO-3 shard gradients and optimizer states
    if precision in ("lora", "qlora"):
        base = frozen_bytes(counts, "qlora" if precision == "qlora" else "fp32")
        trained = counts.adapters + counts.head  # the base (and the head's weights) are in `base`
        return TrainedBytes(base / n + 4.0 * counts.adapters / n, 0.0, 4.0 * trained / shard, 8.0 * trained / shard,
                            0.0)
    mixed = precision == "bf16-mixed"
    p = counts.total
    if strategy == "ddp":
        return TrainedBytes(4.0 * p, 2.0 * p if mixed else 0.0, 4.0 * p, 8.0 * p, 0.0)
    if strategy == "zero2":  # compute copy whole; master, gradients, Adam sharded
        if mixed:
            return TrainedBytes(4.0 * p / shard, 2.0 * p, 2.0 * p / shard, 8.0 * p / shard, 0.0)
        return TrainedBytes(4.0 * p, 0.0, 4.0 * p / shard, 8.0 * p / shard, 0.0)
    return TrainedBytes(4.0 * p / n, 0.0, 4.0 * p / n, 8.0 * p / n, 2 * counts.layer * (2.0 if mixed else 4.0))


def activation_bytes(arch: Architecture, batch: int, length: int, *, checkpointing: bool,
                     logits: bool = True) -> float:
    """Activations saved for backward in one micro-batch (bf16; see the module doc). ``logits``:
    the causal LM's output layer (the critic and reward model end in a scalar)."""
    tokens = batch * length
    per_layer = (6 * arch.hidden + 2 * arch.kv_dim + 4 * arch.intermediate) * 2.0 * tokens
    kept = arch.layers * arch.hidden * 2.0 * tokens + per_layer if checkpointing else arch.layers * per_layer
    return kept + (10.0 * arch.vocab * tokens if logits else 0.0)


def kv_cache_bytes(arch: Architecture, batch: int, length: int) -> float:
    """The rollout's KV cache in bf16: keys and values of every layer for ``batch`` × ``length`` tokens."""
    return 2 * arch.layers * arch.kv_dim * 2.0 * batch * length


@dataclass(frozen=True)
class PPOMemory:
    """Memory per GPU (bytes) of PPO's models and activations for one size, precision, strategy, GPU count."""

    size: str
    precision: str
    strategy: str
    gpus: int
    policy: float
    critic: float
    reference: float
    reward_model: float
    activations: float  # the policy's (larger than the critic's: it has logits), with activation checkpointing
    activations_full: float  # the same without checkpointing

    @property
    def models(self) -> float:
        return self.policy + self.critic + self.reference + self.reward_model

    @property
    def total(self) -> float:
        return self.models + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= GPU_GIB * USABLE * GIB


def ppo_memory(size: str, precision: str, strategy: str, gpus: int, *, batch: int = 4, length: int = 1024,
               lora_r: int = 8) -> PPOMemory:
    """The four PPO models' memory per GPU (policy and critic trained, reference and reward model
    frozen; critic = reward model trunk + value head, as ``ppo.critic=separate``)."""
    arch = ARCHITECTURES[size]
    lm, trunk = param_counts(arch, lora_r=lora_r), param_counts(arch, head=True, lora_r=lora_r)
    policy = trained_bytes(lm, precision, strategy, gpus).total
    critic = trained_bytes(trunk, precision, strategy, gpus).total
    shared_reference = precision in ("lora", "qlora")
    frozen_div = gpus if strategy == "zero3-all" else 1
    reference = 0.0 if shared_reference else frozen_bytes(lm, precision) / frozen_div
    reward = frozen_bytes(trunk, precision) / frozen_div
    # the policy's (with its logits) is the larger; policy and critic run their backward one after the other
    act = [activation_bytes(arch, batch, length, checkpointing=c) for c in (True, False)]
    return PPOMemory(size, precision, strategy, gpus, policy, critic, reference, reward, act[0], act[1])


def fewest_gpus(size: str, precision: str, strategy: str, **kwargs) -> int | None:
    """The fewest 80 GB GPUs (of :data:`GPU_COUNTS`) on which this configuration fits, or None."""
    for gpus in GPU_COUNTS:
        if ppo_memory(size, precision, strategy, gpus, **kwargs).fits:
            return gpus
    return None


# --- where time goes ---------------------------------------------------------------------------------

# docs/benchmarks.md, tools/bench_ppo.py (2026-11-30): SmolLM2-135M, bf16-mixed, 8 prompts x 32 new tokens,
# 1 PPO epoch, separate critic; seconds per phase of one update on the 2-core CPU
CPU_PROFILE = {"generation": 2.78, "scoring": 0.69, "reference": 0.79, "policy": 0.81, "values": 0.75,
               "optimisation": 4.51}
# the prompts' mean length is not printed; 62 tokens is what the optimisation phase's MFU implies (55.1% of
# 404 GFLOP/s for 4.51 s = 6 x (trunk linears x 8 x (p + 32) x 2 models + output layer x 8 x 32) -> p = 62)
PROFILE_SETTING = {"prompts": 8, "prompt_length": 62, "new_tokens": 32, "epochs": 1}
# GPU roofline assumptions (H100 SXM, bf16): dense peak, HBM bandwidth, the fractions reached
GPU_PEAK_FLOPS, GPU_BANDWIDTH, GPU_MFU, GPU_BANDWIDTH_USE = 989e12, 3.35e12, 0.4, 0.8


def phase_flops(size: str, prompts: int, prompt_length: int, new_tokens: int, epochs: int) -> dict[str, float]:
    """Matmul FLOPs of each phase of one PPO update: 2 per matmul weight and token forward, 6
    forward + backward; the output layer over response tokens only (as tools/bench_ppo.py counts).
    prefill = the prompts once (output layer on the last column); decode = one step per new token;
    scoring, values = the trunk over prompt + response; reference, policy = the causal LM;
    optimisation = policy and critic forward + backward per epoch."""
    arch = ARCHITECTURES[size]
    linear, head = param_counts(arch).linear, arch.vocab * arch.hidden
    seq, resp = prompts * (prompt_length + new_tokens), prompts * new_tokens
    lm, trunk = 2.0 * (linear * seq + head * resp), 2.0 * linear * seq
    return {"prefill": 2.0 * (linear * prompts * prompt_length + head * prompts),
            "decode": 2.0 * (linear + head) * resp, "scoring": trunk, "reference": lm, "policy": lm,
            "values": trunk, "optimisation": 3.0 * (lm + trunk) * epochs}


def decode_step_bytes(size: str, prompts: int, context: int) -> float:
    """What one decode step reads: the bf16 weights once, and the KV cache of ``prompts`` rows of
    ``context`` tokens."""
    arch = ARCHITECTURES[size]
    return 2.0 * param_counts(arch).total + kv_cache_bytes(arch, prompts, context)


def _mean_context(setting: dict[str, int]) -> int:
    return setting["prompt_length"] + setting["new_tokens"] // 2


def scaled_seconds(size: str, **setting: int) -> dict[str, float]:
    """Seconds per phase for ``size`` at ``setting`` on the profiled CPU. Forward and training phases
    run at the FLOP rate they reached in :data:`CPU_PROFILE` (135M): time = FLOPs / rate. Generation
    = prefill at the reference pass's rate + one decode step per new token, each step the slower of
    (a) the bytes it reads (:func:`decode_step_bytes`, at the mean context) at the byte rate of the
    profile's steps (a step reads every weight for a few rows: memory-bound) and (b) its FLOPs at the
    forward rate (large batches)."""
    base = phase_flops("135M", **PROFILE_SETTING)
    rate = {phase: base[phase] / seconds for phase, seconds in CPU_PROFILE.items() if phase != "generation"}
    step_s = (CPU_PROFILE["generation"] - base["prefill"] / rate["reference"]) / PROFILE_SETTING["new_tokens"]
    byte_rate = decode_step_bytes("135M", PROFILE_SETTING["prompts"], _mean_context(PROFILE_SETTING)) / step_s
    flops = phase_flops(size, **setting)
    step = max(decode_step_bytes(size, setting["prompts"], _mean_context(setting)) / byte_rate,
               flops["decode"] / setting["new_tokens"] / rate["reference"])
    out = {"generation": flops["prefill"] / rate["reference"] + step * setting["new_tokens"]}
    out.update({phase: flops[phase] / rate[phase] for phase in CPU_PROFILE if phase != "generation"})
    return out


def gpu_seconds(size: str, **setting: int) -> dict[str, float]:
    """The same phases on one H100-class GPU by roofline (assumptions: :data:`GPU_PEAK_FLOPS` at
    :data:`GPU_MFU`; a decode step reads :func:`decode_step_bytes` at :data:`GPU_BANDWIDTH_USE` of
    :data:`GPU_BANDWIDTH`, or takes its FLOPs' time if longer). No measurement behind it and no
    per-step launch overhead in it: a lower bound for generation, for the shape, not the figures."""
    flops = phase_flops(size, **setting)
    rate = GPU_PEAK_FLOPS * GPU_MFU
    read = decode_step_bytes(size, setting["prompts"], _mean_context(setting)) / (GPU_BANDWIDTH * GPU_BANDWIDTH_USE)
    step = max(read, flops["decode"] / setting["new_tokens"] / rate)
    out = {"generation": flops["prefill"] / rate + step * setting["new_tokens"]}
    out.update({phase: flops[phase] / rate for phase in CPU_PROFILE if phase != "generation"})
    return out


# --- tables ------------------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / GIB:,.1f}"


def params_table(lora_r: int = 8) -> str:
    rows = ["| size | model | hidden | layers | heads (KV) | MLP | vocabulary | tied | policy params | "
            "RM / critic params | LoRA r=8 adapters |", "|---|---|---:|---:|---|---:|---:|---|---:|---:|---:|"]
    for size, a in ARCHITECTURES.items():
        lm, trunk = param_counts(a, lora_r=lora_r), param_counts(a, head=True, lora_r=lora_r)
        rows.append(f"| {size} | {a.name} | {a.hidden} | {a.layers} | {a.heads} ({a.kv_heads}) | {a.intermediate} | "
                    f"{a.vocab} | {'yes' if a.tied else 'no'} | {lm.total:,} | {trunk.total:,} | {lm.adapters:,} |")
    return "\n".join(rows)


def memory_table(size: str, gpus: int, **kwargs) -> str:
    """GiB per GPU of each model over ``gpus`` GPUs, per precision and strategy; the fewest GPUs that fit."""
    rows = [f"| precision | strategy | policy | critic | reference | reward model | activations (ckpt / none) | "
            f"total on {gpus} GPUs | fewest 80 GB GPUs |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for precision in PRECISIONS:
        for strategy in STRATEGIES:
            if (strategy, precision) in REFUSED:
                continue
            m = ppo_memory(size, precision, strategy, gpus, **kwargs)
            fewest = fewest_gpus(size, precision, strategy, **kwargs)
            rows.append(f"| {precision} | {strategy} | {_gib(m.policy)} | {_gib(m.critic)} | {_gib(m.reference)} | "
                        f"{_gib(m.reward_model)} | {_gib(m.activations)} / {_gib(m.activations_full)} | "
                        f"**{_gib(m.total)}** | {fewest if fewest else 'none'} |")
    return "\n".join(rows)


def time_table(**setting: int) -> str:
    rows = ["| size | generation | scoring | reference | policy | values | optimisation | s / update | "
            "generation share | GPU roofline: s / update, generation share |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for size in ARCHITECTURES:
        s, g = scaled_seconds(size, **setting), gpu_seconds(size, **setting)
        total, gpu_total = sum(s.values()), sum(g.values())
        rows.append(f"| {size} | " + " | ".join(f"{s[p]:,.1f}" for p in CPU_PROFILE)
                    + f" | {total:,.1f} | {s['generation'] / total:.0%} | {gpu_total:.3g}, "
                      f"{g['generation'] / gpu_total:.0%} |")
    return "\n".join(rows)


def report(gpus: int, batch: int, length: int, lora_r: int) -> str:
    """All tables as Markdown."""
    kwargs = dict(batch=batch, length=length, lora_r=lora_r)
    parts = ["## Parameter counts (from the config dimensions)", "", params_table(lora_r), ""]
    for size in ARCHITECTURES:
        parts += [f"## {size} ({ARCHITECTURES[size].name}): GiB per GPU, {gpus} GPUs, micro-batch {batch} x "
                  f"{length} tokens", "", memory_table(size, gpus, **kwargs), ""]
    parts += ["## Rollout KV cache (bf16), per GPU", "", "| size | 16 x 1024 tokens | 64 x 2048 tokens |",
              "|---|---:|---:|"]
    parts += [f"| {size} | {_gib(kv_cache_bytes(a, 16, 1024))} | {_gib(kv_cache_bytes(a, 64, 2048))} |"
              for size, a in ARCHITECTURES.items()]
    for setting in (PROFILE_SETTING, {"prompts": 64, "prompt_length": 256, "new_tokens": 256, "epochs": 1},
                    {"prompts": 512, "prompt_length": 256, "new_tokens": 256, "epochs": 4}):
        parts += ["", f"## Seconds per PPO update at the CPU profile's FLOP rates: {setting['prompts']} prompts x "
                  f"{setting['prompt_length']} + {setting['new_tokens']} new tokens, {setting['epochs']} epoch", "",
                  time_table(**setting)]
    return "\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=int, default=8, help="GPUs per table (default 8)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch per GPU (default 4)")
    parser.add_argument("--length", type=int, default=1024, help="tokens per sequence (default 1024)")
    parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank (default 8, precision.r's default)")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    if min(args.gpus, args.batch, args.length, args.lora_r) < 1:
        parser.error("--gpus, --batch, --length and --lora-r must be >= 1")
    text = report(args.gpus, args.batch, args.length, args.lora_r)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
