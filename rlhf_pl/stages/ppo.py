"""Stage 4 — PPO: optimise the policy against the reward model, with a KL penalty to the SFT policy.

``python -m rlhf_pl +stage=ppo [kl_controller=adaptive|fixed|pi] [sampler.temperature=0.7] [ppo.<key>=...]``
``python -m rlhf_pl +stage=ppo +resume=<run dir>``   continue a run (killed or not) from its last checkpoint

Reads top to bottom: the LightningModule, whose ``training_step`` is one update — rollout (sample,
cut, score; shape the scores; policy, reference and value passes, each model once per purpose) →
per-token rewards and GAE advantages → ``ppo_epochs`` × ``num_minibatches`` optimizer steps → KL
controller update, logging, samples, checkpoint —; then :func:`run`, which builds the models
(:mod:`rlhf_pl.models.ppo_models`) and data, fits, and writes curves, ``<run_dir>/policy`` and the
summary. Settings: :class:`rlhf_pl.config.PPOConfig`, checked by :func:`rlhf_pl.config.validate_config`.

RLHF_REFERENCE.md items and where they live:

- 1, 5: prompts chat-templated and left-padded (:mod:`rlhf_pl.data.batches`); every mask from
  positions, never from ``token == pad`` (pad may equal EOS); position ids from the mask.
- 2: one temperature T (``sampler.temperature``) for sampling and every logprob and entropy. Rollout
  and update compute logprobs with :func:`rlhf_pl.models.ppo_models.evaluate_policy` on the same rows
  (the first epoch's minibatches are the rollout's chunks), so the first minibatch has ratio exactly 1
  and approx-KL exactly 0.
- 3, 4: a response ends at EOS or after the token completing a stop string (:mod:`rlhf_pl.sampling`);
  later tokens are masked out of everything; the score is read at the last valid token; the
  missing-EOS penalty and the rest of the score shaping: :mod:`rlhf_pl.rl.scores`.
- ``reward_from=labeler``: the labeler plugin's scores of the response texts replace the reward model
  (Gao et al.'s gold-reward control; :class:`rlhf_pl.models.reward.LabelerReward`).
- 13, 14: reference and reward model frozen, dropout 0 in all four models (:mod:`rlhf_pl.models.critic`).
- 15, 16: KL estimators (:mod:`rlhf_pl.rl.kl`) in the reward or as a loss term (``kl_penalty``);
  β from the ``kl_controller`` plugin, updated with the rollout's KL (mean of Σ_t k1) and episode count.
- 17–21: reward whitening, GAE, advantage whitening over all ranks (:mod:`rlhf_pl.rl.advantages`,
  :mod:`rlhf_pl.rl.masked`); clipped losses (:mod:`rlhf_pl.rl.ppo`); score norm and clip (:mod:`rlhf_pl.rl.scores`).
- 22: ``critic=separate``: a copy of the reward model's trunk + a value head (``value_head_init``);
  ``critic=shared``: the value head on the policy trunk (:mod:`rlhf_pl.models.critic`); ``critic=none``:
  no value function, V ≡ 0 and λ = 1, so a token's advantage is its reward-to-go (with
  ``score_baseline=group``: RLOO, Ahmadian et al. 2024, with PPO's clipped ratio).
- 23: Adam with warm-up and decay per optimizer (:mod:`rlhf_pl.optim`); epoch 1 keeps the rollout's
  row order, later epochs shuffle.
- 24: PPO-ptx: ``ptx_coef`` · NLL of demonstrations, one batch per minibatch (:mod:`rlhf_pl.data.batches`).
- 25: :class:`rlhf_pl.rl.results.PPOStats` every update; sample tables; summary and curves (:mod:`rlhf_pl.rl.summary`).

Resume (:mod:`rlhf_pl.checkpoint`): every ``checkpoint_every`` updates the whole training state
goes to ``<run_dir>/checkpoints/last.pt``, atomically; ``+resume=<run dir>`` continues with the
next rollout in a new run directory, with the metrics of an uninterrupted run (one process, fixed seed).

Data parallel (``trainer=ddp``) and sharded (``trainer=fsdp``: policy and critic FSDP roots, reference and
reward model whole): the rollout's decode steps run in lockstep over the ranks when the policy is sharded,
and checkpoints gather the whole states from the shards (:mod:`rlhf_pl.strategies`, docs/scaling.md).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader

from rlhf_pl import registry
from rlhf_pl.checkpoint import load_for_resume, restore_rng_state, rng_state, write_checkpoint
from rlhf_pl.config import PPOConfig
from rlhf_pl.data.batches import (
    DemonstrationBatches,
    PromptCollator,
    PromptItem,
    RolloutBatchSampler,
    load_demonstrations,
    load_rollout_prompts,
    tokenize_prompts,
)
from rlhf_pl.data.collate import trim_left_padding
from rlhf_pl.data.formats import Prompt
from rlhf_pl.distributed import gather_objects
from rlhf_pl.errors import ConfigError
from rlhf_pl.generation import GenerationBackend
from rlhf_pl.models.generate import GreedySampler
from rlhf_pl.models.loading import load_model_and_tokenizer, save_pretrained_atomic
from rlhf_pl.models.ppo_models import PPOModels, build_models, evaluate_policy
from rlhf_pl.models.reward import LabelerReward
from rlhf_pl.optim import build_optimizer
from rlhf_pl.outputs import InputSpec, check_input, model_config_at
from rlhf_pl.precision import build_for_stage
from rlhf_pl.report import SampleLog, tensorboard_writer
from rlhf_pl.rl.advantages import Advantages, compute_advantages
from rlhf_pl.rl.kl import kl_loss, sequence_kl
from rlhf_pl.rl.masked import all_reduce_max, all_reduce_sum, masked_mean, token_share, valid_only
from rlhf_pl.rl.ppo import ValueLossOutput, minibatch_rows, policy_loss, value_loss
from rlhf_pl.rl.results import (
    MinibatchStats,
    PolicyTerms,
    PPOStats,
    Rollout,
    across_ranks,
    ppo_stats,
    scale_by_share,
)
from rlhf_pl.rl.scores import PromptBaselines, RunningMoments, process_scores
from rlhf_pl.rl.summary import plot_run, summarise, trend_text
from rlhf_pl.sampling import Completions, Scorer, build_backend, sample, score
from rlhf_pl.stages import StageResult
from rlhf_pl.strategies import consolidated, full_optimizer_state, full_state_dict, is_sharded, load_full_state
from rlhf_pl.training import check_finite_loss, make_trainer

log = logging.getLogger(__name__)

INPUTS = {
    "policy": InputSpec("ppo.policy_from", stage="sft", output="model", marker="config.json"),
    "reward_model": InputSpec("ppo.reward_from", stage="rm", output="reward_model", marker="reward_config.json"),
}
PROGRESS_BAR = {"score": "score", "score_vs_reference": "vs_ref", "kl": "kl", "beta": "beta"}  # short names


# --- the LightningModule: one PPO update per batch ------------------------------------------------


class PPOModule(L.LightningModule):
    """PPO with manual optimisation: ``training_step`` = one rollout + its PPO epochs.

    Gets built objects: the models, the ``ppo`` settings, the sampler and KL controller plugins, the
    tokenized prompts, and optionally the ptx data and a checkpoint to resume from.
    ``rows_forwarded`` counts the rows each model processed per purpose (the check that no forward
    pass is done twice for the same purpose); ``timings`` the seconds per phase.
    """

    def __init__(self, models: PPOModels, ppo: PPOConfig, sampler: Any, kl_controller: Any, prompts: Sequence[Prompt],
                 prompt_items: Sequence[PromptItem], seed: int, run_dir: Path,
                 ptx: DemonstrationBatches | None = None, resume_state: dict[str, Any] | None = None,
                 backend: GenerationBackend | None = None) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.policy, self.reference, self.scorer = models.policy, models.reference, models.scorer
        self.critic, self.value_head, self.tokenizer = models.critic, models.value_head, models.tokenizer
        self.sources = {"policy_from": models.policy_from, "reward_from": models.reward_from,
                        "reference_from": models.reference_from}
        self.ppo, self.sampler, self.kl_controller, self.backend = ppo, sampler, kl_controller, backend
        self.prompts, self.prompt_items, self.seed, self.run_dir, self.ptx = prompts, prompt_items, seed, run_dir, ptx
        self.generator = torch.Generator()
        self.moments = RunningMoments()
        self.baseline = PromptBaselines(self.reference_greedy_scores) if ppo.score_baseline == "reference" else None
        self.history: dict[str, list[float]] = {name: [] for name in (f.name for f in fields(PPOStats))}
        self.samples = SampleLog(run_dir / "samples.md", "PPO samples", "ppo/samples")
        self.rows_forwarded: Counter[str] = Counter()
        self.timings: Counter[str] = Counter()
        self.rollouts_done = int(resume_state["rollouts_done"]) if resume_state is not None else 0
        self._resume_state = resume_state

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        beta = float(self.kl_controller.value)
        started = time.perf_counter()
        rollout = self.rollout(batch)
        rollout_seconds = time.perf_counter() - started
        adv = self.advantages(rollout, beta)
        started = time.perf_counter()
        steps = self.optimise(rollout, adv, beta)
        stats = ppo_stats(rollout, adv, steps, update=self.rollouts_done + 1, beta=beta,
                          lrs=[opt.param_groups[0]["lr"] for opt in self.all_optimizers()],
                          rollout_seconds=rollout_seconds,
                          train_seconds=time.perf_counter() - started, all_reduce=all_reduce_sum)
        self.kl_controller.update(stats.kl, rollout.sequences.shape[0] * self.trainer.world_size)
        self.rollouts_done += 1
        self.log_stats(stats, rollout.sequences.shape[0])
        if self.rollouts_done % self.ppo.sample_every == 0 or self.rollouts_done == 1:
            self.write_samples(rollout)
        if self.rollouts_done % self.ppo.checkpoint_every == 0 or self.rollouts_done == self.ppo.updates:
            self.save_checkpoint()

    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor]) -> Rollout:
        """Sample ``samples_per_prompt`` responses per prompt (row ``i·n + j``: response j to prompt i),
        score them, and run policy, reference and critic once each over the episodes."""
        ppo, n = self.ppo, self.ppo.samples_per_prompt
        with self.timed("generation"):
            out = sample(self.policy, batch["input_ids"], batch["attention_mask"], self.sampler, ppo.max_new_tokens,
                         self.tokenizer, stop_strings=ppo.stop_strings, generator=self.generator, backend=self.backend,
                         num_samples=n, sync_ranks=all_reduce_max if is_sharded(self.policy) else None)
        self.rows_forwarded["generation_tokens"] += int(out.mask.sum())
        prompt_index = batch["index"].repeat_interleave(n)  # (b·n,): row i·n + j answers prompt i
        with self.timed("scoring"):
            rm = self.score_rollout(out, prompt_index)
            self.rows_forwarded["reward"] += out.sequences.shape[0]
        baselines = None
        if self.baseline is not None:
            with self.timed("reference_baseline"):
                baselines, computed = self.baseline(batch["input_ids"], batch["attention_mask"], batch["index"])
                baselines = baselines.repeat_interleave(n)
            self.rows_forwarded["reference_greedy"] += computed
        scores = process_scores(rm.rewards, out.ended, uncertainty=rm.uncertainty,
                                uncertainty_coef=ppo.uncertainty_coef, baselines=baselines,
                                group_size=n if ppo.score_baseline == "group" else None, score_norm=ppo.score_norm,
                                moments=self.moments, all_reduce=all_reduce_sum, eos_penalty=ppo.missing_eos_penalty,
                                eos_mode=ppo.missing_eos_mode, score_clip=ppo.score_clip)
        passes = self.rollout_passes(out.sequences, out.attention_mask, out.prompt_length)
        return Rollout(out.sequences, out.attention_mask, out.prompt_length, out.mask, out.ended, *passes,
                       rm.rewards.float(), scores, rm.uncertainty, prompt_index, baselines)

    def score_rollout(self, out: Completions, index: Tensor) -> Any:
        """The reward model's output for each response; with ``reward_from=labeler`` the labeler's scores of
        the response texts, each against its prompt ``self.prompts[index[i]]``. Shapes: index (b,) -> (b,) fields."""
        if isinstance(self.scorer, LabelerReward):
            return self.scorer([self.prompts[i] for i in index.tolist()], out.texts(self.tokenizer))
        return score(out, self.scorer).scores

    @torch.no_grad()
    def reference_greedy_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """b(x) of ``ppo.score_baseline=reference``: the reward-model score of the reference (SFT)
        policy's greedy response to each prompt, ending like the policy's (EOS, stop strings) and
        scored like ``Rollout.rm_scores`` (no penalty). Shapes: (k, p) left-padded -> (k,)."""
        ids, mask = trim_left_padding(input_ids, attention_mask)
        out = sample(self.reference, ids, mask, GreedySampler(), self.ppo.max_new_tokens, self.tokenizer,
                     stop_strings=self.ppo.stop_strings, scorer=self.scorer, backend=self.backend)
        return out.scores.rewards.float()

    def rollout_passes(self, sequences: Tensor, attention_mask: Tensor, p: int) -> tuple[Tensor, ...]:
        """Policy logprobs + entropy, reference logprobs, values (0 with ``critic=none``): one pass per
        model, in the chunks the first PPO epoch uses as minibatches. Shapes: (b, p + n) -> four (b, n)
        tensors."""
        temperature = self.sampler.temperature
        parts: dict[str, list[Tensor]] = {"logprobs": [], "ref": [], "values": [], "entropy": []}
        purposes = ("policy_rollout", "reference",
                    *{"separate": ("critic_rollout",), "shared": ("values_from_policy",)}.get(self.ppo.critic, ()))
        for rows in minibatch_rows(sequences.shape[0], self.ppo.num_minibatches, None):
            seq, am = sequences[rows], attention_mask[rows]
            with self.timed("policy_logprobs"):
                ev = evaluate_policy(self.policy, seq, am, p, temperature, self.value_head, with_entropy=True)
            with self.timed("reference"):
                parts["ref"].append(evaluate_policy(self.reference, seq, am, p, temperature).logprobs)
            with self.timed("values"):
                values = self.critic(seq, am, p) if self.critic is not None else ev.values  # None: critic=none
            parts["values"].append(values if values is not None else torch.zeros_like(ev.logprobs))
            parts["logprobs"].append(ev.logprobs)
            parts["entropy"].append(ev.entropy)
            for purpose in purposes:
                self.rows_forwarded[purpose] += len(rows)
        return tuple(torch.cat(parts[k]) for k in ("logprobs", "ref", "values", "entropy"))

    def advantages(self, rollout: Rollout, beta: float) -> Advantages:
        """Per-token rewards (β·KL in them unless ``kl_penalty=loss``) and GAE advantages of the rollout;
        with ``critic=none`` (values 0) GAE with λ = 1: the discounted reward-to-go, unbiased."""
        ppo = self.ppo
        return compute_advantages(rollout.logprobs, rollout.ref_logprobs, rollout.values, rollout.scores, rollout.mask,
                                  beta=beta if ppo.kl_penalty == "reward" else 0.0, kl_estimator=ppo.kl_estimator,
                                  whiten_rewards=ppo.whiten_rewards, gamma=ppo.gamma,
                                  lam=1.0 if ppo.critic == "none" else ppo.lam,
                                  whiten_advantages=ppo.whiten_advantages, all_reduce=all_reduce_sum)

    def optimise(self, rollout: Rollout, adv: Advantages, beta: float) -> list[MinibatchStats]:
        """``ppo_epochs`` × ``num_minibatches`` steps; epoch 1 in rollout order, later epochs shuffled
        with a generator seeded by (seed, update, epoch). Returns each step's stats, in order."""
        steps = []
        for epoch in range(self.ppo.ppo_epochs):
            seed = hash((self.seed, self.rollouts_done, epoch)) % 2**63
            generator = None if epoch == 0 else torch.Generator().manual_seed(seed)
            for rows in minibatch_rows(rollout.sequences.shape[0], self.ppo.num_minibatches, generator):
                with self.timed("optimisation"):
                    steps.append(self.minibatch_step(rollout, adv, rows, beta, len(steps)))
        return steps

    def minibatch_step(self, rollout: Rollout, adv: Advantages, rows: Tensor, beta: float, step: int) -> MinibatchStats:
        """One step of both optimizers on a minibatch, minimising pg + c_v·vf (+ extras).

        With a separate critic the two networks share no parameter, so the policy's terms and c_v·vf
        are backpropagated one after the other (the gradients of one backward of the sum, with half
        its peak activation memory). Then per optimizer: clip the gradient norm, step; schedulers step.
        A non-finite loss stops the run (:func:`rlhf_pl.training.check_finite_loss`).
        """
        optimizers, schedulers = self.all_optimizers(), self.all_schedulers()
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        # data parallel: token means weighted by this rank's share of the minibatch's tokens (1 in one process)
        share = token_share(rollout.mask[rows], self.trainer.world_size, all_reduce_sum)
        terms = self.policy_objective(rollout, adv, rows, beta, step)
        check_finite_loss(terms.loss, stage="ppo", step=self.rollouts_done + 1, lr=self.ppo.policy_optim.lr,
                          lr_key="ppo.policy_optim.lr")
        self.manual_backward(terms.loss * share)
        vf, total = terms.vf, terms.loss.detach()
        if vf is None and self.critic is None:  # critic=none: no value loss, its statistics not measured
            vf = ValueLossOutput(torch.full_like(total, math.nan), torch.full_like(total, math.nan))
        elif vf is None:
            vf = self.critic_objective(rollout, adv, rows)
            check_finite_loss(vf.loss, stage="ppo", step=self.rollouts_done + 1, lr=self.ppo.critic_optim.lr,
                              lr_key="ppo.critic_optim.lr")
            self.manual_backward(self.ppo.vf_coef * vf.loss * share)
            total = total + self.ppo.vf_coef * vf.loss.detach()
        for optimizer in optimizers:
            if self.ppo.max_grad_norm is not None:
                self.clip_gradients(optimizer, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
            optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
        pg = terms.pg
        stats = MinibatchStats(total, pg.loss.detach(), vf.loss.detach(), pg.clip_frac, vf.clip_frac, pg.approx_kl,
                               pg.ratio_mean, terms.max_abs_log_ratio, terms.kl_loss, terms.ptx_loss)
        return across_ranks(scale_by_share(stats, share), self.trainer.world_size, all_reduce_sum, all_reduce_max)

    def policy_objective(self, rollout: Rollout, adv: Advantages, rows: Tensor, beta: float, step: int) -> PolicyTerms:
        """The policy's loss on one minibatch: pg (− entropy bonus + β·KL loss + γ_ptx·NLL), plus
        c_v·vf when the value head sits on the policy trunk (one forward pass for both)."""
        ppo, p, mask = self.ppo, rollout.prompt_length, rollout.mask[rows]
        seq, am, old = rollout.sequences[rows], rollout.attention_mask[rows], rollout.logprobs[rows]
        ev = evaluate_policy(self.policy, seq, am, p, self.sampler.temperature, self.value_head,
                             with_entropy=ppo.entropy_coef > 0)
        self.rows_forwarded["policy_train"] += len(rows)
        pg = policy_loss(ev.logprobs, old, adv.advantages[rows], mask, ppo.clip_eps)
        loss, vf, zero = pg.loss, None, pg.loss.new_zeros(())
        if ev.values is not None:
            vf = value_loss(ev.values, rollout.values[rows], adv.returns[rows], mask, ppo.value_clip)
            loss = loss + ppo.vf_coef * vf.loss
        if ppo.entropy_coef > 0:
            loss = loss - ppo.entropy_coef * masked_mean(ev.entropy, mask)
        kl_term = (kl_loss(ev.logprobs, rollout.ref_logprobs[rows], mask, ppo.kl_estimator)
                   if ppo.kl_penalty == "loss" else zero)
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
        run_step = self.rollouts_done * self.ppo.ppo_epochs * self.ppo.num_minibatches + step
        global_step = run_step * self.trainer.world_size + self.trainer.global_rank
        batch = {k: v.to(self.device) for k, v in self.ptx(global_step).items()}
        logits = self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             use_cache=False).logits
        labels = batch["labels"][:, 1:]
        self.rows_forwarded["policy_ptx"] += batch["input_ids"].shape[0]
        return nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)

    # --- logging, samples, checkpoints ----------------------------------------------------------

    def log_stats(self, stats: PPOStats, batch_size: int) -> None:
        """Every field to the loggers as ``ppo/<name>``; score, kl and beta to the progress bar."""
        values = asdict(stats)
        for name, value in values.items():
            self.history[name].append(value)
        measured = {name: v for name, v in values.items() if not math.isnan(v)}  # nan: no baseline, no uncertainty
        self.log_dict({f"ppo/{name}": v for name, v in measured.items() if name != "update"}, batch_size=batch_size,
                      on_step=True, on_epoch=False)
        self.log_dict({short: measured[name] for name, short in PROGRESS_BAR.items() if name in measured},
                      prog_bar=True, logger=False, batch_size=batch_size, on_step=True, on_epoch=False)
        log.info("update %d/%d: score %.3f (vs reference %.3f), kl %.3f, beta %.4f, approx_kl %.4f, clip %.3f, "
                 "length %.1f, eos %.2f (%.1f s)", self.rollouts_done, self.ppo.updates, stats.score,
                 stats.score_vs_reference, stats.kl, stats.beta, stats.approx_kl, stats.policy_clip_frac,
                 stats.response_length, stats.eos_rate, stats.rollout_seconds + stats.train_seconds)

    def write_samples(self, rollout: Rollout) -> None:
        """The first ``num_samples`` episodes (last prompt turn, response, scores, KL, ended) as a table
        in ``samples.md`` and TensorBoard text."""
        n = self.ppo.num_samples
        if not self.trainer.is_global_zero or n == 0:
            return
        r = rollout
        first = Completions(r.sequences[:n], r.attention_mask[:n], r.prompt_length, r.mask[:n], r.ended[:n])
        kl = sequence_kl(r.logprobs[:n], r.ref_logprobs[:n], r.mask[:n])
        rows = [{"prompt": self.prompts[int(r.prompt_index[i])].messages[-1].content, "response": text,
                 "score": f"{float(r.rm_scores[i]):.3f}", "final score": f"{float(r.scores[i]):.3f}",
                 "KL": f"{float(kl[i]):.3f}", "ended": "yes" if bool(r.ended[i]) else "no"}
                for i, text in enumerate(first.texts(self.tokenizer))]
        self.samples.add(rows, f"update {self.rollouts_done}", self.rollouts_done, self.trainer)

    @contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Accumulate the wall-clock seconds of a phase in ``self.timings``."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] += time.perf_counter() - started

    def save_checkpoint(self) -> Path | None:
        """Everything a resumed run needs (:mod:`rlhf_pl.checkpoint`), written by rank 0; the RNG states
        of every rank (each samples its own tokens) are gathered into it. Under FSDP the trained models'
        and optimizers' states are gathered whole from the shards first (collective)."""
        rng = gather_objects(rng_state(self.generator))
        trained = list(zip(self.trained_models, (opt.optimizer for opt in self.all_optimizers())))
        models = [full_state_dict(model) for model, _ in trained]
        optimizers = [full_optimizer_state(model, optimizer) for model, optimizer in trained]
        if not self.trainer.is_global_zero:
            return None
        state = {
            "rollouts_done": self.rollouts_done, "updates": self.ppo.updates,
            "policy": models[0], "critic": models[1] if len(models) > 1 else None, "optimizers": optimizers,
            "sharded": is_sharded(self.policy), "schedulers": [sch.state_dict() for sch in self.all_schedulers()],
            "kl_controller": self.kl_controller.state_dict(), "score_moments": asdict(self.moments),
            "reference_baseline": self.baseline.state_dict() if self.baseline is not None else {},
            "rng": rng, "history": self.history, "samples_md": self.samples.sections,
            "sources": self.sources, "ppo": asdict(self.ppo), "seed": self.seed,
        }
        path = write_checkpoint(self.run_dir, state, {"rollouts_done": self.rollouts_done, "updates": self.ppo.updates})
        log.info("checkpoint after update %d: %s", self.rollouts_done, path)
        return path

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`save_checkpoint` wrote (RNG states follow at the first batch)."""
        trained = zip(self.trained_models, (opt.optimizer for opt in self.all_optimizers()),
                      (state["policy"], state["critic"]), state["optimizers"], strict=False)
        for model, optimizer, weights, saved in trained:
            load_full_state(model, optimizer, weights, saved)
        for scheduler, saved in zip(self.all_schedulers(), state["schedulers"]):
            scheduler.load_state_dict(saved)
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.moments = RunningMoments(**state["score_moments"])
        if self.baseline is not None:
            self.baseline.load_state_dict(state.get("reference_baseline", {}))
        self.history = {name: list(values) for name, values in state["history"].items()}
        self.samples.sections = list(state["samples_md"])
        loop = self.trainer.fit_loop.epoch_loop
        if hasattr(loop, "_batches_that_stepped"):  # logger steps continue from the checkpoint's update
            loop._batches_that_stepped = self.rollouts_done
        log.info("resumed after update %d of %d", self.rollouts_done, self.ppo.updates)

    def rank_rng_state(self, saved: list[dict[str, Any]] | dict[str, Any]) -> dict[str, Any]:
        """This rank's RNG states from a checkpoint (one per rank; a single dict: written by one process).
        A different number of processes would continue with other samples than the interrupted run."""
        states = saved if isinstance(saved, list) else [saved]
        if len(states) != self.trainer.world_size:
            raise ConfigError(f"+resume: the checkpoint was written by {len(states)} data-parallel "
                              f"process(es), this run has {self.trainer.world_size}; resume with "
                              f"trainer.devices={len(states)} (× trainer.num_nodes) to continue the same run")
        return states[self.trainer.global_rank]

    # --- Lightning plumbing: modes, optimizers, data, resume ------------------------------------

    def train(self, mode: bool = True) -> PPOModule:
        """Lightning switches the whole module to train mode; the frozen models stay in eval mode."""
        super().train(mode)
        self.reference.eval()
        if isinstance(self.scorer, nn.Module):
            self.scorer.eval()
        return self

    @property
    def trained_models(self) -> list[nn.Module]:
        """What the optimizers train, in order: the policy, then the separate critic or the value head
        on the policy trunk (none with ``critic=none``)."""
        critic = self.critic if self.critic is not None else self.value_head
        return [self.policy] + ([critic] if critic is not None else [])

    def all_optimizers(self) -> list[Any]:
        """Lightning's optimizers as a list (it returns a lone one unwrapped)."""
        optimizers = self.optimizers()
        return optimizers if isinstance(optimizers, list) else [optimizers]

    def all_schedulers(self) -> list[Any]:
        schedulers = self.lr_schedulers()
        return schedulers if isinstance(schedulers, list) else [schedulers]

    def configure_optimizers(self):
        """Adam (eps 1e-5) + linear decay over every optimizer step of the run, for policy and critic."""
        steps = self.ppo.updates * self.ppo.ppo_epochs * self.ppo.num_minibatches
        built = [build_optimizer(model.parameters(), optim, steps)
                 for model, optim in zip(self.trained_models, (self.ppo.policy_optim, self.ppo.critic_optim))]
        return [b["optimizer"] for b in built], [b["lr_scheduler"] for b in built]

    def train_dataloader(self) -> DataLoader:
        """Rollouts ``rollouts_done`` … ``updates − 1``; each rank its slice; prompts left-padded."""
        sampler = RolloutBatchSampler(len(self.prompt_items), self.ppo.batch_size, self.seed, self.ppo.updates,
                                      start=self.rollouts_done, num_replicas=self.trainer.world_size,
                                      rank=self.trainer.global_rank)
        collate = PromptCollator(self.tokenizer.pad_token_id)
        return DataLoader(self.prompt_items, batch_sampler=sampler, collate_fn=collate)

    def on_train_start(self) -> None:
        self.generator = torch.Generator(device=self.device).manual_seed(self.seed + self.trainer.global_rank)
        if self._resume_state is not None:
            self.load_training_state(self._resume_state)
        writer = tensorboard_writer(self.trainer)
        if writer is not None:
            writer.add_text("ppo/kl_estimator",
                            f"{self.ppo.kl_estimator}, in the {self.ppo.kl_penalty}; logged kl = Σ_t k1")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """RNG states are restored here, after Lightning created the data iterator (which draws a seed)."""
        if self._resume_state is not None:
            restore_rng_state(self.rank_rng_state(self._resume_state["rng"]), self.generator)
            self._resume_state = None


# --- the stage ------------------------------------------------------------------------------------


def build_kl_controller(cfg: DictConfig) -> tuple[Any, str]:
    """The ``kl_controller`` plugin and its name."""
    if cfg.kl_controller is None:
        names = ", ".join(p.name for p in registry.installed("kl_controllers"))
        raise ConfigError(f"kl_controller is unset; choose one with kl_controller=<name>: {names}")
    name = registry.spec_for_config("kl_controllers", cfg.kl_controller).name
    return registry.build("kl_controllers", cfg.kl_controller), name


def build_sampler(cfg: DictConfig) -> Any:
    """The ``sampler`` plugin; a filtering one (top-k, top-p) is allowed but warned about."""
    name = registry.spec_for_config("samplers", cfg.sampler).name
    if name != "temperature":
        log.warning("sampler=%s filters tokens, but PPO's logprobs, KL and entropy use softmax(logits / T) without the "
                    "filter; the published implementations sample with plain temperature (sampler=temperature)", name)
    return registry.build("samplers", cfg.sampler)


def input_dirs(cfg: DictConfig, inputs: Any, state: dict[str, Any] | None,
               scorer: Scorer | None) -> tuple[Path, Path | None, Path]:
    """Policy, reward model and reference directories: the checkpoint's when resuming, else the stage
    inputs (the reference: ``ppo.reference_from``, "policy" = the policy's own directory)."""
    if state is None:
        policy = inputs["policy"]
        ref = cfg.ppo.reference_from
        reference = policy if ref == "policy" else check_input(
            INPUTS["policy"], Path(str(ref)).expanduser(), f"ppo.reference_from={ref!r}")
        return policy, None if scorer is not None else inputs["reward_model"], reference
    sources = state["sources"]
    specs = [("policy_from", INPUTS["policy"])] + ([("reward_from", INPUTS["reward_model"])] if scorer is None else [])
    sources.setdefault("reference_from", sources["policy_from"])  # checkpoints written before reference_from
    for key, spec in specs + [("reference_from", INPUTS["policy"])]:
        check_input(spec, Path(sources[key]), f"resume={cfg.resume!r}: the checkpoint's {key}")
    return (Path(sources["policy_from"]), None if scorer is not None else Path(sources["reward_from"]),
            Path(sources["reference_from"]))


def check_resume_strategy(cfg: DictConfig, state: dict[str, Any]) -> None:
    """The optimizers' states of an FSDP checkpoint are keyed by parameter name, those of one process
    or DDP by parameter index: a checkpoint resumes under the kind of strategy that wrote it."""
    sharded, here = bool(state.get("sharded", False)), str(cfg.trainer.strategy) == "fsdp"
    if sharded != here:
        wrote = "trainer.strategy=fsdp" if sharded else "an unsharded strategy (one process or DDP)"
        hint = "trainer=fsdp (GPU) or trainer=fsdp_cpu" if sharded else "trainer=ddp, ddp_cpu or cpu"
        raise ConfigError(f"+resume={cfg.resume}: the checkpoint was written under {wrote}, this run has "
                          f"trainer.strategy={cfg.trainer.strategy}; resume with {hint}")


def build_trainer(cfg: DictConfig, run_dir: Path, precision: Any, callbacks: Sequence[Any]) -> L.Trainer:
    """The trainer in manual-optimisation mode: one epoch whose batches are the rollouts, logging
    every update. Lightning's own ModelCheckpoint is removed: the module writes its resumable
    checkpoints itself (a Lightning one would duplicate them and include the frozen models)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    # DDP: one training_step backpropagates the policy's and the critic's losses separately, minibatch by minibatch,
    # so each backward reaches only some parameters; DDP must look for the unused ones at every backward
    ddp = {"strategy": "ddp_find_unused_parameters_true"} if cfg.trainer.strategy == "ddp" else {}
    trainer = make_trainer(cfg, run_dir, precision, callbacks=callbacks, manual_optimization=True, max_epochs=1,
                           max_steps=-1, log_every_n_steps=1, limit_train_batches=None, use_distributed_sampler=False,
                           **ddp)
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, ModelCheckpoint)]
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training.*")  # frozen models
    return trainer


def run(cfg: DictConfig, run_dir: Path, inputs: Any, *, scorer: Scorer | None = None,
        callbacks: Sequence[Any] = ()) -> StageResult:
    """The PPO stage. ``scorer`` replaces the reward model (tests: rule-based rewards); ``callbacks``
    are extra Lightning callbacks (tests: interrupting a run)."""
    ppo: PPOConfig = OmegaConf.to_object(cfg.ppo)
    if scorer is None and ppo.reward_from == "labeler":
        scorer = LabelerReward(registry.build("labelers", cfg.labeler), registry.spec_for_config("labelers",
                                                                                                 cfg.labeler).name)
    if ppo.kl_penalty == "loss" and ppo.kl_estimator == "k1":
        log.warning("ppo.kl_penalty=loss with ppo.kl_estimator=k1: the gradient of k1 has expectation 0; use k3 or k2")
    # refuses impossible combinations before any model is loaded
    precision = build_for_stage(cfg, "ppo", frozen=("reference", "reward model"))
    state = (load_for_resume(str(cfg.resume), updates=ppo.updates, settings=asdict(ppo), seed=cfg.seed)
             if cfg.get("resume") else None)
    if state is not None:
        check_resume_strategy(cfg, state)
    policy_dir, reward_dir, reference_dir = input_dirs(cfg, inputs, state, scorer)
    models = build_models(cfg, policy_dir, reward_dir, scorer, precision, reference_dir)
    log.info("policy from %s; reference from %s; reward model from %s; critic: %s", models.policy_from,
             models.reference_from, models.reward_from, ppo.critic)

    prompts = load_rollout_prompts(cfg.data.prompts, split=cfg.data.split, limit=cfg.data.limit)
    items = tokenize_prompts(prompts, models.tokenizer, cfg.data.max_prompt_length)
    ptx = None
    if ppo.ptx_coef > 0:
        d = cfg.data
        ptx = load_demonstrations(d.demonstrations, models.tokenizer, split=d.split, limit=d.limit,
                                  max_length=d.max_length, overlong=d.overlong, batch_size=ppo.ptx_batch_size,
                                  seed=cfg.seed)
    sampler = build_sampler(cfg)
    kl_controller, kl_name = build_kl_controller(cfg)
    log.info("%d prompts (%s); sampler %r; KL controller %s (β₀=%.4g); KL estimator %s in the %s",
             len(prompts), cfg.data.prompts, sampler, kl_name, kl_controller.value, ppo.kl_estimator, ppo.kl_penalty)

    module = PPOModule(models, ppo, sampler, kl_controller, prompts, items, cfg.seed, run_dir, ptx, state,
                       backend=build_backend(cfg))
    trainer = build_trainer(cfg, run_dir, precision, callbacks)
    trainer.fit(module)

    kl_target = getattr(kl_controller, "target", None)
    out_dir = run_dir / "policy"
    # FSDP: the weights gathered into a whole policy on rank 0 (collective); otherwise the trained policy itself
    policy = consolidated(module.policy, lambda: precision.prepare_trainable(
        load_model_and_tokenizer(model_config_at(cfg.model, policy_dir))[0]))
    if trainer.is_global_zero:
        plot_run(module.history, run_dir / "ppo_curves.png", f"PPO {cfg.model.name} ({kl_name} KL controller)",
                 kl_target)
        save_pretrained_atomic(precision.export(policy), models.tokenizer, out_dir)  # lora/qlora: merged
    summary = summarise(module.history, final_beta=float(kl_controller.value), kl_controller=kl_name,
                        kl_target=kl_target, kl_estimator=ppo.kl_estimator, updates=module.rollouts_done)
    log.info("trend over %d updates %s", module.rollouts_done, trend_text(summary))
    return StageResult({"policy": out_dir}, {
        **summary, **module.sources, "resumed_from": str(cfg.resume) if state is not None else None,
        "rows_forwarded": dict(module.rows_forwarded),
        "seconds_by_phase": {k: round(v, 3) for k, v in module.timings.items()}})
