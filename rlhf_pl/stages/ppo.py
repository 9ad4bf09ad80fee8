"""Stage 4 — PPO: optimise the policy against the reward model, with a KL penalty to the SFT policy.

``python -m rlhf_pl +stage=ppo [kl_controller=adaptive|fixed|pi] [sampler.temperature=0.7] [ppo.<key>=...]``
``python -m rlhf_pl +stage=ppo +resume=<run dir>``   continue a run (killed or not) from its last checkpoint

Reads top to bottom: settings check → data (prompts, chat-templated, left-padded by the collator;
the prompts of rollout u are a pure function of seed and u) → models (policy and its frozen copy,
the reference, from the SFT output; the reward model from the RM output; the critic) → the
LightningModule, whose ``training_step`` is one PPO update:

1. rollout, without gradients: generate with the sampler plugin at temperature T (KV cache, left
   padding) → cut at a stop string → score with the reward model at the last valid token → score
   post-processing (uncertainty penalty, minus the per-prompt baseline b(x) = the score of the
   reference's greedy answer, running normalisation, missing-EOS penalty, clip) →
   policy logprobs and entropy, reference logprobs (both from logits / T) and values, each model
   run once per purpose;
2. per-token rewards −β·kl_t plus the score at the last token (β from the KL controller plugin),
   optional reward whitening → GAE → advantage whitening (global across ranks);
3. ``ppo_epochs`` × ``num_minibatches``: clipped policy loss + c_v·clipped value loss (+ entropy
   bonus, KL loss, PPO-ptx), ``manual_backward``, ``clip_gradients`` per optimizer, ``step``, LR
   schedulers;
4. KL controller update, logging (progress bar: score, kl, beta), sample tables, checkpoint.

Then: curves (``ppo_curves.png``), the policy in Hugging Face format (``<run_dir>/policy``, recorded
as this model's latest PPO output), and the summary. Settings: :class:`rlhf_pl.config.PPOConfig`.

RLHF_REFERENCE.md items and where they live (choices documented here):

- 1, 5: prompts left-padded by :class:`PromptCollator`; position ids from the mask; every mask from
  positions, never from ``token == pad`` (pad may equal EOS).
- 2: one temperature T (``sampler.temperature``) for sampling and for every logprob and entropy.
  Rollout and update compute logprobs with the same function (:func:`evaluate_policy`) on the same
  rows (the first epoch's minibatches are the rollout's forward chunks), so the first minibatch of
  the first epoch has ratio exactly 1 and approx-KL exactly 0 (:class:`PPOStats` ``*_first``).
- 3, 4: a response ends at EOS or after the token completing a stop string; later tokens are
  masked out of logprobs, KL, values, rewards and losses; the score is read at the last valid
  token; ``missing_eos_penalty`` replaces (or is added to) the score of a response without an end.
- 13, 14: reference and reward model frozen (eval, no grad); dropout set to 0 in all four models
  (policy and critic may stay in train mode: with p = 0 it is the identity, and gradient
  checkpointing still works).
- 15, 16: ``kl_estimator`` k1|k2|k3 in the reward (default) or as a loss term (``kl_penalty``);
  β from the ``kl_controller`` plugin, updated after each update with the rollout's KL (mean over
  responses of Σ_t k1) and the episode count. Logged: KL by all three estimators.
- 17: ``whiten_rewards`` (scale only), ``score_clip``, and ``score_norm`` (running score statistics,
  restored on resume).
- 18–21: GAE (γ, λ), advantage whitening over the valid tokens of all ranks, clipped losses
  (rlhf_pl.rl.ppo); approx-KL is ½·mean((log ρ)²).
- 22: ``critic=separate`` (default): a copy of the reward model's trunk with a scalar value head
  (``value_head_init``: zero by default — the scores are centred per prompt by the reference
  baseline —, the RM's head, or fresh); ``critic=shared``: the value head on the policy trunk.
- 23: Adam (eps 1e-5) with warm-up and linear decay for each of the two optimizers; 1 epoch × 2
  minibatches by default (InstructGPT's form; Ziegler's 4 × 1 is ``ppo_epochs=4
  num_minibatches=1``). The first epoch keeps the rollout's row order; later epochs shuffle.
- 24: PPO-ptx: ``ptx_coef`` · NLL of SFT demonstrations, one demonstration batch per minibatch.
- 25: :class:`PPOStats`, logged every update; a sample table every ``sample_every`` updates.

Resume: every ``checkpoint_every`` updates ``<run_dir>/checkpoints/last.pt`` (policy, critic, both
optimizers and schedulers, KL controller, score statistics, RNG states, rollouts done, curves) is
written to a temp file, fsynced and renamed into place, then ``latest.json`` points at it; a kill
at any moment leaves the previous complete checkpoint. ``+resume=<run dir>`` loads it into a new
run directory (the frozen models come from the paths stored in the checkpoint) and continues with
rollout k+1: on one process with a fixed seed the metrics equal those of an uninterrupted run.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import time
import warnings
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler

from rlhf_pl import registry
from rlhf_pl.config import PPOConfig
from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import SFTCollator, pad_left
from rlhf_pl.data.formats import Prompt, load_conversations, load_prompts
from rlhf_pl.models.generate import GreedySampler, entropy_from_logits, generate, logprobs_from_logits, position_ids_from_mask, response_logits
from rlhf_pl.models.loading import load_model_and_tokenizer, load_tokenizer, save_pretrained_atomic, set_dropout
from rlhf_pl.models.reward import RewardModel, RewardOutput, trunk_of
from rlhf_pl.precision import build_for_stage
from rlhf_pl.report import Trend, linear_trend, markdown_table, plot_curves, running_mean, tensorboard_writer
from rlhf_pl.rl.kl import KL_ESTIMATORS, kl_estimate, kl_loss, sequence_kl
from rlhf_pl.rl.ppo import (
    PolicyLossOutput, ValueLossOutput, explained_variance, gae, masked_mean, masked_var, masked_whiten,
    missing_eos_penalty, per_token_rewards, policy_loss, valid_only, value_loss,
)
from rlhf_pl.io import torch_save, write_json, write_text
from rlhf_pl.optim import build_optimizer
from rlhf_pl.outputs import InputSpec, check_input, model_config_at
from rlhf_pl.runtime import attention_kernel, weights_cast_once
from rlhf_pl.stages import StageResult
from rlhf_pl.stages.sft import tokenize_split
from rlhf_pl.training import check_finite_loss, make_trainer

log = logging.getLogger(__name__)

CRITICS = ("separate", "shared")
VALUE_HEAD_INITS = ("zero", "reward", "fresh")
SCORE_BASELINES = ("reference", "none")
KL_PENALTIES = ("reward", "loss")
EOS_MODES = ("replace", "add")
SCORE_NORMS = ("none", "scale", "standardise")
CHECKPOINT_DIR, CHECKPOINT_FILE, POINTER_FILE = "checkpoints", "last.pt", "latest.json"
CHECKPOINT_FORMAT = 1

#: ``scorer(sequences (b, t), attention_mask (b, t)) -> RewardOutput`` with (b,) fields, read at the
#: last attended token. :class:`RewardModel` is one; tests inject rule-based ones.
Scorer = Callable[[Tensor, Tensor], RewardOutput]


# --- settings -------------------------------------------------------------------------------------


def check_stage_config(ppo: PPOConfig) -> None:
    """Values a type check cannot catch; each error names the key, the bad value and the valid choices."""
    choices = {"critic": CRITICS, "kl_estimator": KL_ESTIMATORS, "kl_penalty": KL_PENALTIES,
               "missing_eos_mode": EOS_MODES, "score_norm": SCORE_NORMS, "value_head_init": VALUE_HEAD_INITS,
               "score_baseline": SCORE_BASELINES}
    for key, valid in choices.items():
        if getattr(ppo, key) not in valid:
            raise ValueError(f"ppo.{key}={getattr(ppo, key)!r}; choose one of: {', '.join(valid)}")
    for key in ("updates", "batch_size", "max_new_tokens", "ppo_epochs", "num_minibatches", "ptx_batch_size",
                "sample_every", "checkpoint_every"):
        if getattr(ppo, key) < 1:
            raise ValueError(f"ppo.{key}={getattr(ppo, key)!r}; must be an integer >= 1")
    if ppo.batch_size % ppo.num_minibatches:
        divisors = [d for d in range(1, ppo.batch_size + 1) if ppo.batch_size % d == 0]
        raise ValueError(f"ppo.num_minibatches={ppo.num_minibatches} must divide ppo.batch_size={ppo.batch_size}; valid: {divisors}")
    for key in ("vf_coef", "entropy_coef", "ptx_coef", "uncertainty_coef", "num_samples"):
        if not getattr(ppo, key) >= 0:
            raise ValueError(f"ppo.{key}={getattr(ppo, key)!r}; must be >= 0")
    for key in ("value_clip", "score_clip", "max_grad_norm"):
        if getattr(ppo, key) is not None and not getattr(ppo, key) > 0:
            raise ValueError(f"ppo.{key}={getattr(ppo, key)!r}; must be > 0, or null to turn it off")
    for key, low, high in (("clip_eps", 0.0, 1.0), ("gamma", 0.0, 1.0), ("lam", 0.0, 1.0)):
        if not low < getattr(ppo, key) <= high:
            raise ValueError(f"ppo.{key}={getattr(ppo, key)!r}; must be in ({low}, {high}]")
    if ppo.kl_penalty == "loss" and ppo.kl_estimator == "k1":
        log.warning("ppo.kl_penalty=loss with ppo.kl_estimator=k1: the gradient of k1 has expectation 0; use k3 or k2")


# --- data -----------------------------------------------------------------------------------------


class PromptItem(NamedTuple):
    """One prompt: its index in the data and its chat-templated token ids (ending with the generation prompt)."""

    index: int
    input_ids: list[int]


def tokenize_prompts(prompts: Sequence[Prompt], tokenizer: Any, max_prompt_length: int) -> list[PromptItem]:
    """Chat-template every prompt; keep its last ``max_prompt_length`` tokens (the end holds the
    generation prompt the answer follows)."""
    return [PromptItem(i, tokenize_prompt(tokenizer, p.messages)[-max_prompt_length:]) for i, p in enumerate(prompts)]


@dataclass(frozen=True)
class PromptCollator:
    """Left-pads prompts for generation: ``input_ids``, ``attention_mask`` (b, p) long; ``index`` (b,)."""

    pad_id: int

    def __call__(self, items: Sequence[PromptItem]) -> dict[str, Tensor]:
        ids, mask = pad_left([item.input_ids for item in items], self.pad_id)
        return {"input_ids": ids, "attention_mask": mask, "index": torch.tensor([item.index for item in items])}


class RolloutBatchSampler(Sampler[list[int]]):
    """The prompts of every rollout of the run; rollout u's batch is a pure function of (seed, u).

    Each pass over the data (data epoch e) shuffles the prompts with a generator seeded by
    ``seed + e`` and cuts them into global batches of ``batch_size × num_replicas`` (an incomplete
    last one is dropped); rank r takes the r-th slice. Iteration yields rollouts ``start`` …
    ``updates − 1``: a resumed run starts after the rollouts it has done, so it sees exactly the
    prompts the uninterrupted run would have seen.
    """

    def __init__(self, n_prompts: int, batch_size: int, seed: int, updates: int, start: int = 0,
                 num_replicas: int = 1, rank: int = 0) -> None:
        if n_prompts < batch_size * num_replicas:
            raise ValueError(f"{n_prompts} prompts are fewer than ppo.batch_size={batch_size} × {num_replicas} rank(s); "
                             "lower ppo.batch_size or add prompts (data.prompts, data.limit)")
        self.n_prompts, self.batch_size, self.seed = n_prompts, batch_size, seed
        self.updates, self.start, self.num_replicas, self.rank = updates, start, num_replicas, rank
        self.per_epoch = n_prompts // (batch_size * num_replicas)

    def batch(self, update: int) -> list[int]:
        """Prompt indices of rollout ``update`` on this rank. Shape: (batch_size,)."""
        epoch, position = divmod(update, self.per_epoch)
        order = torch.randperm(self.n_prompts, generator=torch.Generator().manual_seed(self.seed + epoch))
        first = (position * self.num_replicas + self.rank) * self.batch_size
        return order[first:first + self.batch_size].tolist()

    def __len__(self) -> int:
        return max(0, self.updates - self.start)

    def __iter__(self) -> Iterator[list[int]]:
        return (self.batch(u) for u in range(self.start, self.updates))


class DemonstrationBatches:
    """SFT demonstrations for the PPO-ptx term. Batch s (the s-th optimizer step of the run) is a pure
    function of (seed, s), so a resumed run needs no extra state. Batches are right-padded
    :class:`SFTCollator` dicts: ``input_ids``, ``attention_mask``, ``labels`` (b, t)."""

    def __init__(self, examples: Sequence[Any], pad_id: int, batch_size: int, seed: int) -> None:
        if len(examples) < batch_size:
            raise ValueError(f"ppo.ptx_batch_size={batch_size} but data.demonstrations has only {len(examples)} usable examples")
        self.examples, self.batch_size, self.seed = list(examples), batch_size, seed
        self.collate = SFTCollator(pad_id)
        self.per_epoch = len(self.examples) // batch_size

    def __call__(self, step: int) -> dict[str, Tensor]:
        epoch, position = divmod(step, self.per_epoch)
        order = torch.randperm(len(self.examples), generator=torch.Generator().manual_seed(self.seed + 7919 * (epoch + 1)))
        rows = order[position * self.batch_size:(position + 1) * self.batch_size].tolist()
        return self.collate([self.examples[i] for i in rows])


def load_demonstrations(cfg: DictConfig, tokenizer: Any, ppo: PPOConfig) -> DemonstrationBatches:
    """SFT demonstrations tokenized as the sft stage does (assistant-only labels, ``data.overlong`` rule) for PPO-ptx."""
    if not cfg.data.demonstrations:
        raise ValueError("ppo.ptx_coef > 0 needs SFT demonstrations: set data.demonstrations")
    conversations = load_conversations(cfg.data.demonstrations, split=cfg.data.split, limit=cfg.data.limit)
    examples, _ = tokenize_split(conversations, tokenizer, cfg.data.max_length, cfg.data.overlong)
    return DemonstrationBatches(examples, tokenizer.pad_token_id, ppo.ptx_batch_size, cfg.seed)


# --- models ---------------------------------------------------------------------------------------


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
    def zero(cls, hidden_size: int) -> "ValueHead":
        """Weight and bias 0: V ≡ 0 at the start, the expected return when the scores are centred
        per prompt (``ppo.score_baseline=reference``). The trunk gets gradient once the weight moves."""
        head = cls(hidden_size)
        nn.init.zeros_(head.proj.weight)
        return head

    @classmethod
    def from_reward_model(cls, reward_model: RewardModel) -> Optional["ValueHead"]:
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


class Critic(nn.Module):
    """The separate value network: a transformer trunk + :class:`ValueHead`.

    V_t (the value before response token t) is read from the hidden state of the column whose
    logits predict token t, i.e. columns p−1 … t−2 of prompt + response.
    """

    def __init__(self, trunk: nn.Module, head: ValueHead) -> None:
        super().__init__()
        self.trunk, self.head = trunk, head

    def forward(self, sequences: Tensor, attention_mask: Tensor, prompt_length: int) -> Tensor:
        """Shapes: sequences, attention_mask (b, p + n) -> values (b, n) float32, 0 after the response."""
        with attention_kernel(sequences.shape[1], sequences.device, self.trunk):
            hidden = self.trunk(input_ids=sequences, attention_mask=attention_mask,
                                position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
        values = self.head(hidden[:, prompt_length - 1:-1])
        return valid_only(values, attention_mask[:, prompt_length:])


def new_value_head(init: str, hidden_size: int) -> ValueHead:
    """A value head not taken from the reward model: zero for ``init="zero"``, else fresh (N(0, 1/√(d+1)))."""
    return ValueHead.zero(hidden_size) if init == "zero" else ValueHead(hidden_size)


def hidden_size_of(trunk: nn.Module) -> int:
    config = trunk.config
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size)


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no gradients, dropout 0 (reference and reward model)."""
    set_dropout(module, 0.0)
    module.requires_grad_(False)
    return module.eval()


class PPOModels(NamedTuple):
    """The four models (or three, with a shared critic) and where they came from."""

    policy: nn.Module  # trained causal LM
    reference: nn.Module  # frozen copy of the initial (SFT) policy
    scorer: Scorer  # the reward model (frozen) or an injected rule
    critic: Optional[Critic]  # separate value network, or None with critic=shared
    value_head: Optional[ValueHead]  # value head on the policy trunk (critic=shared), else None
    tokenizer: Any
    policy_from: str
    reward_from: str


INPUTS = {
    "policy": InputSpec("ppo.policy_from", stage="sft", output="model", marker="config.json"),
    "reward_model": InputSpec("ppo.reward_from", stage="rm", output="reward_model", marker="reward_config.json"),
}


def load_policy(cfg: DictConfig, policy_dir: Path, precision: Any) -> tuple[nn.Module, Any, Any]:
    """Policy (trainable, dropout 0) and the reference; and the tokenizer. The precision strategy
    holds them: a frozen copy (quantised under int8-frozen / nf4-frozen), or, under lora / qlora,
    the policy itself with its adapters disabled (no second copy)."""
    policy, tokenizer, _ = load_model_and_tokenizer(model_config_at(cfg.model, policy_dir))
    set_dropout(policy, 0.0)
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
        raise ValueError(f"ppo.reward_from={str(reward_dir)!r}: the reward model's tokenizer differs from the policy's; "
                         "PPO scores the policy's token ids directly, so both must come from the same base model")
    set_dropout(reward_model.trunk, 0.0)
    return freeze(reward_model)


def build_models(cfg: DictConfig, policy_dir: Path, reward_dir: Optional[Path], scorer: Optional[Scorer],
                 precision: Any = None) -> PPOModels:
    """Policy + reference from ``policy_dir``; reward model from ``reward_dir`` unless a ``scorer`` is
    injected; critic from the reward model's trunk (from the policy's when no reward model is loaded).
    The critic copies the float trunk before the reward model is quantised by the precision strategy."""
    precision = precision if precision is not None else registry.build_by_name("precision", "fp32")
    reward_model = None
    if scorer is None:  # before the precision strategy prepares (and may quantise) any model
        reward_model = load_reward_model(reward_dir, load_tokenizer(model_config_at(cfg.model, policy_dir)))
    critic_trunk = critic_head = None
    if cfg.ppo.critic != "shared" and reward_model is not None:
        critic_trunk = copy.deepcopy(reward_model.trunk)
        if cfg.ppo.value_head_init == "reward":
            critic_head = ValueHead.from_reward_model(reward_model)
            log.info("critic: the reward model's trunk and %s", "its linear head (normalisation folded in)" if critic_head is not None
                     else f"a fresh value head (reward head {reward_model.head_choice.name!r} is not one linear layer)")
    policy, reference, tokenizer = load_policy(cfg, policy_dir, precision)
    critic = value_head = None
    if cfg.ppo.critic == "shared":
        value_head = new_value_head(cfg.ppo.value_head_init, hidden_size_of(trunk_of(policy)))
    else:
        trunk = critic_trunk if critic_trunk is not None else copy.deepcopy(trunk_of(policy))
        set_dropout(trunk, 0.0)
        head = critic_head if critic_head is not None else new_value_head(cfg.ppo.value_head_init, hidden_size_of(trunk))
        critic = precision.prepare_trainable(Critic(trunk.requires_grad_(True).train(), head))
    if reward_model is not None:
        reward_model = precision.prepare_frozen(reward_model)
    return PPOModels(policy, reference, reward_model if scorer is None else scorer, critic, value_head, tokenizer,
                     str(policy_dir.resolve()), str(reward_dir.resolve()) if scorer is None else "injected scorer")


# --- one forward pass of the policy ---------------------------------------------------------------


class PolicyEval(NamedTuple):
    """Attributes: logprobs log π(y_t) at temperature T, entropy (None unless asked), values from a
    value head on the policy trunk (None otherwise); all (b, n) float32, 0 after the response."""

    logprobs: Tensor
    entropy: Optional[Tensor]
    values: Optional[Tensor]


def evaluate_policy(policy: nn.Module, sequences: Tensor, attention_mask: Tensor, prompt_length: int,
                    temperature: float, value_head: Optional[ValueHead] = None, with_entropy: bool = False) -> PolicyEval:
    """One forward pass over prompt + response: logprobs (and entropy) of ``softmax(logits / T)``.

    The rollout (no grad) and the update (grad) both call this, on the same rows, which is what
    makes the first minibatch's ratio exactly 1. With ``value_head`` (critic=shared) the values
    come out of the same pass. Shapes: sequences, attention_mask (b, p + n) -> (b, n) fields.
    """
    values = None
    with attention_kernel(sequences.shape[1], sequences.device, policy):
        if value_head is None:
            logits = response_logits(policy, sequences, attention_mask, prompt_length)  # (b, n, v)
        else:
            hidden = trunk_of(policy)(input_ids=sequences, attention_mask=attention_mask,
                                      position_ids=position_ids_from_mask(attention_mask), use_cache=False).last_hidden_state
            hidden = hidden[:, prompt_length - 1:-1]  # (b, n, d): the columns predicting the response
            logits, values = policy.get_output_embeddings()(hidden), value_head(hidden)
    mask = attention_mask[:, prompt_length:]
    scaled = logits.float() / temperature
    logprobs = valid_only(logprobs_from_logits(scaled, sequences[:, prompt_length:]), mask)
    entropy = valid_only(entropy_from_logits(scaled), mask) if with_entropy else None
    return PolicyEval(logprobs, entropy, valid_only(values, mask) if values is not None else None)


def minibatch_rows(batch: int, num_minibatches: int, generator: Optional[torch.Generator]) -> list[Tensor]:
    """Row indices of each minibatch: in order without a generator (first epoch: the rollout's
    forward chunks), else a random permutation. Shape: num_minibatches × (batch / num_minibatches,)."""
    order = torch.randperm(batch, generator=generator) if generator is not None else torch.arange(batch)
    return list(order.chunk(num_minibatches))


# --- stop strings and scores ----------------------------------------------------------------------


def cut_at_stop_strings(response: Tensor, mask: Tensor, tokenizer: Any, stop_strings: Sequence[str]) -> tuple[Tensor, Tensor]:
    """End each response after the first token whose decoded prefix contains a stop string.

    Shapes: response, mask (b, n) -> mask (b, n) long (0 after the cut), stopped (b,) bool.
    """
    mask, stopped = mask.clone(), torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    if not stop_strings:
        return mask, stopped
    for row in range(response.shape[0]):
        tokens = response[row, mask[row].bool()].tolist()
        for k in range(1, len(tokens) + 1):
            text = tokenizer.decode(tokens[:k], skip_special_tokens=False)
            if any(stop in text for stop in stop_strings):
                mask[row, k:] = 0
                stopped[row] = True
                break
    return mask, stopped


@dataclass
class RunningMoments:
    """Running mean and (population) variance of the scores over the whole run, merged batch by batch
    (Chan et al.'s parallel update, over all ranks); saved in checkpoints."""

    mean: float = 0.0
    var: float = 0.0
    count: float = 0.0

    def update(self, x: Tensor, all_reduce: Callable[[Tensor], Tensor]) -> None:
        """Merge a batch of scores. Shape: x (b,)."""
        sums = all_reduce(torch.stack([x.double().sum(), x.double().square().sum(),
                                       torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)]))
        total, total_sq, n = (float(v) for v in sums)
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean ** 2, 0.0)
        delta, merged = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / merged
        self.mean, self.var, self.count = self.mean + delta * n / merged, m2 / merged, merged

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0


def process_scores(out: RewardOutput, ended: Tensor, ppo: PPOConfig, moments: RunningMoments,
                   all_reduce: Callable[[Tensor], Tensor], baselines: Optional[Tensor] = None) -> Tensor:
    """Reward-model score → the score that enters the reward, in this order: uncertainty penalty,
    minus the per-prompt baseline b(x) (``baselines``, (b,), when given), running normalisation
    (``score_norm``), missing-EOS penalty, clip. Shape: (b,) -> (b,) float32."""
    scores = out.rewards.float()
    if ppo.uncertainty_coef > 0:
        if out.uncertainty is None:
            raise ValueError(f"ppo.uncertainty_coef={ppo.uncertainty_coef} but the reward head returns no uncertainty; "
                             "use a head that does (reward_head=ensemble when training the RM) or set ppo.uncertainty_coef=0")
        scores = scores - ppo.uncertainty_coef * out.uncertainty.float()
    if baselines is not None:
        scores = scores - baselines.to(scores)
    if ppo.score_norm != "none":
        moments.update(scores, all_reduce)
        shift = moments.mean if ppo.score_norm == "standardise" else 0.0
        scores = (scores - shift) / moments.std
    if ppo.missing_eos_penalty is not None:
        scores = missing_eos_penalty(scores, ended, ppo.missing_eos_penalty, ppo.missing_eos_mode)
    if ppo.score_clip is not None:
        scores = scores.clamp(-ppo.score_clip, ppo.score_clip)
    return scores


def all_reduce_sum(t: Tensor) -> Tensor:
    """Element-wise sum over DDP ranks (torch.distributed, when initialised); ``t`` itself otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def trim_left_padding(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Drop the leading columns that are padding in every row. Shapes: (b, p) -> (b, p') with p' <= p."""
    first = int(mask.any(0).long().argmax()) if bool(mask.any()) else 0
    return ids[:, first:], mask[:, first:]


class ReferenceBaseline:
    """b(x): the reward-model score of the reference (SFT) policy's greedy response to prompt x.

    ``ppo.score_baseline=reference`` subtracts b(x) from every score of prompt x before the KL
    penalty and GAE. b depends on the prompt only, so the policy gradient stays unbiased (a
    baseline; ReMax, Li et al. 2023, uses the greedy response of the current policy); what it
    removes is the spread of the scores *between* prompts, which on a reward model that mostly
    rates the kind of question dwarfs the spread between answers to the same prompt and otherwise
    reaches the advantages through the critic's errors. b(x) is computed the first time x is drawn
    (one greedy generation and one reward-model pass over the new prompts of a batch), cached by
    prompt index and saved in checkpoints. The responses end like the policy's (EOS, stop strings)
    and are scored like :attr:`Rollout.rm_scores`: the reward model's (normalised) score, no penalty.
    """

    def __init__(self, reference: Any, scorer: Scorer, tokenizer: Any, ppo: PPOConfig) -> None:
        self.reference, self.scorer, self.tokenizer, self.ppo = reference, scorer, tokenizer, ppo
        self.scores: dict[int, float] = {}

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> tuple[Tensor, int]:
        """Baselines of a batch of left-padded prompts, and how many were computed now.
        Shapes: input_ids, attention_mask (b, p), index (b,) -> (b,) float32, int."""
        keys = [int(i) for i in index.tolist()]
        first_row: dict[int, int] = {}  # uncached prompt -> its first row (a prompt may appear twice in a batch)
        for row, key in enumerate(keys):
            if key not in self.scores:
                first_row.setdefault(key, row)
        new = list(first_row.values())
        if new:
            rows = torch.tensor(new, device=input_ids.device)
            ids, mask = trim_left_padding(input_ids[rows], attention_mask[rows])
            gen = generate(self.reference, ids, mask, GreedySampler(), self.ppo.max_new_tokens,
                           eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id)
            response_mask, _ = cut_at_stop_strings(gen.response, gen.response_mask, self.tokenizer, self.ppo.stop_strings)
            scores = self.scorer(gen.sequences, torch.cat([mask, response_mask], dim=1)).rewards.float()
            for row, score in zip(new, scores.tolist()):
                self.scores[keys[row]] = score
        return torch.tensor([self.scores[key] for key in keys], dtype=torch.float32, device=input_ids.device), len(new)

    def state_dict(self) -> dict[int, float]:
        return dict(self.scores)

    def load_state_dict(self, state: dict[int, float]) -> None:
        self.scores = {int(k): float(v) for k, v in state.items()}


# --- rollout, advantages, update results -----------------------------------------------------------


class Rollout(NamedTuple):
    """One batch of episodes and everything measured on it without gradients.

    Shapes: b episodes, p prompt columns (left-padded), n response columns (right-padded).
    """

    sequences: Tensor  # (b, p + n) long: prompt, then response
    attention_mask: Tensor  # (b, p + n) long: prompt mask, then ``mask``
    prompt_length: int  # p
    mask: Tensor  # (b, n) long: 1 on response tokens up to and including EOS / the stop-string end
    ended: Tensor  # (b,) bool: the response reached EOS or a stop string
    logprobs: Tensor  # (b, n) log π_old(y_t) at temperature T
    ref_logprobs: Tensor  # (b, n) log π_ref(y_t) at temperature T
    values: Tensor  # (b, n) V_old
    entropy: Tensor  # (b, n) policy entropy at temperature T
    rm_scores: Tensor  # (b,) reward-model scores (normalised, before any penalty)
    scores: Tensor  # (b,) the scores entering the reward (after process_scores)
    uncertainty: Optional[Tensor]  # (b,) reward-head uncertainty, if any
    prompt_index: Tensor  # (b,) prompts' indices in the data
    baselines: Optional[Tensor] = None  # (b,) b(x) subtracted from the scores (ppo.score_baseline=reference), else None


class Advantages(NamedTuple):
    """Per-token rewards and GAE results, all (b, n), 0 after each response."""

    rewards: Tensor  # −β·kl_t (+ score at the last token), whitened if ppo.whiten_rewards
    non_score: Tensor  # −β·kl_t
    advantages: Tensor  # whitened if ppo.whiten_advantages
    returns: Tensor  # A_t + V_t (before advantage whitening)
    raw_mean: Tensor  # scalar: advantage mean before whitening
    raw_std: Tensor  # scalar: advantage std before whitening


def compute_advantages(rollout: Rollout, beta: float, ppo: PPOConfig, all_reduce: Callable[[Tensor], Tensor]) -> Advantages:
    """r_t = −β·kl_t (+ score at the last token) → optional reward whitening → GAE → optional
    advantage whitening over the valid tokens of all ranks. Shapes: (b, n) throughout."""
    mask = rollout.mask
    kl_tokens = valid_only(kl_estimate(rollout.logprobs, rollout.ref_logprobs, ppo.kl_estimator), mask)
    beta_in_reward = beta if ppo.kl_penalty == "reward" else 0.0
    rewards, non_score = per_token_rewards(rollout.scores, kl_tokens, mask, beta_in_reward)
    if ppo.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False, all_reduce=all_reduce)
    advantages, returns = gae(rewards, rollout.values, mask, gamma=ppo.gamma, lam=ppo.lam)
    raw_mean = masked_mean(advantages, mask, all_reduce=all_reduce)
    raw_std = masked_var(advantages, mask, unbiased=False, all_reduce=all_reduce).sqrt()
    if ppo.whiten_advantages:
        advantages = masked_whiten(advantages, mask, shift_mean=True, all_reduce=all_reduce)
    return Advantages(rewards, non_score, advantages, returns, raw_mean, raw_std)


class PolicyTerms(NamedTuple):
    """The policy side of a minibatch step."""

    loss: Tensor  # scalar backpropagated through the policy (includes c_v·vf with critic=shared)
    pg: PolicyLossOutput
    vf: Optional[ValueLossOutput]  # the value loss when the value head sits on the policy trunk, else None
    kl_loss: Tensor  # detached KL loss term before β (0 unless kl_penalty=loss)
    ptx_loss: Tensor  # detached ptx NLL before γ (0 unless ptx_coef > 0)
    max_abs_log_ratio: Tensor  # detached max over valid tokens of |logp − logp_old|


class MinibatchStats(NamedTuple):
    """Diagnostics of one minibatch step (detached scalars)."""

    loss: Tensor
    policy_loss: Tensor
    value_loss: Tensor
    policy_clip_frac: Tensor
    value_clip_frac: Tensor
    approx_kl: Tensor
    ratio_mean: Tensor
    max_abs_log_ratio: Tensor  # max over valid tokens of |logp − logp_old|: exactly 0 ⇔ ratio exactly 1
    kl_loss: Tensor  # the KL loss term before β (0 unless kl_penalty=loss)
    ptx_loss: Tensor  # the ptx NLL before γ (0 unless ptx_coef > 0)


@dataclass(frozen=True)
class PPOStats:
    """What one update logs (RLHF_REFERENCE item 25), plots and checkpoints; plain floats."""

    update: float  # 1-based update (rollout) number
    score: float  # mean reward-model score (normalised, before penalties)
    score_final: float  # mean score entering the reward (after uncertainty, baseline, normalisation, EOS penalty, clip)
    score_vs_reference: float  # mean of score − b(x): gain over the reference's greedy answer to the same prompt (nan without score_baseline)
    reference_score: float  # mean b(x) of the batch's prompts (nan without score_baseline)
    kl: float  # mean over responses of Σ_t k1 (nats): the KL the controller sees
    kl_k2: float  # the same with k2
    kl_k3: float  # the same with k3
    beta: float  # β used for this rollout's rewards (or KL loss)
    non_score_reward: float  # mean over responses of Σ_t −β·kl_t (estimator ppo.kl_estimator)
    entropy: float  # mean token entropy at temperature T (rollout)
    approx_kl: float  # ½·mean((log ρ)²), averaged over all minibatches of the update
    approx_kl_first: float  # the same in the first minibatch of the first epoch: exactly 0
    max_abs_log_ratio_first: float  # max |log ρ| there: exactly 0 (ratio exactly 1)
    policy_clip_frac: float
    value_clip_frac: float
    explained_variance: float  # of the rollout's values against the returns
    response_length: float  # mean valid response tokens
    eos_rate: float  # fraction of responses that ended (EOS or stop string)
    advantage_mean: float  # before whitening
    advantage_std: float  # before whitening
    return_mean: float
    value_mean: float
    policy_loss: float
    value_loss: float
    loss: float
    kl_loss: float
    ptx_loss: float
    uncertainty: float  # mean reward-head uncertainty (nan when the head gives none)
    lr_policy: float
    lr_critic: float
    rollout_seconds: float
    train_seconds: float


PROGRESS_BAR = {"score": "score", "score_vs_reference": "vs_ref", "kl": "kl", "beta": "beta"}  # short names shown in the progress bar


def mean_stats(steps: Sequence[MinibatchStats]) -> MinibatchStats:
    """Element-wise mean over the minibatch steps of an update (max for ``max_abs_log_ratio``)."""
    stacked = {name: torch.stack([getattr(s, name) for s in steps]) for name in MinibatchStats._fields}
    return MinibatchStats(**{name: v.max() if name == "max_abs_log_ratio" else v.mean() for name, v in stacked.items()})


# --- checkpoints ----------------------------------------------------------------------------------


def find_checkpoint(resume: str) -> Path:
    """``+resume=``: a run directory (its ``checkpoints/latest.json`` pointer, else ``last.pt``) or a .pt file."""
    path = Path(resume).expanduser()
    if path.is_file():
        return path
    folder = path / CHECKPOINT_DIR
    pointer = folder / POINTER_FILE
    if pointer.is_file():
        named = folder / json.loads(pointer.read_text())["file"]
        if named.is_file():
            return named
    if (folder / CHECKPOINT_FILE).is_file():
        return folder / CHECKPOINT_FILE
    raise FileNotFoundError(f"resume={resume!r}: no checkpoint at {folder / CHECKPOINT_FILE}; valid: a PPO run directory "
                            f"with {CHECKPOINT_DIR}/{CHECKPOINT_FILE} (written every ppo.checkpoint_every updates) or a .pt file")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :meth:`PPOModule.save_checkpoint` (plain containers + tensors only)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: checkpoint format {state.get('format')!r}; this rlhf_pl reads {CHECKPOINT_FORMAT}")
    return state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the run uses: torch (CPU, CUDA), Python, NumPy and the sampling generator."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "sampling": generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": np_state["key"].numpy().astype(np.uint32), "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    generator.set_state(state["sampling"])


# --- the LightningModule --------------------------------------------------------------------------


class PPOModule(L.LightningModule):
    """PPO with manual optimisation: ``training_step`` = one rollout + its PPO epochs.

    Gets built objects: the models, the ``ppo`` settings (:class:`PPOConfig`), the sampler and KL
    controller plugins, the tokenized prompts, and optionally the ptx data and a checkpoint to
    resume from. ``rows_forwarded`` counts the rows each model processed per purpose (the check
    that no forward pass is done twice for the same purpose).
    """

    def __init__(self, models: PPOModels, ppo: PPOConfig, sampler: Any, kl_controller: Any, prompts: Sequence[Prompt],
                 prompt_items: Sequence[PromptItem], seed: int, run_dir: Path,
                 ptx: Optional[DemonstrationBatches] = None, resume_state: Optional[dict[str, Any]] = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.reference, self.scorer = models.policy, models.reference, models.scorer
        self.critic, self.value_head, self.tokenizer = models.critic, models.value_head, models.tokenizer
        self.sources = {"policy_from": models.policy_from, "reward_from": models.reward_from}
        self.ppo, self.sampler, self.kl_controller = ppo, sampler, kl_controller
        self.prompts, self.prompt_items, self.seed, self.run_dir, self.ptx = prompts, prompt_items, seed, run_dir, ptx
        self.generator = torch.Generator()
        self.moments = RunningMoments()
        self.baseline = (ReferenceBaseline(self.reference, self.scorer, self.tokenizer, ppo)
                         if ppo.score_baseline == "reference" else None)
        self.history: dict[str, list[float]] = {name: [] for name in (f.name for f in fields(PPOStats))}
        self.samples_md: list[str] = []
        self.rows_forwarded: Counter[str] = Counter()
        self.timings: Counter[str] = Counter()
        self.rollouts_done = 0
        self._resume_state = resume_state
        if resume_state is not None:
            self.rollouts_done = int(resume_state["rollouts_done"])

    # --- modes, optimizers, data ----------------------------------------------------------------

    def train(self, mode: bool = True) -> "PPOModule":
        """Lightning switches the whole module to train mode; the frozen models stay in eval mode."""
        super().train(mode)
        self.reference.eval()
        if isinstance(self.scorer, nn.Module):
            self.scorer.eval()
        return self

    @property
    def trained_critic(self) -> nn.Module:
        """What the critic optimizer trains: the separate critic, or the value head on the policy trunk."""
        return self.critic if self.critic is not None else self.value_head

    def configure_optimizers(self):
        """Adam (eps 1e-5) + linear decay over every optimizer step of the run, for policy and critic."""
        steps = self.ppo.updates * self.ppo.ppo_epochs * self.ppo.num_minibatches
        policy = build_optimizer(self.policy.parameters(), self.ppo.policy_optim, steps)
        critic = build_optimizer(self.trained_critic.parameters(), self.ppo.critic_optim, steps)
        return [policy["optimizer"], critic["optimizer"]], [policy["lr_scheduler"], critic["lr_scheduler"]]

    def train_dataloader(self) -> DataLoader:
        """Rollouts ``rollouts_done`` … ``updates − 1``; each rank its slice; prompts left-padded."""
        sampler = RolloutBatchSampler(len(self.prompt_items), self.ppo.batch_size, self.seed, self.ppo.updates,
                                      start=self.rollouts_done, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank)
        return DataLoader(self.prompt_items, batch_sampler=sampler, collate_fn=PromptCollator(self.tokenizer.pad_token_id))

    def on_train_start(self) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed + self.trainer.global_rank)
        if self._resume_state is not None:
            self.load_training_state(self._resume_state)
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            writer.add_text("ppo/kl_estimator", f"{self.ppo.kl_estimator}, in the {self.ppo.kl_penalty}; logged kl = Σ_t k1")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """RNG states are restored here, after Lightning created the data iterator (which draws a seed)."""
        if self._resume_state is not None:
            restore_rng_state(self._resume_state["rng"], self.generator)
            self._resume_state = None

    # --- one PPO update -------------------------------------------------------------------------

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        beta = float(self.kl_controller.value)
        started = time.perf_counter()
        rollout = self.rollout(batch)
        rollout_seconds = time.perf_counter() - started
        adv = compute_advantages(rollout, beta, self.ppo, all_reduce_sum)
        started = time.perf_counter()
        steps = self.optimise(rollout, adv, beta)
        stats = self.update_stats(rollout, adv, steps, beta, rollout_seconds, time.perf_counter() - started)
        self.kl_controller.update(stats.kl, self.ppo.batch_size * self.trainer.world_size)
        self.rollouts_done += 1
        self.log_stats(stats, rollout.sequences.shape[0])
        if self.rollouts_done % self.ppo.sample_every == 0 or self.rollouts_done == 1:
            self.write_samples(rollout)
        if self.rollouts_done % self.ppo.checkpoint_every == 0 or self.rollouts_done == self.ppo.updates:
            self.save_checkpoint()

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor]) -> Rollout:
        """Generate, score, and run policy, reference and critic once each over the episodes."""
        ppo, temperature = self.ppo, self.sampler.temperature
        with self.timed("generation"), weights_cast_once(self.device):
            gen = generate(self.policy, batch["input_ids"], batch["attention_mask"], self.sampler, ppo.max_new_tokens,
                           eos_token_id=self.tokenizer.eos_token_id, pad_token_id=self.tokenizer.pad_token_id,
                           generator=self.generator)
        mask, stopped = cut_at_stop_strings(gen.response, gen.response_mask, self.tokenizer, ppo.stop_strings)
        ended = gen.ended | stopped
        p = gen.prompt_length
        attention_mask = torch.cat([batch["attention_mask"], mask], dim=1)
        self.rows_forwarded["generation_tokens"] += int(mask.sum())
        with self.timed("scoring"):
            out = self.scorer(gen.sequences, attention_mask)
            self.rows_forwarded["reward"] += gen.sequences.shape[0]
        baselines = None
        if self.baseline is not None:
            with self.timed("reference_baseline"):
                baselines, computed = self.baseline(batch["input_ids"], batch["attention_mask"], batch["index"])
            self.rows_forwarded["reference_greedy"] += computed
        scores = process_scores(out, ended, ppo, self.moments, all_reduce_sum, baselines)
        logprobs, ref_logprobs, values, entropy = self.rollout_passes(gen.sequences, attention_mask, p, temperature)
        return Rollout(gen.sequences, attention_mask, p, mask, ended, logprobs, ref_logprobs, values, entropy,
                       out.rewards.float(), scores, out.uncertainty, batch["index"], baselines)

    def rollout_passes(self, sequences: Tensor, attention_mask: Tensor, p: int, temperature: float) -> tuple[Tensor, ...]:
        """Policy logprobs + entropy, reference logprobs, values: one pass per model, in the chunks the
        first PPO epoch uses as minibatches. Shapes: (b, p + n) -> four (b, n) tensors."""
        parts: dict[str, list[Tensor]] = {"logprobs": [], "ref": [], "values": [], "entropy": []}
        for rows in minibatch_rows(sequences.shape[0], self.ppo.num_minibatches, None):
            seq, am = sequences[rows], attention_mask[rows]
            with self.timed("policy_logprobs"):
                ev = evaluate_policy(self.policy, seq, am, p, temperature, self.value_head, with_entropy=True)
            with self.timed("reference"):
                parts["ref"].append(evaluate_policy(self.reference, seq, am, p, temperature).logprobs)
            with self.timed("values"):
                parts["values"].append(ev.values if self.critic is None else self.critic(seq, am, p))
            parts["logprobs"].append(ev.logprobs)
            parts["entropy"].append(ev.entropy)
            for purpose in ("policy_rollout", "reference", "critic_rollout" if self.critic is not None else "values_from_policy"):
                self.rows_forwarded[purpose] += len(rows)
        return tuple(torch.cat(parts[k]) for k in ("logprobs", "ref", "values", "entropy"))

    def optimise(self, rollout: Rollout, adv: Advantages, beta: float) -> list[MinibatchStats]:
        """``ppo_epochs`` × ``num_minibatches`` steps; epoch 1 in rollout order, later epochs shuffled
        with a generator seeded by (seed, update, epoch). Returns each step's stats, in order."""
        steps = []
        for epoch in range(self.ppo.ppo_epochs):
            generator = None if epoch == 0 else torch.Generator().manual_seed(hash((self.seed, self.rollouts_done, epoch)) % 2 ** 63)
            for rows in minibatch_rows(rollout.sequences.shape[0], self.ppo.num_minibatches, generator):
                with self.timed("optimisation"):
                    steps.append(self.minibatch_step(rollout, adv, rows, beta, len(steps)))
        return steps

    def minibatch_step(self, rollout: Rollout, adv: Advantages, rows: Tensor, beta: float, step: int) -> MinibatchStats:
        """One step of both optimizers on a minibatch, minimising pg + c_v·vf (+ extras).

        With a separate critic the two networks share no parameter, so the policy's terms and c_v·vf
        are backpropagated one after the other (same gradients as one backward of the sum, half the
        peak activation memory). Then per optimizer: clip the gradient norm, step; schedulers step.
        """
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        terms = self.policy_objective(rollout, adv, rows, beta, step)
        check_finite_loss(terms.loss, stage="ppo", step=self.rollouts_done + 1, lr=self.ppo.policy_optim.lr,
                          lr_key="ppo.policy_optim.lr")
        self.manual_backward(terms.loss)
        vf, total = terms.vf, terms.loss.detach()
        if vf is None:
            vf = self.critic_objective(rollout, adv, rows)
            check_finite_loss(vf.loss, stage="ppo", step=self.rollouts_done + 1, lr=self.ppo.critic_optim.lr,
                              lr_key="ppo.critic_optim.lr")
            self.manual_backward(self.ppo.vf_coef * vf.loss)
            total = total + self.ppo.vf_coef * vf.loss.detach()
        for optimizer in optimizers:
            if self.ppo.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        pg = terms.pg
        return MinibatchStats(total, pg.loss.detach(), vf.loss.detach(), pg.clip_frac, vf.clip_frac, pg.approx_kl,
                              pg.ratio_mean, terms.max_abs_log_ratio, terms.kl_loss, terms.ptx_loss)

    def policy_objective(self, rollout: Rollout, adv: Advantages, rows: Tensor, beta: float, step: int) -> PolicyTerms:
        """The policy's loss on one minibatch: pg (− entropy bonus + β·KL loss + γ_ptx·NLL), plus
        c_v·vf when the value head sits on the policy trunk (one forward pass for both)."""
        ppo, p, mask = self.ppo, rollout.prompt_length, rollout.mask[rows]
        seq, am, old = rollout.sequences[rows], rollout.attention_mask[rows], rollout.logprobs[rows]
        ev = evaluate_policy(self.policy, seq, am, p, self.sampler.temperature, self.value_head, with_entropy=ppo.entropy_coef > 0)
        self.rows_forwarded["policy_train"] += len(rows)
        pg = policy_loss(ev.logprobs, old, adv.advantages[rows], mask, ppo.clip_eps)
        loss, vf, zero = pg.loss, None, pg.loss.new_zeros(())
        if ev.values is not None:
            vf = value_loss(ev.values, rollout.values[rows], adv.returns[rows], mask, ppo.value_clip)
            loss = loss + ppo.vf_coef * vf.loss
        if ppo.entropy_coef > 0:
            loss = loss - ppo.entropy_coef * masked_mean(ev.entropy, mask)
        kl_term = kl_loss(ev.logprobs, rollout.ref_logprobs[rows], mask, ppo.kl_estimator) if ppo.kl_penalty == "loss" else zero
        ptx_term = self.ptx_nll(step) if self.ptx is not None else zero
        loss = loss + beta * kl_term + ppo.ptx_coef * ptx_term
        max_log_ratio = valid_only((ev.logprobs - old).abs(), mask).max().detach()
        return PolicyTerms(loss, pg, vf, kl_term.detach(), ptx_term.detach(), max_log_ratio)

    def critic_objective(self, rollout: Rollout, adv: Advantages, rows: Tensor) -> ValueLossOutput:
        """The separate critic's clipped value loss on one minibatch (scaled by c_v by the caller)."""
        seq, am, mask = rollout.sequences[rows], rollout.attention_mask[rows], rollout.mask[rows]
        values = self.critic(seq, am, rollout.prompt_length)
        self.rows_forwarded["critic_train"] += len(rows)
        return value_loss(values, rollout.values[rows], adv.returns[rows], mask, self.ppo.value_clip)

    def ptx_nll(self, step: int) -> Tensor:
        """Mean NLL of the assistant tokens of one demonstration batch (PPO-ptx). Returns a scalar."""
        global_step = (self.rollouts_done * self.ppo.ppo_epochs * self.ppo.num_minibatches + step) * self.trainer.world_size + self.trainer.global_rank
        batch = {k: v.to(self.device) for k, v in self.ptx(global_step).items()}
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        self.rows_forwarded["policy_ptx"] += batch["input_ids"].shape[0]
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # --- diagnostics ----------------------------------------------------------------------------

    def update_stats(self, rollout: Rollout, adv: Advantages, steps: Sequence[MinibatchStats], beta: float,
                     rollout_seconds: float, train_seconds: float) -> PPOStats:
        """Everything item 25 asks for, as floats; means are over the episodes / valid tokens of all
        ranks (explained variance and the minibatch losses are this rank's)."""
        mask, r = rollout.mask, rollout
        per_estimator = {e: valid_only(kl_estimate(r.logprobs, r.ref_logprobs, e), mask).sum(1) for e in KL_ESTIMATORS}
        mean = lambda x: float(self.global_mean(x))  # noqa: E731
        avg, first = mean_stats(steps), steps[0]
        lrs = [opt.param_groups[0]["lr"] for opt in self.optimizers()]
        return PPOStats(
            update=float(self.rollouts_done + 1), score=mean(r.rm_scores), score_final=mean(r.scores),
            score_vs_reference=mean(r.rm_scores - r.baselines) if r.baselines is not None else math.nan,
            reference_score=mean(r.baselines) if r.baselines is not None else math.nan,
            kl=mean(sequence_kl(r.logprobs, r.ref_logprobs, mask)), kl_k2=mean(per_estimator["k2"]), kl_k3=mean(per_estimator["k3"]),
            beta=beta, non_score_reward=mean(adv.non_score.sum(1)), entropy=float(masked_mean(r.entropy, mask, all_reduce=all_reduce_sum)),
            approx_kl=float(avg.approx_kl), approx_kl_first=float(first.approx_kl), max_abs_log_ratio_first=float(first.max_abs_log_ratio),
            policy_clip_frac=float(avg.policy_clip_frac), value_clip_frac=float(avg.value_clip_frac),
            explained_variance=float(explained_variance(r.values, adv.returns, mask)), response_length=mean(mask.sum(1).float()),
            eos_rate=mean(r.ended.float()), advantage_mean=float(adv.raw_mean), advantage_std=float(adv.raw_std),
            return_mean=float(masked_mean(adv.returns, mask, all_reduce=all_reduce_sum)),
            value_mean=float(masked_mean(r.values, mask, all_reduce=all_reduce_sum)),
            policy_loss=float(avg.policy_loss), value_loss=float(avg.value_loss), loss=float(avg.loss),
            kl_loss=float(avg.kl_loss), ptx_loss=float(avg.ptx_loss),
            uncertainty=mean(r.uncertainty.float()) if r.uncertainty is not None else math.nan,
            lr_policy=lrs[0], lr_critic=lrs[1], rollout_seconds=rollout_seconds, train_seconds=train_seconds,
        )

    def global_mean(self, x: Tensor) -> Tensor:
        """Mean of a (b,) tensor over the episodes of all ranks."""
        total = all_reduce_sum(torch.stack([x.float().sum(), torch.tensor(float(x.numel()), device=x.device)]))
        return total[0] / total[1]

    def log_stats(self, stats: PPOStats, batch_size: int) -> None:
        """Every field to the loggers as ``ppo/<name>``; score, kl and beta to the progress bar."""
        values = asdict(stats)
        for name, value in values.items():
            self.history[name].append(value)
            if name != "update" and not math.isnan(value):  # nan: not measured in this run (no baseline, no uncertainty)
                self.log(f"ppo/{name}", value, batch_size=batch_size, on_step=True, on_epoch=False)
        for name, short in PROGRESS_BAR.items():
            if math.isnan(values[name]):
                continue
            self.log(short, values[name], prog_bar=True, logger=False, batch_size=batch_size, on_step=True, on_epoch=False)
        log.info("update %d/%d: score %.3f (vs reference %.3f), kl %.3f, beta %.4f, approx_kl %.4f, clip %.3f, length %.1f, eos %.2f (%.1f s)",
                 self.rollouts_done, self.ppo.updates, stats.score, stats.score_vs_reference, stats.kl, stats.beta, stats.approx_kl, stats.policy_clip_frac,
                 stats.response_length, stats.eos_rate, stats.rollout_seconds + stats.train_seconds)

    def write_samples(self, rollout: Rollout) -> None:
        """A Markdown table of prompts, responses and scores to TensorBoard text and ``samples.md``."""
        if not self.trainer.is_global_zero or self.ppo.num_samples == 0:
            return
        rows = sample_rows(rollout, self.tokenizer, self.prompts, self.ppo.num_samples)
        table = markdown_table(rows)
        self.samples_md.append(f"## update {self.rollouts_done}\n\n{table}\n")
        write_text(self.run_dir / "samples.md", "# PPO samples\n\n" + "\n".join(self.samples_md))
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            writer.add_text("ppo/samples", table, global_step=self.rollouts_done)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Accumulate the wall-clock seconds of a phase in ``self.timings``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - started

    # --- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self) -> Optional[Path]:
        """``<run_dir>/checkpoints/last.pt`` (atomic), then the ``latest.json`` pointer. Rank 0 only."""
        if not self.trainer.is_global_zero:
            return None
        optimizers, schedulers, started = self.optimizers(), self.lr_schedulers(), time.perf_counter()
        state = {
            "format": CHECKPOINT_FORMAT, "rollouts_done": self.rollouts_done, "updates": self.ppo.updates,
            "policy": self.policy.state_dict(), "critic": self.trained_critic.state_dict(),
            "optimizers": [opt.optimizer.state_dict() for opt in optimizers],
            "schedulers": [sch.state_dict() for sch in schedulers],
            "kl_controller": self.kl_controller.state_dict(), "score_moments": asdict(self.moments),
            "reference_baseline": self.baseline.state_dict() if self.baseline is not None else {},
            "rng": rng_state(self.generator), "history": self.history, "samples_md": self.samples_md,
            "sources": self.sources, "ppo": asdict(self.ppo), "seed": self.seed,
        }
        path = torch_save(state, self.run_dir / CHECKPOINT_DIR / CHECKPOINT_FILE)
        write_json(path.parent / POINTER_FILE, {"file": CHECKPOINT_FILE, "rollouts_done": self.rollouts_done,
                                                      "updates": self.ppo.updates})
        log.info("checkpoint after update %d: %s (%.1f s)", self.rollouts_done, path, time.perf_counter() - started)
        return path

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`save_checkpoint` wrote (RNG states follow at the first batch)."""
        self.policy.load_state_dict(state["policy"])
        self.trained_critic.load_state_dict(state["critic"])
        for optimizer, saved in zip(self.optimizers(), state["optimizers"]):
            optimizer.optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.lr_schedulers(), state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.moments = RunningMoments(**state["score_moments"])
        if self.baseline is not None:
            self.baseline.load_state_dict(state.get("reference_baseline", {}))
        self.history = {name: list(values) for name, values in state["history"].items()}
        self.samples_md = list(state["samples_md"])
        loop = self.trainer.fit_loop.epoch_loop
        if hasattr(loop, "_batches_that_stepped"):  # logger steps continue from the checkpoint's update
            loop._batches_that_stepped = self.rollouts_done
        log.info("resumed after update %d of %d", self.rollouts_done, self.ppo.updates)


# --- samples, curves, summary ---------------------------------------------------------------------


def sample_rows(rollout: Rollout, tokenizer: Any, prompts: Sequence[Prompt], n: int) -> list[dict[str, str]]:
    """The first ``n`` episodes as table rows: last prompt turn, response, scores, KL, ended."""
    kl = sequence_kl(rollout.logprobs, rollout.ref_logprobs, rollout.mask)
    response = rollout.sequences[:, rollout.prompt_length:]
    rows = []
    for i in range(min(n, response.shape[0])):
        text = tokenizer.decode(response[i, rollout.mask[i].bool()].tolist(), skip_special_tokens=True).strip()
        rows.append({
            "prompt": prompts[int(rollout.prompt_index[i])].messages[-1].content, "response": text,
            "score": f"{float(rollout.rm_scores[i]):.3f}", "final score": f"{float(rollout.scores[i]):.3f}",
            "KL": f"{float(kl[i]):.3f}", "ended": "yes" if bool(rollout.ended[i]) else "no",
        })
    return rows


def plot_run(history: dict[str, list[float]], path: Path, title: str, kl_target: Optional[float]) -> Path:
    """Score (per update, and its running mean over 5 updates: one batch's score is noisy), the score
    minus the reference's on the same prompts (with ``ppo.score_baseline=reference``: the part the
    policy changes, free of the prompt mix), KL (with the controller's target as a dashed line) and
    β over updates. The per-update score panels carry their least-squares line (:func:`linear_trend`)."""
    xs = history["update"]
    curves = {"score": (xs, history["score"]), "score, mean of 5": (xs, running_mean(history["score"], 5))}
    fitted = ["score"]
    if history["score_vs_reference"] and not any(math.isnan(v) for v in history["score_vs_reference"]):
        curves["score − reference"] = (xs, history["score_vs_reference"])
        curves["score − reference, mean of 5"] = (xs, running_mean(history["score_vs_reference"], 5))
        fitted.append("score − reference")
    curves.update({"kl": (xs, history["kl"]), "beta": (xs, history["beta"])})
    overlays = {}
    for name in fitted:
        trend = linear_trend(curves[name][1])
        overlays[name] = (trend.line(len(xs)), f"least squares: rise {trend.rise:+.3f}" + ("" if math.isnan(trend.t) else f", t {trend.t:+.1f}"))
    return plot_curves(curves, path, title=title, xlabel="update", hlines={"kl": kl_target} if kl_target is not None else None,
                       overlays=overlays)


def summarise(module: PPOModule, kl_name: str) -> dict[str, Any]:
    """The summary's metrics. Scores are averaged over a quarter of the updates (at least one):
    ``initial_score`` over the first, ``final_score`` over the last; ``objective`` = −final_score.
    The same for the score minus the reference's on the same prompts (null without a baseline).
    ``*_trend``: the least-squares line through every update's value (:func:`linear_trend`), its
    rise over the run and t = slope / standard error — whether a short run's change is beyond noise."""
    h = module.history
    quarter = max(1, len(h["score"]) // 4)
    initial, final = sum(h["score"][:quarter]) / quarter, sum(h["score"][-quarter:]) / quarter
    vs_ref = h["score_vs_reference"]  # nan without ppo.score_baseline: reported as null
    vs_initial, vs_final = (None, None) if any(math.isnan(v) for v in vs_ref) else (
        sum(vs_ref[:quarter]) / quarter, sum(vs_ref[-quarter:]) / quarter)
    seconds = [a + b for a, b in zip(h["rollout_seconds"], h["train_seconds"])]
    return {
        "objective": -final, "final_score": final, "initial_score": initial, "score_gain": final - initial,
        "initial_score_vs_reference": vs_initial, "final_score_vs_reference": vs_final,
        "score_vs_reference_gain": vs_final - vs_initial if vs_final is not None else None,
        "score_trend": _plain_trend(h["score"]),
        "score_vs_reference_trend": _plain_trend(vs_ref) if vs_final is not None else None,
        "final_kl": h["kl"][-1], "final_beta": float(module.kl_controller.value), "kl_controller": kl_name,
        "kl_target": getattr(module.kl_controller, "target", None), "kl_estimator": module.ppo.kl_estimator,
        "updates": module.rollouts_done, "seconds_per_update": sum(seconds) / len(seconds),
        "approx_kl_first": h["approx_kl_first"][-1], "max_abs_log_ratio_first": h["max_abs_log_ratio_first"][-1],
        **module.sources,
    }


def _plain_trend(values: Sequence[float]) -> dict[str, Optional[float]]:
    return linear_trend(values).plain()


def _trend_text(trend: Optional[dict[str, Optional[float]]]) -> str:
    if trend is None:
        return "not measured (ppo.score_baseline=none)"
    return f"{trend['rise']:+.3f}" + (f" (t {trend['t']:+.1f})" if trend["t"] is not None else "")


# --- the stage ------------------------------------------------------------------------------------


def build_kl_controller(cfg: DictConfig) -> tuple[Any, str]:
    """The ``kl_controller`` plugin and its name."""
    if cfg.kl_controller is None:
        names = ", ".join(p.name for p in registry.installed("kl_controllers"))
        raise ValueError(f"kl_controller is unset; choose one with kl_controller=<name>: {names}")
    return registry.build("kl_controllers", cfg.kl_controller), registry.spec_for_config("kl_controllers", cfg.kl_controller).name


def build_sampler(cfg: DictConfig) -> Any:
    """The ``sampler`` plugin; a filtering one (top-k, top-p) is allowed but warned about."""
    name = registry.spec_for_config("samplers", cfg.sampler).name
    if name != "temperature":
        log.warning("sampler=%s filters tokens, but PPO's logprobs, KL and entropy use softmax(logits / T) without the "
                    "filter; the published implementations sample with plain temperature (sampler=temperature)", name)
    return registry.build("samplers", cfg.sampler)


def resume_state_of(cfg: DictConfig, ppo: PPOConfig) -> Optional[dict[str, Any]]:
    """The checkpoint named by ``resume`` (None without), checked against this run's settings."""
    if not cfg.get("resume"):
        return None
    path = find_checkpoint(str(cfg.resume))
    state = load_checkpoint(path)
    if state["rollouts_done"] >= ppo.updates:
        raise ValueError(f"resume={cfg.resume!r}: that run has done {state['rollouts_done']} updates and ppo.updates={ppo.updates}; "
                         "raise ppo.updates to continue it")
    changed = {k: (v, getattr(ppo, k)) for k, v in state["ppo"].items() if hasattr(ppo, k) and _plain(getattr(ppo, k)) != v}
    if changed or state["seed"] != cfg.seed:
        log.warning("resuming with settings that differ from the checkpoint's (old, new): %s%s", changed,
                    f"; seed {state['seed']} -> {cfg.seed}" if state["seed"] != cfg.seed else "")
    log.info("resuming from %s (update %d of %d)", path, state["rollouts_done"], ppo.updates)
    return state


def _plain(value: Any) -> Any:
    return asdict(value) if hasattr(value, "__dataclass_fields__") else value


def input_dirs(cfg: DictConfig, inputs: Any, state: Optional[dict[str, Any]], scorer: Optional[Scorer]) -> tuple[Path, Optional[Path]]:
    """SFT policy and reward model directories: the checkpoint's when resuming, else the stage inputs."""
    if state is None:
        return inputs["policy"], None if scorer is not None else inputs["reward_model"]
    sources = state["sources"]
    specs = [("policy_from", INPUTS["policy"])] + ([("reward_from", INPUTS["reward_model"])] if scorer is None else [])
    for key, spec in specs:
        check_input(spec, Path(sources[key]), f"resume={cfg.resume!r}: the checkpoint's {key}")
    return Path(sources["policy_from"]), None if scorer is not None else Path(sources["reward_from"])


def load_prompt_data(cfg: DictConfig) -> list[Prompt]:
    if not cfg.data.prompts:
        raise ValueError("data.prompts is unset: PPO samples its episodes from prompts (e.g. data.prompts=embedded:prompts)")
    return load_prompts(cfg.data.prompts, split=cfg.data.split, limit=cfg.data.limit)


def build_trainer(cfg: DictConfig, run_dir: Path, precision: Any, callbacks: Sequence[Any]) -> L.Trainer:
    """The trainer in manual-optimisation mode: one epoch whose batches are the rollouts, logging
    every update. Lightning's own ModelCheckpoint is removed: the module writes its resumable
    checkpoints itself (a Lightning one would duplicate them and include the frozen models)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    trainer = make_trainer(cfg, run_dir, precision, callbacks=callbacks, manual_optimization=True, max_epochs=1,
                           max_steps=-1, log_every_n_steps=1, limit_train_batches=None, use_distributed_sampler=False)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")  # the frozen models
    return trainer


def run(cfg: DictConfig, run_dir: Path, inputs: Any, *, scorer: Optional[Scorer] = None,
        callbacks: Sequence[Any] = ()) -> StageResult:
    """The PPO stage. ``scorer`` replaces the reward model (tests: rule-based rewards); ``callbacks``
    are extra Lightning callbacks (tests: interrupting a run)."""
    ppo: PPOConfig = OmegaConf.to_object(cfg.ppo)
    check_stage_config(ppo)
    # refuses impossible combinations before any model is loaded
    precision = build_for_stage(cfg, "ppo", frozen=("reference", "reward model"))
    state = resume_state_of(cfg, ppo)
    policy_dir, reward_dir = input_dirs(cfg, inputs, state, scorer)
    models = build_models(cfg, policy_dir, reward_dir, scorer, precision)
    log.info("policy and reference from %s; reward model from %s; critic: %s", models.policy_from, models.reward_from, ppo.critic)

    prompts = load_prompt_data(cfg)
    items = tokenize_prompts(prompts, models.tokenizer, cfg.data.max_prompt_length)
    ptx = load_demonstrations(cfg, models.tokenizer, ppo) if ppo.ptx_coef > 0 else None
    sampler = build_sampler(cfg)
    kl_controller, kl_name = build_kl_controller(cfg)
    log.info("%d prompts (%s); sampler %r; KL controller %s (β₀=%.4g); KL estimator %s in the %s",
             len(prompts), cfg.data.prompts, sampler, kl_name, kl_controller.value, ppo.kl_estimator, ppo.kl_penalty)

    module = PPOModule(models, ppo, sampler, kl_controller, prompts, items, cfg.seed, run_dir, ptx, state)
    trainer = build_trainer(cfg, run_dir, precision, callbacks)
    trainer.fit(module)

    plot_run(module.history, run_dir / "ppo_curves.png", f"PPO {cfg.model.name} ({kl_name} KL controller)",
             getattr(kl_controller, "target", None))
    out_dir = run_dir / "policy"
    if trainer.is_global_zero:
        save_pretrained_atomic(precision.export(module.policy), models.tokenizer, out_dir)  # lora/qlora: merged
    summary = summarise(module, kl_name)
    log.info("trend over %d updates (fitted rise, t = slope/standard error; |t| > 2 is beyond the update-to-update noise): "
             "score %s; score − reference %s", module.rollouts_done, _trend_text(summary["score_trend"]),
             _trend_text(summary["score_vs_reference_trend"]))
    return StageResult({"policy": out_dir}, {
        **summary, "resumed_from": str(cfg.resume) if state is not None else None,
        "rows_forwarded": dict(module.rows_forwarded), "seconds_by_phase": {k: round(v, 3) for k, v in module.timings.items()}})
