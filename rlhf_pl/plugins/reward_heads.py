"""Reward heads (plugin kind ``reward_heads``): the interface and the built-ins.

A reward head turns the trunk's hidden states into one scalar per sequence. It is an
``nn.Module`` built as ``HeadClass(config, hidden_size)`` and called as
``head(hidden_states, attention_mask) -> RewardHeadOutput``:

=================  ============  =====================================================
argument / field   shape         meaning
=================  ============  =====================================================
hidden_states      (b, t, d)     last hidden layer of the trunk (any float dtype)
attention_mask     (b, t)        1 on real tokens, 0 on padding (left or right)
rewards            (b,)          raw (unnormalised) reward of each sequence
uncertainty        (b,) | None   optional per-sequence uncertainty (e.g. ensemble std)
members            (b, m) | None optional per-member rewards; when given, the rm stage
                                 trains each member on its own ranking loss (averaged)
=================  ============  =====================================================

The reward of a sequence is read at its last real token (RLHF reference item 8):
:func:`last_token_hidden` finds it from the mask's *positions* (the last position where
``attention_mask == 1``: :func:`rlhf_pl.rl.masked.last_valid_index`), never from token ids, so it
is right for right padding, left padding and a pad token equal to EOS. Heads should cast the
hidden state to their own parameter dtype.

Writing a third-party head (a package of its own, ~30 lines)::

    # acme_heads/__init__.py  -- light: imported to list plugins and register the config
    from dataclasses import dataclass
    from rlhf_pl.registry import PluginSpec

    @dataclass
    class MeanPoolConfig:
        mix: float = 0.5  # weight of the mean-pooled state against the last token's

    SPEC = PluginSpec("mean_pool", MeanPoolConfig, "acme_heads.head:MeanPoolHead",
                      "scalar head on a mix of mean-pooled and last-token states")

    # acme_heads/head.py  -- imported only when reward_head=mean_pool is chosen
    import torch
    from torch import nn
    from rlhf_pl.plugins.reward_heads import RewardHeadOutput, last_token_hidden

    class MeanPoolHead(nn.Module):
        def __init__(self, config, hidden_size: int) -> None:
            super().__init__()
            self.mix = config.mix
            self.proj = nn.Linear(hidden_size, 1)
            nn.init.normal_(self.proj.weight, std=(hidden_size + 1) ** -0.5)
            nn.init.zeros_(self.proj.bias)

        def forward(self, hidden_states, attention_mask) -> RewardHeadOutput:
            mask = attention_mask.unsqueeze(-1).to(hidden_states.dtype)    # (b, t, 1)
            mean = (hidden_states * mask).sum(1) / mask.sum(1)             # (b, d)
            last = last_token_hidden(hidden_states, attention_mask)        # (b, d)
            h = (self.mix * mean + (1 - self.mix) * last).to(self.proj.weight.dtype)
            return RewardHeadOutput(self.proj(h).squeeze(-1), None)       # (b,)

    # pyproject.toml
    [project.entry-points."rlhf_pl.reward_heads"]
    mean_pool = "acme_heads:SPEC"

After ``pip install acme-heads``: ``python -m rlhf_pl +stage=rm reward_head=mean_pool
reward_head.mix=0.3``. The saved reward model records the head's name, config and package, and
``RewardModel.from_pretrained`` rebuilds it through the registry.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Optional, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from rlhf_pl import registry
from rlhf_pl.plugins.reward_head_specs import (
    MLP_ACTIVATIONS,
    EnsembleHeadConfig,
    LinearHeadConfig,
    MLPHeadConfig,
)
from rlhf_pl.rl.masked import last_valid_index

KIND = "reward_heads"


class RewardHeadOutput(NamedTuple):
    """What a reward head returns. See the module docstring for shapes."""

    rewards: Tensor  # (b,)
    uncertainty: Optional[Tensor] = None  # (b,)
    members: Optional[Tensor] = None  # (b, m)


@runtime_checkable
class RewardHead(Protocol):
    """Interface of a reward head (implementations are ``nn.Module`` subclasses).

    ``__init__(config, hidden_size)``: ``config`` is the plugin's config dataclass instance,
    ``hidden_size`` the trunk's d. ``forward(hidden_states (b, t, d), attention_mask (b, t))``
    returns :class:`RewardHeadOutput` with ``rewards`` of shape (b,).
    """

    def __init__(self, config: Any, hidden_size: int) -> None: ...

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> RewardHeadOutput: ...


def last_token_hidden(hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state at each row's last real token. Shape: (b, t, d), (b, t) -> (b, d)."""
    if hidden_states.dim() != 3 or hidden_states.shape[:2] != attention_mask.shape:
        raise ValueError(
            f"hidden_states (b, t, d) {tuple(hidden_states.shape)} does not match "
            f"attention_mask (b, t) {tuple(attention_mask.shape)}"
        )
    index = last_valid_index(attention_mask)  # (b,)
    rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    return hidden_states[rows, index]


def _default_std(init_std: Optional[float], fan_in: int, key: str) -> float:
    """The scalar-head init std: ``init_std`` if given, else 1/sqrt(fan_in + 1) (reference item 9)."""
    if init_std is None:
        return (fan_in + 1) ** -0.5
    if init_std <= 0:
        raise ValueError(f"reward_head.{key} must be > 0 (or null for 1/sqrt(d+1)), got {init_std!r}")
    return float(init_std)


def _scalar_projection(fan_in: int, n_out: int, std: float) -> nn.Linear:
    """Linear(fan_in, n_out) with weight ~ N(0, std) (each output row an independent draw), bias 0."""
    layer = nn.Linear(fan_in, n_out)
    nn.init.normal_(layer.weight, mean=0.0, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class LinearHead(nn.Module):
    """r = w·h_last + b; w ~ N(0, 1/sqrt(d+1)), b = 0."""

    def __init__(self, config: LinearHeadConfig, hidden_size: int) -> None:
        super().__init__()
        self.score = _scalar_projection(hidden_size, 1, _default_std(config.init_std, hidden_size, "init_std"))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> RewardHeadOutput:
        h = last_token_hidden(hidden_states, attention_mask).to(self.score.weight.dtype)  # (b, d)
        return RewardHeadOutput(self.score(h).squeeze(-1))  # (b,)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "tanh": nn.Tanh}  # keys == MLP_ACTIVATIONS (tested)


class MLPHead(nn.Module):
    """r = w2·act(W1·h_last + b1) + b2, with dropout on the hidden layer."""

    def __init__(self, config: MLPHeadConfig, hidden_size: int) -> None:
        super().__init__()
        if config.activation not in _ACTIVATIONS:
            raise ValueError(
                f"reward_head.activation={config.activation!r} is not supported; choose one of: "
                f"{', '.join(MLP_ACTIVATIONS)}"
            )
        if config.hidden < 1:
            raise ValueError(f"reward_head.hidden must be >= 1, got {config.hidden!r}")
        if not 0.0 <= config.dropout < 1.0:
            raise ValueError(f"reward_head.dropout must be in [0, 1), got {config.dropout!r}")
        self.fc = nn.Linear(hidden_size, config.hidden)
        self.act = _ACTIVATIONS[config.activation]()
        self.dropout = nn.Dropout(config.dropout)
        self.out = _scalar_projection(config.hidden, 1, _default_std(config.init_std, config.hidden, "init_std"))

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> RewardHeadOutput:
        h = last_token_hidden(hidden_states, attention_mask).to(self.fc.weight.dtype)  # (b, d)
        return RewardHeadOutput(self.out(self.dropout(self.act(self.fc(h)))).squeeze(-1))  # (b,)


class EnsembleHead(nn.Module):
    """n independent scalar heads (one Linear(d, n), each row its own N(0, std) draw).

    rewards = mean over heads; uncertainty = std over heads (Bessel-corrected); members = the
    n heads' rewards, which the rm stage trains each on its own ranking loss.
    """

    def __init__(self, config: EnsembleHeadConfig, hidden_size: int) -> None:
        super().__init__()
        if config.n_heads < 2:
            raise ValueError(f"reward_head.n_heads must be >= 2 for an ensemble, got {config.n_heads!r}")
        self.heads = _scalar_projection(
            hidden_size, config.n_heads, _default_std(config.init_std, hidden_size, "init_std")
        )

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> RewardHeadOutput:
        h = last_token_hidden(hidden_states, attention_mask).to(self.heads.weight.dtype)  # (b, d)
        members = self.heads(h)  # (b, n)
        return RewardHeadOutput(members.mean(dim=-1), members.std(dim=-1), members)


@dataclasses.dataclass(frozen=True)
class HeadChoice:
    """A reward-head plugin chosen by name, with its config and the package providing it."""

    name: str
    config: Any  # the plugin's config dataclass instance
    distribution: Optional[str]  # pip distribution that declares the entry point ("?" if unknown)


def head_distribution(name: str) -> Optional[str]:
    """The installed distribution declaring reward head ``name`` (None if not installed)."""
    for plugin in registry.installed(KIND):
        if plugin.name == name:
            return plugin.distribution
    return None


def resolve_head(name: str, config: Any = None, **overrides: Any) -> HeadChoice:
    """Look a head up in the registry; ``config`` defaults to the plugin's config dataclass.

    ``config`` may be the dataclass instance or a mapping of its fields (as saved in
    ``reward_config.json``); an unknown field names the valid ones.
    """
    spec = registry.get_spec(KIND, name)
    if config is None:
        config = {}
    if isinstance(config, dict):
        valid = {f.name for f in dataclasses.fields(spec.config)}
        unknown = sorted((set(config) | set(overrides)) - valid)
        if unknown:
            raise registry.PluginError(
                f"reward_head {name!r} has no setting(s) {unknown}; valid: {sorted(valid)}"
            )
        config = spec.config(**{**config, **overrides})
    elif not isinstance(config, spec.config):
        raise registry.PluginError(
            f"reward_head {name!r} expects a {spec.config.__name__} config, got {type(config).__name__}"
        )
    return HeadChoice(name, config, head_distribution(name))


def build_head(choice: HeadChoice, hidden_size: int) -> nn.Module:
    """Instantiate the chosen head for a trunk of width ``hidden_size``."""
    head = registry.get_spec(KIND, choice.name).load_factory()(choice.config, hidden_size)
    if not isinstance(head, nn.Module):
        raise registry.PluginError(
            f"reward_head {choice.name!r} (package {choice.distribution}) built a {type(head).__name__}, "
            "expected a torch.nn.Module implementing rlhf_pl.plugins.reward_heads.RewardHead"
        )
    return head
