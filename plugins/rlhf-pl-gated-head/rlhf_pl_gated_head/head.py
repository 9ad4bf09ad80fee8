"""The gated-pooling reward head (imported only when ``reward_head=gated`` is chosen).

Every real token t gets a value v_t = w·h_t + b and a gate g_t = sigmoid(u·h_t + c) in (0, 1); the
reward is the gated values summed over the attention mask, divided by the number of real tokens
(``normalise``)::

    r = Σ_t m_t · g_t · v_t / Σ_t m_t

Unlike the built-in ``linear`` head, which reads only the last token, the gate learns which tokens
matter. It implements rlhf_pl's RewardHead protocol (rlhf_pl.plugins.reward_heads).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_pl.plugins.reward_heads import RewardHeadOutput
from rlhf_pl_gated_head import GatedHeadConfig


class GatedHead(nn.Module):
    """Gated pooling over real tokens. Shapes: (b, t, d), (b, t) -> rewards (b,)."""

    def __init__(self, config: GatedHeadConfig, hidden_size: int) -> None:
        super().__init__()
        std = config.init_std if config.init_std is not None else (hidden_size + 1) ** -0.5
        self.gate = nn.Linear(hidden_size, 1)
        self.value = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.gate.weight, std=std)
        nn.init.constant_(self.gate.bias, config.gate_bias)
        nn.init.normal_(self.value.weight, std=std)
        nn.init.zeros_(self.value.bias)
        self.normalise = config.normalise

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> RewardHeadOutput:
        h = hidden_states.to(self.value.weight.dtype)  # (b, t, d)
        mask = attention_mask.to(h.dtype)  # (b, t)
        gates = torch.sigmoid(self.gate(h).squeeze(-1))  # (b, t)
        values = self.value(h).squeeze(-1)  # (b, t)
        rewards = (mask * gates * values).sum(-1)  # (b,)
        if self.normalise:
            rewards = rewards / mask.sum(-1).clamp(min=1.0)
        return RewardHeadOutput(rewards)
