"""Specs of the built-in plugins: names, config dataclasses, factory paths.

This module stays light (dataclasses only): it is imported to list plugins and to register their
configs with Hydra. The implementations are imported only when a plugin is selected.
"""
from __future__ import annotations

from dataclasses import dataclass

from rlhf_pl.registry import PluginSpec

# --- samplers (rlhf_pl.samplers) -------------------------------------------------------------


@dataclass
class TemperatureSamplerConfig:
    temperature: float = 0.7  # logits are divided by it before sampling (and before computing RL logprobs)


@dataclass
class TopKSamplerConfig:
    temperature: float = 0.7
    k: int = 50  # keep the k most likely tokens


@dataclass
class TopPSamplerConfig:
    temperature: float = 0.7
    p: float = 0.9  # keep the smallest set of tokens whose probability mass reaches p


TEMPERATURE_SAMPLER = PluginSpec(
    "temperature", TemperatureSamplerConfig, "rlhf_pl.plugins.samplers:TemperatureSampler",
    "multinomial sampling from softmax(logits / T)",
)
TOP_K_SAMPLER = PluginSpec("top_k", TopKSamplerConfig, "rlhf_pl.plugins.samplers:TopKSampler", "top-k sampling")
TOP_P_SAMPLER = PluginSpec("top_p", TopPSamplerConfig, "rlhf_pl.plugins.samplers:TopPSampler", "nucleus (top-p) sampling")

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


FP32 = PluginSpec("fp32", FP32Config, "rlhf_pl.plugins.precision:FullPrecision", "float32 weights and compute")
BF16_MIXED = PluginSpec(
    "bf16-mixed", BF16MixedConfig, "rlhf_pl.plugins.precision:BF16Mixed",
    "float32 weights, bfloat16 autocast compute (CPU and GPU)",
)
FP16_MIXED = PluginSpec(
    "fp16-mixed", FP16MixedConfig, "rlhf_pl.plugins.precision:FP16Mixed",
    "float32 weights, float16 autocast with loss scaling (CUDA only)",
)
