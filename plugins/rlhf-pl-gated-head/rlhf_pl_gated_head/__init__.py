"""rlhf-pl-gated-head: an example third-party reward head for rlhf_pl.

This module is deliberately light (dataclasses only, no torch): rlhf_pl imports it to list plugins
(``python -m rlhf_pl.plugins``) and to register the config with Hydra, so that
``reward_head=gated reward_head.gate_bias=-2`` composes and is type-checked. The head itself lives
in :mod:`rlhf_pl_gated_head.head`, imported only when ``reward_head=gated`` is chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from rlhf_pl.registry import PluginSpec

__all__ = ["GatedHeadConfig", "SPEC"]


@dataclass
class GatedHeadConfig:
    """Settings of the gated-pooling head (``reward_head.<field>=...`` on the command line)."""

    gate_bias: float = 0.0  # initial bias of the gate: sigmoid(0) = 0.5 weighs every token alike at first
    normalise: bool = True  # divide the gated sum by the number of real tokens (else longer texts sum more)
    init_std: Optional[float] = None  # std of the gate/value weights' normal init; None = 1/sqrt(d + 1)

    def __post_init__(self) -> None:
        if not (isinstance(self.gate_bias, (int, float)) and math.isfinite(self.gate_bias)):
            raise ValueError(f"reward_head.gate_bias must be a finite number, got {self.gate_bias!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"reward_head.init_std must be > 0 (or null for 1/sqrt(d+1)), got {self.init_std!r}")


SPEC = PluginSpec(
    name="gated",  # must equal the entry-point name in pyproject.toml
    config=GatedHeadConfig,
    factory="rlhf_pl_gated_head.head:GatedHead",  # called as GatedHead(config, hidden_size)
    description="gated pooling: sum over real tokens of sigmoid(gate·h) × (value·h), averaged",
)
