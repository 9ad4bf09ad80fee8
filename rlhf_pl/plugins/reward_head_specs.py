"""Specs of the built-in reward heads (plugin kind ``reward_heads``): config dataclasses only.

Light on purpose (no torch import): listing plugins and registering their configs with Hydra
imports this module; :mod:`rlhf_pl.plugins.reward_heads` (the implementations) is imported only
when a head is built. A reward head's factory is called as ``factory(config, hidden_size)``; see
:mod:`rlhf_pl.plugins.reward_heads` for the interface and an example third-party head.

Choose one with ``reward_head=<name>`` (``python -m rlhf_pl +stage=rm reward_head=ensemble
reward_head.n_heads=8``); the rm stage uses ``linear`` when none is chosen.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rlhf_pl.config import setting
from rlhf_pl.registry import PluginSpec

MLP_ACTIVATIONS = ("gelu", "relu", "tanh")


@dataclass
class LinearHeadConfig:
    """A single scalar projection of the last token's hidden state."""

    init_std: Optional[float] = setting(None, gt=0)  # normal init std; None: 1/sqrt(hidden_size + 1) (Stiennon et al.)


@dataclass
class MLPHeadConfig:
    """Hidden layer + activation + scalar projection."""

    hidden: int = setting(256, ge=1)  # width of the hidden layer
    activation: str = setting("gelu", choices=MLP_ACTIVATIONS)  # gelu | relu | tanh
    dropout: float = setting(0.0, ge=0, lt=1)  # on the hidden layer (off by default: RLHF trains without dropout)
    init_std: Optional[float] = setting(None, gt=0)  # std of the output layer's normal init; None = 1/sqrt(hidden + 1)


@dataclass
class EnsembleHeadConfig:
    """N independent scalar heads on one trunk; reward = mean, uncertainty = std across heads.

    Each head is initialised with its own random draw and trained on its own ranking loss (the
    stage averages the loss over heads), so the heads disagree where the data says little.
    """

    n_heads: int = setting(4, ge=2)  # number of scalar heads (>= 2)
    init_std: Optional[float] = setting(None, gt=0)  # std of each head's normal init; None = 1/sqrt(hidden_size + 1)


LINEAR = PluginSpec(
    "linear", LinearHeadConfig, "rlhf_pl.plugins.reward_heads:LinearHead",
    "scalar linear head on the last token (init N(0, 1/sqrt(d+1)), bias 0)",
)
MLP = PluginSpec(
    "mlp", MLPHeadConfig, "rlhf_pl.plugins.reward_heads:MLPHead",
    "one hidden layer (gelu|relu|tanh) then a scalar projection",
)
ENSEMBLE = PluginSpec(
    "ensemble", EnsembleHeadConfig, "rlhf_pl.plugins.reward_heads:EnsembleHead",
    "N independent scalar heads; reward = mean, uncertainty = std across heads",
)
