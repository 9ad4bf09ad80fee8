"""Specs of the built-in plugins: names, config dataclasses, factory paths.

This module stays light (dataclasses only): it is imported to list plugins and to register their
configs with Hydra. The implementations are imported only when a plugin is selected.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

from rlhf_pl.config import setting
from rlhf_pl.errors import ConfigError
from rlhf_pl.registry import PluginSpec

# --- samplers (rlhf_pl.samplers) -------------------------------------------------------------


@dataclass
class TemperatureSamplerConfig:
    temperature: float = setting(0.7, gt=0)  # logits are divided by it before sampling and before computing RL logprobs


@dataclass
class TopKSamplerConfig:
    temperature: float = setting(0.7, gt=0)
    k: int = setting(50, ge=1)  # keep the k most likely tokens


@dataclass
class TopPSamplerConfig:
    temperature: float = setting(0.7, gt=0)
    p: float = setting(0.9, gt=0, le=1)  # keep the smallest set of tokens whose probability mass reaches p


TEMPERATURE_SAMPLER = PluginSpec(
    "temperature", TemperatureSamplerConfig, "rlhf_pl.plugins.samplers:TemperatureSampler",
    "multinomial sampling from softmax(logits / T)",
)
TOP_K_SAMPLER = PluginSpec("top_k", TopKSamplerConfig, "rlhf_pl.plugins.samplers:TopKSampler", "top-k sampling")
TOP_P_SAMPLER = PluginSpec("top_p", TopPSamplerConfig, "rlhf_pl.plugins.samplers:TopPSampler",
                           "nucleus (top-p) sampling")

# --- precision (rlhf_pl.precision) -----------------------------------------------------------


@dataclass
class FP32Config:
    """No settings."""


@dataclass
class BF16MixedConfig:
    """No settings."""


@dataclass
class FP16MixedConfig:
    """No settings."""


@dataclass
class AutoPrecisionConfig:
    """No settings: ``bf16-mixed`` where the device has native bfloat16 matmuls, else ``fp32``."""


AUTO_PRECISION = PluginSpec(
    "auto", AutoPrecisionConfig, "rlhf_pl.precision:AutoPrecision",
    "bf16-mixed where bfloat16 matmuls are native (CUDA with bf16, CPU with AVX512-BF16/AMX), else fp32",
)
FP32 = PluginSpec("fp32", FP32Config, "rlhf_pl.precision:FullPrecision", "float32 weights and compute")
BF16_MIXED = PluginSpec(
    "bf16-mixed", BF16MixedConfig, "rlhf_pl.precision:BF16Mixed",
    "float32 weights, bfloat16 autocast compute (CPU and GPU)",
)
FP16_MIXED = PluginSpec(
    "fp16-mixed", FP16MixedConfig, "rlhf_pl.precision:FP16Mixed",
    "float32 weights, float16 autocast with loss scaling (CUDA only)",
)


# Quantising and adapter strategies (rlhf_pl.precision; the heavy lifting is in
# rlhf_pl.models.adapters). `compute` is the Lightning precision of the compute of trained models:
# fp32 (32-true) | bf16-mixed | fp16-mixed (CUDA only). LoRA target modules: "all-linear" means every
# linear projection of the attention and MLP blocks (Llama: q_proj, k_proj, v_proj, o_proj,
# gate_proj, up_proj, down_proj); the output layer (lm_head) is never adapted. Any list of module
# names (last name component, e.g. [q_proj, v_proj]) may be given instead.


COMPUTE_CHOICES = ("fp32", "bf16-mixed", "fp16-mixed")  # `compute` of the strategies below


def _all_linear() -> List[str]:
    return ["all-linear"]


@dataclass
class Int8FrozenConfig:
    """Frozen models (PPO's reference and reward model) held in 8 bits (LLM.int8, bitsandbytes);
    trained models stay float32. Needs a stage with frozen models (not sft/rm)."""

    # fp32 | bf16-mixed | fp16-mixed (CUDA only): compute of the trained models
    compute: str = setting("fp32", choices=COMPUTE_CHOICES)
    # LLM.int8 outlier threshold: activation columns above it run in 16 bits; 0 = all int8
    threshold: float = setting(6.0, ge=0)


@dataclass
class NF4FrozenConfig:
    """Frozen models (PPO's reference and reward model) held in 4-bit NF4 (bitsandbytes); trained
    models stay float32. Needs a stage with frozen models (not sft/rm)."""

    # fp32 | bf16-mixed | fp16-mixed (CUDA only); also the dtype NF4 weights are dequantized to
    compute: str = setting("fp32", choices=COMPUTE_CHOICES)
    double_quant: bool = True  # quantize the per-block scales too (QLoRA's double quantization)


@dataclass
class LoRAPrecisionConfig:
    """Trained models (policy, critic, reward model) get LoRA adapters (peft) on frozen float32
    weights; their heads stay fully trained. In PPO the reference is the policy with its adapter
    disabled (no second copy). Frozen models stay float32."""

    compute: str = setting("fp32", choices=COMPUTE_CHOICES)  # fp32 | bf16-mixed | fp16-mixed (CUDA only)
    r: int = setting(8, ge=1)  # adapter rank: each adapted W (out×in) gets B (out×r)·A (r×in); r·(in+out) parameters
    alpha: float = setting(16.0, gt=0)  # the update is scaled by alpha / r
    dropout: float = setting(0.0, ge=0, lt=1)  # dropout on the adapter's input (0: deterministic, as RLHF wants)
    # "all-linear" (see above) or module names
    target_modules: List[str] = setting(default_factory=_all_linear, min_length=1)
    # true: exports are plain models with W + (alpha/r)·B·A; false: adapter-only exports (later stages cannot start
    # from them)
    merge_on_export: bool = True


@dataclass
class QLoRAPrecisionConfig:
    """LoRA adapters (as ``lora``) on a 4-bit NF4 base; frozen models are NF4 as well. The merged
    export dequantizes the base to float32 and adds the adapters."""

    # fp32 | bf16-mixed | fp16-mixed (CUDA only); also the dtype NF4 weights are dequantized to
    compute: str = setting("fp32", choices=COMPUTE_CHOICES)
    r: int = setting(8, ge=1)
    alpha: float = setting(16.0, gt=0)
    dropout: float = setting(0.0, ge=0, lt=1)
    target_modules: List[str] = setting(default_factory=_all_linear, min_length=1)
    merge_on_export: bool = True
    double_quant: bool = True  # quantize the per-block scales too


INT8_FROZEN = PluginSpec(
    "int8-frozen", Int8FrozenConfig, "rlhf_pl.precision:Int8Frozen",
    "frozen models (reference, reward model) in 8 bits; trained models float32",
)
NF4_FROZEN = PluginSpec(
    "nf4-frozen", NF4FrozenConfig, "rlhf_pl.precision:NF4Frozen",
    "frozen models (reference, reward model) in 4-bit NF4; trained models float32",
)
LORA = PluginSpec(
    "lora", LoRAPrecisionConfig, "rlhf_pl.precision:LoRA",
    "LoRA adapters on frozen float32 weights; PPO reference = adapter disabled",
)
QLORA = PluginSpec(
    "qlora", QLoRAPrecisionConfig, "rlhf_pl.precision:QLoRA",
    "LoRA adapters on a 4-bit NF4 base; frozen models NF4",
)

# --- generation backends (rlhf_pl.generation) ------------------------------------------------


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's modes
# torch.compile backends: inductor generates fused kernels; aot_eager captures the same graph (same guards, the
# parameters as graph inputs) and runs it with eager kernels: no code generation, compiles in a fraction of the time
COMPILE_BACKENDS = ("inductor", "aot_eager")


@dataclass
class HFGenerationConfig:
    """The sampling loop on transformers' ``DynamicCache`` (one cached step per token)."""

    # drop the ended rows from the cache once half of a batch has ended, so that a few long answers do not decode
    # the finished ones along (the same random draws; docs/generation.md)
    compact: bool = True


@dataclass
class StaticGenerationConfig:
    """A KV cache preallocated for prompt + new tokens (transformers' ``StaticLayer``), the decode step
    compiled with ``torch.compile``."""

    compile: bool = True  # compile the decode step (false: the same static-cache loop, run eagerly)
    backend: str = setting("inductor", choices=COMPILE_BACKENDS)  # torch.compile backend: inductor | aot_eager
    # torch.compile mode (inductor only): default | reduce-overhead (CUDA graphs; on the CPU as default) |
    # max-autotune | max-autotune-no-cudagraphs
    mode: str = setting("default", choices=COMPILE_MODES)
    # cache length = prompt + max_new_tokens rounded up to a multiple of this: prompts of lengths within one
    # bucket share a compiled graph (a larger bucket recompiles less; every step attends over all the cache's
    # columns, so it also attends over more empty ones)
    cache_bucket: int = setting(32, ge=1)
    # compiled decode graphs in the process (one per model structure × batch rows × cache length × dtype); one
    # more is an error naming this key, never a silent fall-back to eager
    recompile_limit: int = setting(16, ge=1)

    def __post_init__(self) -> None:
        for key, choices in (("backend", COMPILE_BACKENDS), ("mode", COMPILE_MODES)):
            if getattr(self, key) not in choices:
                raise ConfigError(f"generation.{key}={getattr(self, key)!r}: choose one of: {', '.join(choices)}")
        for key in ("cache_bucket", "recompile_limit"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"generation.{key}={value!r}: must be an integer >= 1")
        if self.backend != "inductor" and self.mode != "default":
            raise ConfigError(f"generation.mode={self.mode!r} is a mode of the inductor backend; with "
                              f"generation.backend={self.backend!r} use generation.mode=default")


HF_GENERATION = PluginSpec(
    "hf", HFGenerationConfig, "rlhf_pl.generation:HFGeneration",
    "transformers' DynamicCache, one eager cached step per token",
)
STATIC_GENERATION = PluginSpec(
    "static", StaticGenerationConfig, "rlhf_pl.generation:StaticGeneration",
    "preallocated static KV cache, decode step compiled with torch.compile",
)
