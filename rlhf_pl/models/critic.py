"""PPO's value function: a scalar value head, and the separate critic (a transformer trunk + that
head), beside the reward model whose trunk and head it can start from (RLHF_REFERENCE.md item 22).

Shapes: ``b`` sequences, ``p`` prompt columns, ``n`` response columns, ``d`` the hidden size.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from rlhf_pl.models.forward import forward_columns
from rlhf_pl.models.loading import set_dropout
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.rl.masked import valid_only
from rlhf_pl.runtime import attention_kernel


class ValueHead(nn.Module):
    """A fresh scalar head: Linear(d, 1), weight ~ N(0, 1/√(d+1)), bias 0. Shape: (b, n, d) -> (b, n) float32."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.proj.weight, std=(hidden_size + 1) ** -0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden).squeeze(-1).float()

    @classmethod
    def zero(cls, hidden_size: int) -> ValueHead:
        """Weight and bias 0: V ≡ 0 at the start, the expected return when the scores are centred
        per prompt (``ppo.score_baseline=reference``). The trunk gets gradient once the weight moves."""
        head = cls(hidden_size)
        nn.init.zeros_(head.proj.weight)
        return head

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> ValueHead | None:
        """The reward model's scalar linear head with its normalisation folded in (w' = gain·w,
        b' = gain·b + bias), so that V(s_t) starts as the score the reward model gives the prefix
        s_t — InstructGPT's value function initialised from the RM. None for other heads."""
        if reward_model.head_choice.name != "linear":
            return None
        linear = reward_model.head.score  # the built-in LinearHead: Linear(d, 1)
        head = cls(linear.in_features)
        gain, bias = reward_model.gain.float(), reward_model.bias.float()
        with torch.no_grad():
            head.proj.weight.copy_(gain * linear.weight.float())
            head.proj.bias.copy_(gain * linear.bias.float() + bias)
        return head


def new_value_head(init: str, hidden_size: int) -> ValueHead:
    """A value head not taken from the reward model: zero for ``init="zero"``, else fresh (N(0, 1/√(d+1)))."""
    return ValueHead.zero(hidden_size) if init == "zero" else ValueHead(hidden_size)


class Critic(nn.Module):
    """The separate value network: a transformer trunk + :class:`ValueHead`.

    V_t (the value before response token t) is read from the hidden state of the column whose
    logits predict token t, i.e. columns p−1 … p+n−2 of prompt + response.
    """

    def __init__(self, trunk: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        """Shapes: sequences, attention_mask (b, p + n) -> values (b, n) float32, 0 after the response."""
        with attention_kernel(sequences.shape[1], sequences.device, self.trunk):  # the prompt once per K rows
            hidden = forward_columns(self.trunk, sequences, attention_mask, prompt_length, prompt_length - 1, "hidden")
        values = self.head(hidden[:, :-1])
        return valid_only(values, attention_mask[:, prompt_length:])


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients, dropout 0: how PPO holds the reference and the reward model."""
    set_dropout(module, 0.0)
    module.requires_grad_(False)
    return module.eval()
