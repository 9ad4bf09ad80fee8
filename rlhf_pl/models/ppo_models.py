"""The models PPO holds: the trained policy, its frozen copy (the reference), the frozen reward model
(or an injected rule-based scorer) and the critic — loaded from the SFT and RM outputs and held by
the precision strategy — and the policy's forward pass at the sampling temperature T.

Shapes: ``b`` sequences, ``p`` prompt columns, ``n`` response columns, ``v`` the vocabulary.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, NamedTuple

from omegaconf import DictConfig
from torch import Tensor, nn

from rlhf_pl import registry
from rlhf_pl.errors import ConfigError
from rlhf_pl.models.critic import Critic, ValueHead, freeze, new_value_head
from rlhf_pl.models.forward import forward_columns
from rlhf_pl.models.generate import entropy_from_logits, logprobs_from_logits, response_logits
from rlhf_pl.models.loading import load_model_and_tokenizer, load_tokenizer, set_dropout
from rlhf_pl.models.reward import LabelerReward, RewardModel, hidden_size_of, trunk_of
from rlhf_pl.outputs import model_config_at
from rlhf_pl.rl.masked import valid_only
from rlhf_pl.runtime import attention_kernel
from rlhf_pl.sampling import Scorer

log = logging.getLogger(__name__)


class PPOModels(NamedTuple):
    """The four models (three with a shared critic or none) and where they came from."""

    policy: nn.Module  # trained causal LM
    reference: nn.Module  # frozen copy of the initial (SFT) policy
    scorer: Scorer | LabelerReward  # the reward model (frozen), an injected rule, or a labeler's scores
    critic: Critic | None  # separate value network, or None with critic=shared | none
    value_head: ValueHead | None  # value head on the policy trunk (critic=shared), else None
    tokenizer: Any
    policy_from: str
    reward_from: str
    reference_from: str


def load_policy(cfg: DictConfig, policy_dir: Path, precision: Any,
                reference_dir: Path | None = None) -> tuple[nn.Module, Any, Any]:
    """Policy (trainable, dropout 0) and the reference; and the tokenizer. The precision strategy
    holds them: a frozen copy (quantised under int8-frozen / nf4-frozen), or, under lora / qlora,
    the policy itself with its adapters disabled (no second copy). A ``reference_dir`` other than
    ``policy_dir`` (a later RLHF round: policy r−1 trained, the SFT model as reference) is loaded
    on its own, frozen, under every strategy."""
    policy, tokenizer, _ = load_model_and_tokenizer(model_config_at(cfg.model, policy_dir))
    set_dropout(policy, 0.0)
    if reference_dir is not None and reference_dir.resolve() != policy_dir.resolve():
        reference, ref_tokenizer, _ = load_model_and_tokenizer(model_config_at(cfg.model, reference_dir))
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ConfigError(f"ppo.reference_from={str(reference_dir)!r}: its tokenizer differs from the policy's "
                              f"({policy_dir}); the KL penalty compares both on the same token ids")
        set_dropout(reference, 0.0)
        return precision.prepare_trainable(policy).train(), precision.prepare_frozen(freeze(reference)), tokenizer
    if precision.shares_reference:
        policy = precision.prepare_trainable(policy)
        return policy.train(), precision.reference_from_policy(policy), tokenizer
    reference = precision.prepare_frozen(freeze(copy.deepcopy(policy)))
    return precision.prepare_trainable(policy).train(), reference, tokenizer


def load_reward_model(reward_dir: Path, tokenizer: Any) -> RewardModel:
    """The frozen reward model; its tokenizer must be the policy's (it scores the policy's tokens)."""
    reward_model = RewardModel.from_pretrained(reward_dir)
    own = reward_model.tokenizer
    if own is not None and own.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(f"ppo.reward_from={str(reward_dir)!r}: the reward model's tokenizer differs from the "
                          "policy's; PPO scores the policy's token ids directly, so both must come from the same "
                          "base model")
    set_dropout(reward_model.trunk, 0.0)  # the trunk's config fields too, which freeze() cannot see on the wrapper
    return freeze(reward_model)


def build_models(cfg: DictConfig, policy_dir: Path, reward_dir: Path | None, scorer: Scorer | None,
                 precision: Any = None, reference_dir: Path | None = None) -> PPOModels:
    """Policy from ``policy_dir``, reference from ``reference_dir`` (default: the same); reward
    model from ``reward_dir`` unless a ``scorer`` is
    injected; critic from the reward model's trunk (from the policy's when no reward model is loaded).
    The critic copies the float trunk before the reward model is quantised by the precision strategy."""
    precision = precision if precision is not None else registry.build_by_name("precision", "fp32")
    reward_model = None
    if scorer is None:  # before the precision strategy prepares (and may quantise) any model
        reward_model = load_reward_model(reward_dir, load_tokenizer(model_config_at(cfg.model, policy_dir)))
    critic_trunk = critic_head = None
    if cfg.ppo.critic == "separate" and reward_model is not None:
        critic_trunk = copy.deepcopy(reward_model.trunk)
        if cfg.ppo.value_head_init == "reward":
            critic_head = ValueHead.from_reward_model(reward_model)
            log.info("critic: the reward model's trunk and %s", "its linear head (normalisation folded in)"
                     if critic_head is not None else
                     f"a fresh value head (reward head {reward_model.head_choice.name!r} is not one linear layer)")
    policy, reference, tokenizer = load_policy(cfg, policy_dir, precision, reference_dir)
    critic = value_head = None
    if cfg.ppo.critic == "shared":
        value_head = new_value_head(cfg.ppo.value_head_init, hidden_size_of(trunk_of(policy)))
    elif cfg.ppo.critic == "separate":
        trunk = critic_trunk if critic_trunk is not None else copy.deepcopy(trunk_of(policy))
        set_dropout(trunk, 0.0)
        head = critic_head if critic_head is not None else new_value_head(cfg.ppo.value_head_init,
                                                                           hidden_size_of(trunk))
        critic = precision.prepare_trainable(Critic(trunk.requires_grad_(True).train(), head))
    if reward_model is not None:
        reward_model = precision.prepare_frozen(reward_model)
    reward_from = str(reward_dir.resolve()) if scorer is None else getattr(scorer, "source", "injected scorer")
    return PPOModels(policy, reference, reward_model if scorer is None else scorer, critic, value_head, tokenizer,
                     str(policy_dir.resolve()), reward_from, str((reference_dir or policy_dir).resolve()))


# --- the policy's forward pass ----------------------------------------------------------------------


class PolicyEval(NamedTuple):
    """Attributes: logprobs log π(y_t) at temperature T, entropy (None unless asked), values from a
    value head on the policy trunk (None otherwise); all (b, n) float32, 0 after the response."""

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


def evaluate_policy(policy: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                    temperature: float, value_head: ValueHead | None = None, with_entropy: bool = False) -> PolicyEval:
    """A forward pass over prompt + response (each distinct prompt once): logprobs (and entropy) of
    ``softmax(logits / T)``.

    The rollout (no grad) and the update (grad) both call this, on the same rows, which is what
    makes the first minibatch's ratio exactly 1. With ``value_head`` (critic=shared) the values
    come out of the same pass. Shapes: sequences, attention_mask (b, p + n) -> (b, n) fields.
    """
    values = None
    with attention_kernel(sequences.shape[1], sequences.device, policy):
        if value_head is None:
            logits = response_logits(policy, sequences, attention_mask, prompt_length)  # (b, n, v)
        else:
            hidden = forward_columns(trunk_of(policy), sequences, attention_mask, prompt_length, prompt_length - 1,
                                     "hidden")[:, :-1]  # (b, n, d): the columns predicting the response
            logits, values = policy.get_output_embeddings()(hidden), value_head(hidden)
    mask = attention_mask[:, prompt_length:]
    scaled = logits.float() / temperature
    logprobs = valid_only(logprobs_from_logits(scaled, sequences[:, prompt_length:]), mask)
    entropy = valid_only(entropy_from_logits(scaled), mask) if with_entropy else None
    return PolicyEval(logprobs, entropy, valid_only(values, mask) if values is not None else None)
