"""Stage 3 — reward model from K-wise rankings of completions (InstructGPT).

``python -m rlhf_pl +stage=rm [reward_head=linear|mlp|ensemble|<installed>] [model=...] [data=...]``

Reads top to bottom: rankings (load, validate, split) → initial model (``rm.init_from``: the
latest SFT output of this model, else the base model, or a directory) → reward model = its trunk +
the reward-head plugin (or, when ``rm.init_from`` is a reward model this stage wrote, that model,
head included, trained further) → tokenize (prompt chat-templated, each completion appended) → one batch
element per prompt with all its K completions, flattened so that every completion goes through the
model exactly once and all K·(K−1)/2 pairs enter the loss → fit → validation metrics (pairwise
accuracy, mean margin, Kendall τ for K > 2) → normalisation (gain/bias) fitted on a reference set →
export with :meth:`RewardModel.save_pretrained` to ``<run_dir>/reward_model``, recorded as this
model's latest RM output. Settings: :class:`rlhf_pl.config.RMConfig` (``rm.*``); the head's
under ``reward_head.*``.
"""
from __future__ import annotations

import functools
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric
from torchmetrics.functional import kendall_rank_corrcoef

from rlhf_pl import registry
from rlhf_pl.config import OVERLONG_RULES, OptimConfig
from rlhf_pl.data.chat import LengthReport, tokenize_completion, tokenize_prompt
from rlhf_pl.data.collate import batched_loader, pad_right, pad_shared_prefix
from rlhf_pl.data.formats import Conversation, Ranking, load_conversations, load_prompts, load_rankings, train_val_split
from rlhf_pl.errors import ConfigError
from rlhf_pl.models.loading import load_model_and_tokenizer
from rlhf_pl.models.reward import REWARD_CONFIG, RewardModel, RewardOutput
from rlhf_pl.optim import build_optimizer
from rlhf_pl.outputs import InputSpec, index_path, model_config_at
from rlhf_pl.plugins.reward_heads import HeadChoice, resolve_head
from rlhf_pl.precision import build_for_stage
from rlhf_pl.report import plot_curves
from rlhf_pl.rl.masked import all_reduce_sum
from rlhf_pl.rl.ranking import RankingLossOutput, all_pairs, group_positions, kwise_ranking_loss
from rlhf_pl.sampling import build_backend, model_device, sample_texts
from rlhf_pl.stages import StageResult
from rlhf_pl.strategies import consolidated
from rlhf_pl.training import check_finite_loss, global_mean, make_trainer

log = logging.getLogger(__name__)

DEFAULT_HEAD = "linear"


# --- data: one ranking = one batch element ---------------------------------------------------------


@dataclass(frozen=True)
class TokenizedRanking:
    """One prompt's K completions as token sequences (prompt + completion each) and their ranking.

    ``groups``: tie groups of indices into ``sequences``, best first.
    """

    sequences: tuple[tuple[int, ...], ...]
    groups: tuple[tuple[int, ...], ...]


def fit_to_length(
    prompt: Sequence[int], completions: Sequence[Sequence[int]], max_length: int
) -> tuple[tuple[tuple[int, ...], ...], bool]:
    """``prompt + completion`` for each completion, at most ``max_length`` tokens; and whether cut.

    All K sequences share one prompt cut so they stay comparable. The prompt loses tokens at its
    start (its end holds the generation prompt the answer follows). If that would leave the prompt
    less than ``min(len(prompt), max_length // 2)`` tokens, the prompt keeps that many and the
    completions are cut at their end instead.
    """
    longest = max(len(c) for c in completions)
    if len(prompt) + longest <= max_length:
        return tuple(tuple(prompt) + tuple(c) for c in completions), False
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    kept_prompt = tuple(prompt[len(prompt) - keep:])
    room = max_length - keep
    return tuple(kept_prompt + tuple(c[:room]) for c in completions), True


def tokenize_rankings(
    rankings: Sequence[Ranking], tokenizer: Any, max_length: int, rule: str
) -> tuple[list[TokenizedRanking], LengthReport]:
    """Chat-template each prompt once, append each completion (with its end-of-turn marker).

    ``rule`` (``data.overlong``): ``truncate`` cuts as :func:`fit_to_length` does, ``drop`` drops
    every ranking with an over-long sequence.
    """
    if rule not in OVERLONG_RULES:
        raise ConfigError(f"data.overlong={rule!r}; choose one of: {', '.join(OVERLONG_RULES)}")
    items: list[TokenizedRanking] = []
    truncated = dropped = 0
    for ranking in rankings:
        prompt = tokenize_prompt(tokenizer, ranking.prompt)
        completions = [tokenize_completion(tokenizer, c) for c in ranking.completions]
        sequences, cut = fit_to_length(prompt, completions, max_length)
        if cut and rule == "drop":
            dropped += 1
            continue
        truncated += int(cut)
        items.append(TokenizedRanking(sequences, ranking.ranking))
    return items, LengthReport(kept=len(items), truncated=truncated, dropped=dropped)


@dataclass
class RankingBatch:
    """A batch of P prompts with n = Σ K_p completions, flattened.

    Shapes: input_ids, attention_mask (n, t), a prompt's rows sharing columns [0, prefix_length) (their
    common prefix, left-padded; the rest right-padded: :func:`pad_shared_prefix`); pair_index
    (n_pairs, 2) (winner, loser) rows of the flattened batch; pair_prompt (n_pairs,) prompt of each
    pair; completion_prompt (n,) prompt of each completion; rank_position (n,) tie-group index in its
    ranking (0 = best).
    """

    input_ids: Tensor
    attention_mask: Tensor
    pair_index: Tensor
    pair_prompt: Tensor
    completion_prompt: Tensor
    rank_position: Tensor
    n_prompts: int
    prefix_length: int = 0


class RankingCollator:
    """Flattens the K completions of every prompt into one (n, t) batch, each prompt's rows sharing their
    common prefix's columns, + pair indices."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, items: Sequence[TokenizedRanking]) -> RankingBatch:
        pairs, pair_prompt, completion_prompt, positions = [], [], [], []
        offset = 0
        for p, item in enumerate(items):
            k = len(item.sequences)
            winners, losers = all_pairs(item.groups)
            pairs.append(torch.stack([winners, losers], dim=1) + offset)  # (pairs_p, 2)
            pair_prompt.append(torch.full((len(winners),), p, dtype=torch.long))
            completion_prompt.append(torch.full((k,), p, dtype=torch.long))
            positions.append(group_positions(item.groups, k))
            offset += k
        input_ids, attention_mask, prefix = pad_shared_prefix([item.sequences for item in items], self.pad_id)
        return RankingBatch(
            input_ids, attention_mask, torch.cat(pairs), torch.cat(pair_prompt),
            torch.cat(completion_prompt), torch.cat(positions), len(items), prefix,
        )


def make_loader(items: list[TokenizedRanking], pad_id: int, batch_size: int, seed: int, trainer: Any, *, train: bool,
                group_by_length: bool = True) -> DataLoader:
    """This rank's batches of ``batch_size`` prompts (each with all its completions), grouped by the
    length of each prompt's longest sequence (the batch pads to it): training shuffled, validation in order."""
    lengths = [max(len(s) for s in item.sequences) for item in items]
    return batched_loader(items, lengths, RankingCollator(pad_id), batch_size, seed, shuffle=train,
                          group=group_by_length or not train, world_size=trainer.world_size, rank=trainer.global_rank)


# --- loss and metrics ------------------------------------------------------------------------------


def ranking_loss(out: RewardOutput, batch: RankingBatch) -> RankingLossOutput:
    """K-wise loss of the raw rewards; a multi-member head (ensemble) trains each member on its own
    loss (mean over members) while accuracy and margin are those of the mean reward."""
    result = kwise_ranking_loss(out.raw, batch.pair_index, batch.pair_prompt, batch.n_prompts)
    if out.members is None:
        return result
    member_losses = [
        kwise_ranking_loss(out.members[:, m], batch.pair_index, batch.pair_prompt, batch.n_prompts).loss
        for m in range(out.members.shape[1])
    ]
    return result._replace(loss=torch.stack(member_losses).mean())


def kendall_per_prompt(rewards: Tensor, rank_position: Tensor, completion_prompt: Tensor, n_prompts: int) -> Tensor:
    """Kendall τ-b between each prompt's rewards and its labelled ranking, for prompts with K > 2.

    Shapes: rewards, rank_position, completion_prompt (n,) -> (n_ranked,). Prompts whose rewards
    are all equal (τ undefined) are left out. τ-b counts tied labels in its denominator, so with tie
    groups and distinct rewards it stays below 1 (one winner over three tied losers: at most 1/√2).
    """
    taus = []
    for p in range(n_prompts):
        sel = completion_prompt == p
        if int(sel.sum()) <= 2:
            continue
        tau = kendall_rank_corrcoef(rewards[sel].float(), -rank_position[sel].float(), variant="b")
        if not torch.isnan(tau):
            taus.append(tau)
    return torch.stack(taus) if taus else rewards.new_zeros(0)


# --- the LightningModule ---------------------------------------------------------------------------


class RewardModelModule(L.LightningModule):
    """Trains a :class:`RewardModel` on :class:`RankingBatch` es with the K-wise ranking loss."""

    def __init__(self, reward_model: RewardModel, optim: OptimConfig) -> None:
        super().__init__()
        self.reward_model = reward_model
        self.optim = optim
        self.val_loss = MeanMetric()
        self.val_accuracy = MeanMetric()
        self.val_margin = MeanMetric()
        self.val_kendall = MeanMetric()
        self.val_results: dict[str, float] = {}
        self.history: dict[str, tuple[list[float], list[float]]] = {
            "train/loss": ([], []), "train/accuracy": ([], []), "val/accuracy": ([], []),
        }
        self._step_started = 0.0
        self._pairs_seen = 0
        self._train_seconds = 0.0

    def forward(self, input_ids: Tensor, attention_mask: Tensor, prefix_length: int = 0) -> RewardOutput:
        return self.reward_model(input_ids, attention_mask, prefix_length)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_started = time.perf_counter()

    def training_step(self, batch: RankingBatch, batch_idx: int) -> Tensor:
        """The ranking loss averaged over the prompts (with a pair) of every rank's batch; accuracy and
        margin averaged over every rank's pairs (:func:`global_mean`)."""
        result = ranking_loss(self(batch.input_ids, batch.attention_mask, batch.prefix_length), batch)
        pairs = batch.pair_index.shape[0]
        prompts_with_pairs = int((torch.bincount(batch.pair_prompt, minlength=batch.n_prompts) > 0).sum())
        loss = global_mean(result.loss * prompts_with_pairs, prompts_with_pairs)  # loss = Σ / prompts
        check_finite_loss(loss.value, stage="rm", step=self.global_step, lr=self.optim.lr, lr_key="rm.optim.lr")
        accuracy = global_mean(result.accuracy * pairs, pairs).value
        n = batch.n_prompts
        self.log("train/loss", loss.value, prog_bar=True, batch_size=n)
        self.log("train/accuracy", accuracy, prog_bar=True, batch_size=n)
        self.log("train/margin", global_mean(result.margin * pairs, pairs).value, batch_size=n)
        self.history["train/loss"][0].append(self.global_step)
        self.history["train/loss"][1].append(float(loss.value))
        self.history["train/accuracy"][0].append(self.global_step)
        self.history["train/accuracy"][1].append(float(accuracy))
        return loss.loss

    def on_train_batch_end(self, outputs: Any, batch: RankingBatch, batch_idx: int) -> None:
        """Comparisons per second of all ranks together."""
        elapsed = time.perf_counter() - self._step_started
        self._train_seconds += elapsed
        pairs = int(all_reduce_sum(torch.tensor(float(batch.pair_index.shape[0]))))
        self._pairs_seen += pairs
        self.log("train/comparisons_per_s", pairs / max(elapsed, 1e-9), batch_size=batch.n_prompts)

    def validation_step(self, batch: RankingBatch, batch_idx: int) -> None:
        out = self(batch.input_ids, batch.attention_mask, batch.prefix_length)
        result = ranking_loss(out, batch)
        margins = out.raw[batch.pair_index[:, 0]] - out.raw[batch.pair_index[:, 1]]  # (n_pairs,)
        self.val_loss.update(result.loss, weight=batch.n_prompts)
        self.val_accuracy.update((margins > 0).float())
        self.val_margin.update(margins)
        taus = kendall_per_prompt(out.raw, batch.rank_position, batch.completion_prompt, batch.n_prompts)
        if taus.numel():
            self.val_kendall.update(taus)

    def on_validation_epoch_end(self) -> None:
        metrics = {"val/loss": self.val_loss, "val/accuracy": self.val_accuracy, "val/margin": self.val_margin,
                   "val/kendall_tau": self.val_kendall}
        results = {}
        for name, metric in metrics.items():
            if metric.update_called:
                results[name] = float(metric.compute())
                self.log(name, results[name], prog_bar=name == "val/accuracy")
            metric.reset()
        self.val_results = results
        if "val/accuracy" in results:
            self.history["val/accuracy"][0].append(self.global_step)
            self.history["val/accuracy"][1].append(results["val/accuracy"])

    def configure_optimizers(self):
        return build_optimizer(self.reward_model.parameters(), self.optim, self.trainer.estimated_stepping_batches)

    @property
    def comparisons_per_s(self) -> float:
        return self._pairs_seen / self._train_seconds if self._train_seconds else 0.0


# --- initial model and head -----------------------------------------------------------------------


INPUTS = {"init": InputSpec("rm.init_from", stage="sft", output="model", marker="config.json", required=False)}


def init_model_config(cfg: DictConfig, init_dir: Optional[Path]) -> tuple[DictConfig, str]:
    """The model config to start from (the SFT output ``init_dir``, else the base model) and a description of it."""
    if init_dir is None:
        log.warning(
            "rm.init_from=auto: no SFT output recorded for model %r in %s; initialising the "
            "reward model from the base model %s (run +stage=sft first to start from the SFT policy)",
            cfg.model.name, index_path(cfg), cfg.model.name_or_path,
        )
        return cfg.model, f"base model {cfg.model.name_or_path}"
    log.info("reward model initialised from %s", init_dir)
    return model_config_at(cfg.model, init_dir), str(init_dir)


def is_reward_model(init_dir: Optional[Path]) -> bool:
    """Whether ``rm.init_from`` names a reward model written by this stage (not an SFT/base model)."""
    return init_dir is not None and (init_dir / REWARD_CONFIG).is_file()


def continued_reward_model(cfg: DictConfig, init_dir: Path, head: HeadChoice) -> RewardModel:
    """A saved reward model to train further: trunk and head weights as saved (its normalisation is
    fitted again after training). The configured ``reward_head`` must be the head it has."""
    if cfg.rm.normalise_on == "prompts_samples":
        raise ConfigError(f"rm.normalise_on=prompts_samples samples the initial policy, but rm.init_from={init_dir} "
                          "is a reward model, which has no language-model head to sample from; use "
                          "rm.normalise_on=demonstrations, or start from an SFT model")
    reward_model = RewardModel.from_pretrained(init_dir)
    saved = reward_model.head_choice
    if (saved.name, saved.config) != (head.name, head.config):
        raise ConfigError(f"rm.init_from={init_dir}: that reward model has the head {saved.name!r} ({saved.config}), "
                          f"reward_head is {head.name!r} ({head.config}); choose reward_head={saved.name} with its "
                          "settings to continue it, or start from an SFT model")
    log.info("reward model initialised from the reward model %s (trunk and %r head)", init_dir, saved.name)
    return reward_model.requires_grad_(True)


def head_from_config(head_cfg: Any) -> HeadChoice:
    """The reward head chosen by the ``reward_head`` config group (``linear`` when unset)."""
    if head_cfg is None:
        log.info("reward_head not set: using %r", DEFAULT_HEAD)
        return resolve_head(DEFAULT_HEAD)
    spec = registry.spec_for_config("reward_heads", head_cfg)
    config = OmegaConf.to_object(head_cfg) if isinstance(head_cfg, DictConfig) else head_cfg
    return resolve_head(spec.name, config)


# --- the normalisation reference set --------------------------------------------------------------


def demonstration_references(conversations: Sequence[Conversation], tokenizer: Any,
                             max_length: int) -> list[tuple[int, ...]]:
    """(prompt, answer) sequences: each conversation's last assistant turn that follows a user turn,
    with everything before it as the prompt."""
    sequences = []
    for conv in conversations:
        turns = conv.messages
        k = next((i for i in range(len(turns) - 1, 0, -1)
                  if turns[i].role == "assistant" and turns[i - 1].role == "user"), None)
        if k is None:
            continue
        prompt = tokenize_prompt(tokenizer, turns[:k])
        sequences.append(fit_to_length(prompt, [tokenize_completion(tokenizer, turns[k].content)], max_length)[0][0])
    return sequences


def policy_samples(causal_lm: Any, tokenizer: Any, prompts: Sequence[Any], sampler: Any,
                   cfg: DictConfig) -> list[tuple[int, ...]]:
    """prompt + sampled answer sequences from the initial (SFT) policy."""
    prompt_ids = [tokenize_prompt(tokenizer, p.messages)[-cfg.data.max_prompt_length:] for p in prompts]
    generator = torch.Generator(device=model_device(causal_lm)).manual_seed(cfg.seed)
    samples = sample_texts(causal_lm, tokenizer, prompt_ids, 1, sampler, cfg.rm.normalise_max_new_tokens,
                           batch_size=cfg.rm.eval_batch_size, generator=generator, backend=build_backend(cfg))
    return [tuple(ids) + (answer[0].tokens or (tokenizer.eos_token_id,)) for ids, answer in zip(prompt_ids, samples)]


def reference_sequences(cfg: DictConfig, causal_lm: Any, tokenizer: Any) -> tuple[list[tuple[int, ...]], str]:
    """The reference set of ``rm.normalise_on`` (a seeded subset of ``rm.normalise_size``),
    built BEFORE training: policy samples must come from the untouched initial policy."""
    rm, data = cfg.rm, cfg.data
    rng = random.Random(cfg.seed)
    if rm.normalise_on == "demonstrations":
        conversations = load_conversations(data.demonstrations, split=data.split, limit=data.limit)
        chosen = rng.sample(conversations, min(rm.normalise_size, len(conversations)))
        return demonstration_references(chosen, tokenizer, data.max_length), f"demonstrations {data.demonstrations}"
    prompts = load_prompts(data.prompts, split=data.split, limit=data.limit)
    chosen = rng.sample(prompts, min(rm.normalise_size, len(prompts)))
    sampler = registry.build("samplers", cfg.sampler)
    return policy_samples(causal_lm, tokenizer, chosen, sampler, cfg), f"initial-policy samples for {data.prompts}"


@torch.no_grad()
def raw_rewards(reward_model: RewardModel, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> Tensor:
    """Unnormalised rewards of token sequences, in eval mode. Shape: (n,), float32 on the CPU."""
    device = next(reward_model.parameters()).device
    was_training = reward_model.training
    reward_model.eval()
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths together: little padding
    rewards = torch.zeros(len(sequences))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        ids, mask = pad_right([list(sequences[i]) for i in rows], pad_id)
        rewards[rows] = reward_model(ids.to(device), mask.to(device)).raw.float().cpu()
    reward_model.train(was_training)
    return rewards


# --- the stage ------------------------------------------------------------------------------------


def run(cfg: DictConfig, run_dir: Path, inputs: Any) -> StageResult:
    rm = cfg.rm
    precision = build_for_stage(cfg, "rm")  # refuses impossible combinations before any model is loaded

    rankings = load_rankings(cfg.data.comparisons, split=cfg.data.split, limit=cfg.data.limit)
    train_rankings, val_rankings = train_val_split(rankings, cfg.data.val_fraction, cfg.seed)
    log.info("rankings: %d train, %d validation (%s)", len(train_rankings), len(val_rankings), cfg.data.comparisons)

    head = head_from_config(cfg.reward_head)
    init_dir = inputs["init"]
    if is_reward_model(init_dir):  # continue training a reward model (the loop's iterate.rm_init=previous)
        new_model = functools.partial(continued_reward_model, cfg, init_dir, head)
        init_from = f"reward model {init_dir}"
        reward_model = new_model()
        tokenizer = reward_model.tokenizer
        references, reference_name = reference_sequences(cfg, None, tokenizer)
    else:
        model_cfg, init_from = init_model_config(cfg, init_dir)
        causal_lm, tokenizer, _ = load_model_and_tokenizer(model_cfg)
        references, reference_name = reference_sequences(cfg, causal_lm, tokenizer)
        reward_model = RewardModel.from_causal_lm(causal_lm, head, tokenizer)
        del causal_lm  # the LM head is not part of the reward model
        new_model = lambda: RewardModel.from_causal_lm(load_model_and_tokenizer(model_cfg)[0], head,  # noqa: E731
                                                       tokenizer)
    # lora/qlora: trunk adapters (qlora: NF4 trunk); the head trains fully
    reward_model = precision.prepare_trainable(reward_model)
    log.info("reward model: %s trunk from %s + reward head %r %s", type(reward_model.trunk).__name__, init_from,
             head.name, head.config)

    train_items, train_report = tokenize_rankings(train_rankings, tokenizer, cfg.data.max_length, cfg.data.overlong)
    val_items, val_report = tokenize_rankings(val_rankings, tokenizer, cfg.data.max_length, cfg.data.overlong)
    if train_report.truncated + val_report.truncated + train_report.dropped + val_report.dropped:
        log.warning("data.max_length=%d: %d rankings truncated, %d dropped (data.overlong=%s)", cfg.data.max_length,
                    train_report.truncated + val_report.truncated, train_report.dropped + val_report.dropped,
                    cfg.data.overlong)
    if not train_items:
        raise ConfigError(f"no training rankings left after data.overlong={cfg.data.overlong} at data.max_length="
                          f"{cfg.data.max_length} ({cfg.data.comparisons}); raise data.max_length "
                          "or use data.overlong=truncate")
    pad_id = reward_model.pad_token_id
    module = RewardModelModule(reward_model.train(), rm.optim)  # dropout is model.dropout (0 by default)
    if cfg.trainer.max_epochs != rm.epochs:
        log.info("rm.epochs=%d overrides trainer.max_epochs=%d for the reward model", rm.epochs,
                 cfg.trainer.max_epochs)
    # the loaders shard themselves
    trainer = make_trainer(cfg, run_dir, precision, max_epochs=rm.epochs, use_distributed_sampler=False)
    train_loader = make_loader(train_items, pad_id, rm.batch_size, cfg.seed, trainer, train=True,
                               group_by_length=rm.group_by_length)
    val_loader = (make_loader(val_items, pad_id, rm.eval_batch_size, cfg.seed, trainer, train=False)
                  if val_items else None)
    trainer.fit(module, train_loader, val_loader)

    # FSDP: the weights gathered into a whole reward model on rank 0 (collective), None on the others
    trained = consolidated(module.reward_model, lambda: precision.prepare_trainable(new_model()))
    if trained is None:
        return StageResult({}, {"rank": trainer.global_rank})
    reward_model = precision.export(trained)  # lora/qlora: adapters merged; normalise what is saved
    reward_model.to(trainer.strategy.root_device)  # Lightning moves the module back to the CPU after fit
    norm = reward_model.fit_normalisation(
        raw_rewards(reward_model, references, pad_id, rm.eval_batch_size),
        1.0 if rm.normalise_std else None,
        fitted_on=reference_name,
    )
    if trainer.is_global_zero and any(len(xs) for xs, _ in module.history.values()):
        plot_curves(module.history, run_dir / "reward_model.png", title=f"RM {cfg.model.name} ({head.name} head)")

    out_dir = run_dir / "reward_model"
    if trainer.is_global_zero:
        reward_model.save_pretrained(out_dir)
    val = module.val_results
    return StageResult({"reward_model": out_dir}, {
        "objective": val.get("val/loss", math.nan),
        "val_loss": val.get("val/loss", math.nan),
        "val_accuracy": val.get("val/accuracy", math.nan),
        "val_margin": val.get("val/margin", math.nan),
        "val_kendall_tau": val.get("val/kendall_tau", math.nan),
        "train_loss": float(trainer.callback_metrics.get("train/loss", math.nan)),
        "train_comparisons_per_s": round(module.comparisons_per_s, 1),
        "steps": trainer.global_step,
        "train_prompts": len(train_items),
        "val_prompts": len(val_items),
        "train_pairs": sum(len(all_pairs(i.groups).winners) for i in train_items),
        "truncated": train_report.truncated + val_report.truncated,
        "dropped": train_report.dropped + val_report.dropped,
        "reward_head": head.name,
        "init_from": init_from,
        "normalisation": {"fitted_on": reference_name, "n": norm.n, "gain": norm.gain, "bias": norm.bias,
                          "raw_mean": norm.raw_mean, "raw_std": norm.raw_std},
    })
