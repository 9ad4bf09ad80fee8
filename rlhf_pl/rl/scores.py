"""Score shaping: from the reward model's score of a response to the score that enters PPO's reward
(RLHF_REFERENCE.md items 4 and 17), and the state it keeps across updates (saved in checkpoints):
the running score statistics (:class:`RunningMoments`) and the per-prompt baselines
(:class:`PromptBaselines`). Every setting is a plain argument. ``b`` is the number of responses.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_pl.errors import ConfigError
from rlhf_pl.rl.masked import AllReduce
from rlhf_pl.rl.ppo import missing_eos_penalty


@dataclass
class RunningMoments:
    """Running mean and (population) variance of the scores over the whole run, merged batch by batch
    (Chan et al.'s parallel update, over all ranks); saved in checkpoints."""

    mean: float = 0.0
    var: float = 0.0
    count: float = 0.0

    def update(self, x: Tensor, all_reduce: AllReduce | None = None) -> None:
        """Merge a batch of scores. Shape: x (b,)."""
        sums = torch.stack([x.double().sum(), x.double().square().sum(),
                            torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
        total, total_sq, n = (float(v) for v in (all_reduce(sums) if all_reduce is not None else sums))
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean ** 2, 0.0)
        delta, merged = batch_mean - self.mean, self.count + n
        m2 = self.var * self.count + batch_var * n + delta ** 2 * self.count * n / merged
        self.mean, self.var, self.count = self.mean + delta * n / merged, m2 / merged, merged

    @property
    def std(self) -> float:
        return math.sqrt(self.var) if self.var > 0 else 1.0


def leave_one_out_means(scores: Tensor, group_size: int) -> Tensor:
    """For each score, the mean of the other ``group_size − 1`` scores of its group: the RLOO baseline
    (Kool et al. 2019; Ahmadian et al. 2024). Rows ``i·g … i·g + g − 1`` are one prompt's responses.
    It does not depend on the response it is subtracted from, so the policy gradient stays unbiased.
    Shape: (b·g,) -> (b·g,)."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"leave-one-out needs groups of >= 2 that tile the {scores.numel()} scores, got {group_size}")
    groups = scores.reshape(-1, group_size)
    return ((groups.sum(1, keepdim=True) - groups) / (group_size - 1)).reshape(-1)


def process_scores(rewards: Tensor, ended: Tensor, *, uncertainty: Tensor | None = None, uncertainty_coef: float = 0.0,
                   baselines: Tensor | None = None, group_size: int | None = None, score_norm: str = "none",
                   moments: RunningMoments | None = None, all_reduce: AllReduce | None = None,
                   eos_penalty: float | None = None, eos_mode: str = "replace",
                   score_clip: float | None = None) -> Tensor:
    """Reward-model score → the score that enters the reward, in this order:

    1. minus ``uncertainty_coef`` · ``uncertainty`` (the reward head's, when the coefficient is > 0);
    2. minus the per-prompt baseline b(x) (``baselines``, when given), or with ``group_size`` the mean
       of the step-1 scores of the prompt's other responses (:func:`leave_one_out_means`);
    3. running normalisation ``score_norm``: ``none``, ``scale`` (÷ running std) or ``standardise``
       (also − running mean); ``moments`` is updated with this batch first (over all ranks);
    4. missing-EOS penalty ``eos_penalty`` (None: off) for responses that did not end, ``eos_mode``
       ``replace`` or ``add`` (:func:`rlhf_pl.rl.ppo.missing_eos_penalty`);
    5. clip to ±``score_clip`` (None: off).

    Shape: rewards, ended (bool), uncertainty, baselines (b,) -> (b,) float32.
    """
    scores = rewards.float()
    if uncertainty_coef > 0:
        if uncertainty is None:
            raise ConfigError(f"ppo.uncertainty_coef={uncertainty_coef} but the reward head returns no uncertainty; "
                              "use a head that does (reward_head=ensemble when training the RM) or set "
                              "ppo.uncertainty_coef=0")
        scores = scores - uncertainty_coef * uncertainty.float()
    if baselines is not None and group_size is not None:
        raise ValueError("process_scores: give baselines or group_size, not both")
    if baselines is not None:
        scores = scores - baselines.to(scores)
    if group_size is not None:
        scores = scores - leave_one_out_means(scores, group_size)
    if score_norm != "none":
        moments.update(scores, all_reduce)
        shift = moments.mean if score_norm == "standardise" else 0.0
        scores = (scores - shift) / moments.std
    if eos_penalty is not None:
        scores = missing_eos_penalty(scores, ended, eos_penalty, eos_mode)
    if score_clip is not None:
        scores = scores.clamp(-score_clip, score_clip)
    return scores


class PromptBaselines:
    """A per-prompt baseline b(x), computed the first time prompt x is drawn and cached by its index
    (saved in checkpoints). b depends on the prompt only, so subtracting it from the scores keeps the
    policy gradient unbiased while removing the spread of the scores *between* prompts.

    ``compute(input_ids, attention_mask)`` gives the baselines of a batch of prompts (the rows not
    cached yet, in order). Shapes: (k, p), (k, p) -> (k,).
    """

    def __init__(self, compute: Callable[[Tensor, Tensor], Tensor]) -> None:
        self.compute = compute
        self.scores: dict[int, float] = {}

    def __call__(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> tuple[Tensor, int]:
        """Baselines of a batch of prompts, and how many were computed now (a prompt repeated in the
        batch is computed once). Shapes: input_ids, attention_mask (b, p), index (b,) -> (b,) float32, int."""
        keys = [int(i) for i in index.tolist()]
        first_row: dict[int, int] = {}  # uncached prompt -> its first row
        for row, key in enumerate(keys):
            if key not in self.scores:
                first_row.setdefault(key, row)
        new = list(first_row.values())
        if new:
            rows = torch.tensor(new, device=input_ids.device)
            for row, value in zip(new, self.compute(input_ids[rows], attention_mask[rows]).float().tolist()):
                self.scores[keys[row]] = value
        return torch.tensor([self.scores[key] for key in keys], dtype=torch.float32, device=input_ids.device), len(new)

    def state_dict(self) -> dict[int, float]:
        return dict(self.scores)

    def load_state_dict(self, state: dict[int, float]) -> None:
        self.scores = {int(k): float(v) for k, v in state.items()}
