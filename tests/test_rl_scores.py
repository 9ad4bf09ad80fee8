"""Score shaping (rlhf_pl.rl.scores): the order of uncertainty penalty, per-prompt baseline, running
normalisation, missing-EOS penalty and clip; running statistics; the per-prompt baseline cache."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_pl.rl.scores import PromptBaselines, RunningMoments, leave_one_out_means, process_scores

REWARDS, UNCERTAINTY = torch.tensor([1.0, 3.0, -2.0, 6.0]), torch.tensor([0.5, 1.0, 0.0, 2.0])
ENDED = torch.tensor([True, True, False, True])


def shaped(rewards=REWARDS, ended=ENDED, *, uncertainty=UNCERTAINTY, moments=None, baselines=None, **settings):
    """process_scores on one rank (identity all-reduce); settings default to PPO's with the EOS penalty off."""
    return process_scores(rewards, ended, uncertainty=uncertainty, baselines=baselines, all_reduce=lambda t: t,
                          moments=moments if moments is not None else RunningMoments(), **settings)


def test_score_processing_order_uncertainty_running_norm_eos_penalty_clip():
    assert shaped().tolist() == [1.0, 3.0, -2.0, 6.0]
    assert shaped(uncertainty_coef=2.0).tolist() == [0.0, 1.0, -2.0, 2.0]
    assert shaped(eos_penalty=-1.0, score_clip=4.0).tolist() == [1.0, 3.0, -1.0, 4.0]
    assert shaped(eos_penalty=-1.0, eos_mode="add").tolist() == [1.0, 3.0, -3.0, 6.0]
    with pytest.raises(ValueError, match="ppo.uncertainty_coef=2.0 but the reward head returns no uncertainty"):
        shaped(uncertainty=None, uncertainty_coef=2.0)
    # running statistics over two batches equal the statistics of their concatenation
    moments, second = RunningMoments(), torch.tensor([0.0, 10.0])
    shaped(moments=moments, score_norm="standardise")
    standardised = shaped(second, ENDED[:2], uncertainty=None, moments=moments, score_norm="standardise")
    everything = torch.cat([REWARDS, second]).double()
    assert moments.count == 6 and math.isclose(moments.mean, float(everything.mean()), rel_tol=1e-12)
    assert math.isclose(moments.var, float(everything.var(correction=0)), rel_tol=1e-12)
    expected = (second - everything.mean()) / everything.std(correction=0)
    assert torch.allclose(standardised, expected.float())


def test_leave_one_out_means_are_the_means_of_the_other_responses_of_the_same_prompt():
    scores = torch.tensor([1.0, 3.0, 5.0, 0.0, 0.0, 6.0])  # two prompts, three responses each
    assert leave_one_out_means(scores, 3).tolist() == [4.0, 3.0, 2.0, 3.0, 3.0, 0.0]
    assert leave_one_out_means(scores, 2).tolist() == [3.0, 1.0, 0.0, 5.0, 6.0, 0.0]
    for bad in (1, 4):
        with pytest.raises(ValueError, match="groups of >= 2 that tile the 6 scores"):
            leave_one_out_means(scores, bad)


def test_group_baseline_uses_the_penalised_scores_and_centres_each_prompt():
    # pairs (1, 3) and (−2, 6); uncertainty 2·(0.5, 1, 0, 2) first: (0, 1) and (−2, 2)
    assert shaped(group_size=2).tolist() == [-2.0, 2.0, -8.0, 8.0]
    assert shaped(group_size=2, uncertainty_coef=2.0).tolist() == [-1.0, 1.0, -4.0, 4.0]
    assert shaped(group_size=2, eos_penalty=-1.0).tolist() == [-2.0, 2.0, -1.0, 8.0]  # the penalty comes after
    with pytest.raises(ValueError, match="baselines or group_size, not both"):
        shaped(group_size=2, baselines=torch.zeros(4))


def test_baseline_is_subtracted_after_the_uncertainty_penalty_and_before_norm_eos_penalty_and_clip():
    baselines = torch.tensor([0.5, 1.0, 4.0, -1.0])
    assert shaped(baselines=baselines).tolist() == [0.5, 2.0, -6.0, 7.0]
    # 1−1−0.5, 3−2−1, −2−0−4, 6−4+1
    assert shaped(baselines=baselines, uncertainty_coef=2.0).tolist() == [-0.5, 0.0, -6.0, 3.0]
    # the penalty replaces the centred score
    assert shaped(baselines=baselines, eos_penalty=-1.0, score_clip=4.0).tolist() == [0.5, 2.0, -1.0, 4.0]
    moments = RunningMoments()
    scaled = shaped(baselines=baselines, moments=moments, score_norm="scale")
    centred = torch.tensor([0.5, 2.0, -6.0, 7.0])
    assert math.isclose(moments.mean, float(centred.mean()), rel_tol=1e-12)  # the statistics are of the centred scores
    torch.testing.assert_close(scaled, centred / centred.std(correction=0))


def test_prompt_baselines_compute_each_new_prompt_once_and_round_trip_their_state():
    calls = []

    def compute(ids, mask):  # the "score" of a prompt: the sum of its valid ids
        calls.append(ids.shape[0])
        return (ids * mask).sum(1).float()

    baselines = PromptBaselines(compute)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5], [0, 1, 2], [0, 0, 7]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [0, 0, 1]])
    values, computed = baselines(ids, mask, torch.tensor([4, 9, 4, 2]))  # prompt 4 twice: computed once
    assert values.tolist() == [3.0, 12.0, 3.0, 7.0] and computed == 3 and calls == [3]
    again, computed = baselines(ids[:2], mask[:2], torch.tensor([9, 5]))
    assert again.tolist() == [12.0, 12.0] and computed == 1 and calls == [3, 1]  # 9 from the cache
    restored = PromptBaselines(compute)
    restored.load_state_dict({str(k): v for k, v in baselines.state_dict().items()})  # keys may come back as strings
    assert restored.scores == baselines.scores == {4: 3.0, 9: 12.0, 2: 7.0, 5: 12.0}
