"""Reward-head plugins: read-out position, init, hand-computed outputs, validation, registry."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_pl import registry
from rlhf_pl.plugins.reward_head_specs import MLP_ACTIVATIONS, EnsembleHeadConfig, LinearHeadConfig, MLPHeadConfig
from rlhf_pl.plugins.reward_heads import (
    _ACTIVATIONS,
    EnsembleHead,
    LinearHead,
    MLPHead,
    RewardHead,
    RewardHeadOutput,
    build_head,
    last_token_hidden,
    resolve_head,
)


def test_last_token_hidden_picks_rows():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)  # value = 6b + 2t + d
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert last_token_hidden(hidden, mask).tolist() == [[2.0, 3.0], [10.0, 11.0]]
    with pytest.raises(ValueError, match="does not match"):
        last_token_hidden(hidden, mask[:, :2])


def test_linear_head_hand_computed():
    head = LinearHead(LinearHeadConfig(), hidden_size=2)
    with torch.no_grad():
        head.score.weight.copy_(torch.tensor([[1.0, 2.0]]))
        head.score.bias.fill_(0.5)
    hidden = torch.arange(12, dtype=torch.float32).reshape(2, 3, 2)
    out = head(hidden, torch.tensor([[1, 1, 0], [0, 1, 1]]))
    # row 0 reads h = [2, 3]: 2 + 6 + 0.5; row 1 reads h = [10, 11]: 10 + 22 + 0.5
    assert out.rewards.tolist() == [8.5, 32.5]
    assert out.uncertainty is None and out.members is None


def test_linear_head_init_std_is_one_over_sqrt_d_plus_one():
    torch.manual_seed(0)
    d = 4095
    head = LinearHead(LinearHeadConfig(), hidden_size=d)
    assert head.score.weight.std().item() == pytest.approx(1 / math.sqrt(d + 1), rel=0.05)  # 1/64
    assert head.score.weight.mean().abs().item() < 3 / math.sqrt(d + 1) / math.sqrt(d)
    assert head.score.bias.item() == 0.0
    custom = LinearHead(LinearHeadConfig(init_std=0.5), hidden_size=d)
    assert custom.score.weight.std().item() == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError, match="reward_head.init_std must be > 0"):
        LinearHead(LinearHeadConfig(init_std=0.0), hidden_size=4)


def test_mlp_head_hand_computed_and_activation_choices():
    assert tuple(_ACTIVATIONS) == MLP_ACTIVATIONS
    head = MLPHead(MLPHeadConfig(hidden=2, activation="relu"), hidden_size=2)
    with torch.no_grad():
        head.fc.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, -1.0]]))
        head.fc.bias.zero_()
        head.out.weight.copy_(torch.tensor([[2.0, 3.0]]))
        head.out.bias.fill_(1.0)
    hidden = torch.tensor([[[4.0, 5.0]], [[-1.0, -2.0]]])  # (2, 1, 2)
    out = head(hidden, torch.ones(2, 1, dtype=torch.long))
    # row 0: relu([4, -5]) = [4, 0] -> 8 + 1; row 1: relu([-1, 2]) = [0, 2] -> 6 + 1
    assert out.rewards.tolist() == [9.0, 7.0]
    assert head.out.bias.shape == (1,)
    with pytest.raises(ValueError,
                       match=r"reward_head.activation='swish' is not supported; choose one of: gelu, relu, tanh"):
        MLPHead(MLPHeadConfig(activation="swish"), hidden_size=4)
    with pytest.raises(ValueError, match="reward_head.hidden must be >= 1"):
        MLPHead(MLPHeadConfig(hidden=0), hidden_size=4)


def test_ensemble_mean_std_and_distinct_heads():
    torch.manual_seed(0)
    head = EnsembleHead(EnsembleHeadConfig(n_heads=3), hidden_size=8)
    rows = head.heads.weight  # (3, 8): each head its own N(0, 1/3) draw
    assert not torch.allclose(rows[0], rows[1]) and not torch.allclose(rows[1], rows[2])
    assert head.heads.bias.tolist() == [0.0, 0.0, 0.0]
    with torch.no_grad():
        head.heads.weight.zero_()
        head.heads.weight[:, 0] = torch.tensor([1.0, 2.0, 6.0])
    hidden = torch.zeros(1, 2, 8)
    hidden[0, 1, 0] = 1.0
    out = head(hidden, torch.tensor([[1, 1]]))
    assert out.members.tolist() == [[1.0, 2.0, 6.0]]
    assert out.rewards.tolist() == [3.0]
    # sqrt(7)
    assert out.uncertainty.item() == pytest.approx(math.sqrt(((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 2))
    with pytest.raises(ValueError, match="reward_head.n_heads must be >= 2"):
        EnsembleHead(EnsembleHeadConfig(n_heads=1), hidden_size=8)


def test_builtins_are_registered_plugins_and_satisfy_the_protocol():
    names = [p.name for p in registry.installed("reward_heads")]
    assert {"linear", "mlp", "ensemble"} <= set(names)
    for name, cls in (("linear", LinearHead), ("mlp", MLPHead), ("ensemble", EnsembleHead)):
        choice = resolve_head(name)
        head = build_head(choice, hidden_size=16)
        assert type(head) is cls and isinstance(head, RewardHead)
        out = head(torch.randn(2, 5, 16), torch.ones(2, 5, dtype=torch.long))
        assert isinstance(out, RewardHeadOutput) and out.rewards.shape == (2,)


def test_resolve_head_config_from_mapping_and_errors():
    choice = resolve_head("mlp", {"hidden": 8}, activation="tanh")
    assert choice.config == MLPHeadConfig(hidden=8, activation="tanh")
    assert choice.distribution  # the package declaring the entry point
    with pytest.raises(registry.PluginError,
                       match=r"no setting\(s\) \['width'\]; valid: \['activation', 'dropout', 'hidden', 'init_std'\]"):
        resolve_head("mlp", {"width": 8})
    with pytest.raises(registry.PluginError, match="expects a LinearHeadConfig"):
        resolve_head("linear", MLPHeadConfig())
    with pytest.raises(registry.PluginError,
                       match="unknown reward_head plugin 'gated'; installed: .*ensemble.*linear.*mlp"):
        resolve_head("gated")


def test_head_follows_bf16_hidden_states():
    head = LinearHead(LinearHeadConfig(), hidden_size=4)
    out = head(torch.randn(1, 3, 4, dtype=torch.bfloat16), torch.ones(1, 3, dtype=torch.long))
    assert out.rewards.dtype == torch.float32
