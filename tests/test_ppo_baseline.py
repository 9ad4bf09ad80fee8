"""PPO's per-prompt score baseline (``ppo.score_baseline=reference``) and the zero value head."""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf
from ppo_helpers import make_cfg, ppo_run
from tool_loader import load_tool

from rlhf_pl import registry
from rlhf_pl.config import validate_config
from rlhf_pl.data.batches import PromptCollator, tokenize_prompts
from rlhf_pl.data.formats import load_prompts
from rlhf_pl.errors import ConfigError
from rlhf_pl.models.critic import ValueHead
from rlhf_pl.models.generate import GreedySampler, generate
from rlhf_pl.models.ppo_models import build_models
from rlhf_pl.rl.scores import PromptBaselines
from rlhf_pl.stages.ppo import PPOModule

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_greedy_sampler_takes_the_argmax_lowest_id_on_ties():
    logits = torch.tensor([[0.0, 2.0, 2.0, -1.0], [5.0, 1.0, 0.0, 4.9]])
    assert GreedySampler().sample(logits).tolist() == [1, 0]
    assert GreedySampler().temperature == 1.0


def test_reference_baseline_is_the_score_of_the_references_greedy_answer_cached_per_prompt(tmp_path, ppo_inputs,
                                                                                            tiny_tokenizer):
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.max_new_tokens=6")
    ppo = OmegaConf.to_object(cfg.ppo)
    models = build_models(cfg, ppo_inputs / "sft", ppo_inputs / "rm", None)
    prompts = load_prompts("embedded:prompts", limit=5)
    items = tokenize_prompts(prompts, tiny_tokenizer, 256)
    collate = PromptCollator(tiny_tokenizer.pad_token_id)
    module = PPOModule(models, ppo, registry.build_by_name("samplers", "temperature"),
                       registry.build_by_name("kl_controllers", "fixed"), prompts, items, 0, tmp_path)
    baseline = module.baseline  # ppo.score_baseline=reference is the default
    batch = collate([items[0], items[3], items[1], items[3]])  # prompt 3 twice: computed once
    with torch.no_grad():
        values, computed = baseline(batch["input_ids"], batch["attention_mask"], batch["index"])
        assert computed == 3 and sorted(baseline.scores) == [0, 1, 3] and values[1] == values[3]
        for row, item in enumerate([items[0], items[3], items[1]]):  # each prompt alone, no padding
            ids = torch.tensor([item.input_ids])
            gen = generate(models.reference, ids, torch.ones_like(ids), GreedySampler(), 6,
                           tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
            alone = models.scorer(gen.sequences, torch.cat([torch.ones_like(ids), gen.response_mask], 1)).rewards
            assert math.isclose(float(values[row]), float(alone[0]), abs_tol=1e-5)
        later = collate([items[1], items[4]])
        again, computed = baseline(later["input_ids"], later["attention_mask"], later["index"])
    assert computed == 1 and float(again[0]) == float(values[2])  # prompt 1 from the cache, prompt 4 new
    restored = PromptBaselines(module.reference_greedy_scores)
    restored.load_state_dict(baseline.state_dict())
    assert restored.scores == baseline.scores and len(restored.scores) == 4


def test_rollout_scores_are_centred_and_the_run_logs_the_score_against_the_reference(tmp_path, ppo_inputs):
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.updates=2", "ppo.batch_size=4", "ppo.max_new_tokens=6",
                   "ppo.missing_eos_penalty=null", "ppo.sample_every=1")
    summary = ppo_run(cfg, tmp_path / "run")
    h = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["history"]
    for update in range(2):  # score − b(x) = what enters the reward here (no penalty, norm or clip)
        assert math.isclose(h["score_vs_reference"][update], h["score_final"][update], abs_tol=1e-6)
        assert math.isclose(h["score"][update] - h["reference_score"][update], h["score_vs_reference"][update],
                            abs_tol=1e-6)
    cached = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["reference_baseline"]
    assert summary["rows_forwarded"]["reference_greedy"] == len(cached)  # one greedy answer per distinct prompt
    assert summary["score_vs_reference_gain"] == pytest.approx(h["score_vs_reference"][1] - h["score_vs_reference"][0])
    # two updates: the fitted line's rise is the difference, and there is no noise estimate (t null)
    assert summary["score_vs_reference_trend"]["rise"] == pytest.approx(summary["score_vs_reference_gain"], abs=1e-4)
    assert summary["score_vs_reference_trend"]["t"] is None
    assert summary["score_trend"]["rise"] == pytest.approx(h["score"][1] - h["score"][0], abs=1e-4)
    assert (tmp_path / "run" / "ppo_curves.png").stat().st_size > 0

    off = make_cfg(ppo_inputs, tmp_path, "ppo.updates=1", "ppo.batch_size=2", "ppo.max_new_tokens=4",
                   "ppo.score_baseline=none")
    summary = ppo_run(off, tmp_path / "off")
    h = torch.load(tmp_path / "off" / "checkpoints" / "last.pt", weights_only=True)["history"]
    assert math.isnan(h["score_vs_reference"][0]) and summary["score_vs_reference_gain"] is None
    assert summary["score_vs_reference_trend"] is None
    assert summary["score_trend"] == {"start": pytest.approx(h["score"][0], abs=1e-4), "rise": 0.0, "t": None}
    assert "reference_greedy" not in summary["rows_forwarded"]


def test_several_responses_per_prompt_share_its_row_group_and_the_group_baseline_centres_them(tmp_path, ppo_inputs,
                                                                                               tiny_tokenizer):
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.max_new_tokens=6", "ppo.samples_per_prompt=3",
                   "ppo.score_baseline=group", "ppo.missing_eos_penalty=null", "ppo.num_minibatches=3")
    ppo = OmegaConf.to_object(cfg.ppo)
    models = build_models(cfg, ppo_inputs / "sft", ppo_inputs / "rm", None)
    prompts = load_prompts("embedded:prompts", limit=5)
    items = tokenize_prompts(prompts, tiny_tokenizer, 256)
    module = PPOModule(models, ppo, registry.build_by_name("samplers", "temperature"),
                       registry.build_by_name("kl_controllers", "fixed"), prompts, items, 0, tmp_path)
    assert module.baseline is None
    batch = PromptCollator(tiny_tokenizer.pad_token_id)([items[4], items[1]])
    rollout = module.rollout(batch)
    p = rollout.prompt_length
    assert rollout.sequences.shape[0] == 6 and rollout.prompt_index.tolist() == [4, 4, 4, 1, 1, 1]
    for row in range(6):  # rows i·3 … i·3 + 2 answer prompt i
        assert torch.equal(rollout.sequences[row, :p], batch["input_ids"][row // 3])
    rm = rollout.rm_scores.reshape(2, 3)
    expected = rm - (rm.sum(1, keepdim=True) - rm) / 2  # minus the mean of the prompt's two other scores
    assert torch.allclose(rollout.scores, expected.reshape(-1), atol=1e-6)
    assert rollout.baselines is None and module.rows_forwarded["reward"] == 6


def test_several_responses_per_prompt_run_end_to_end_with_the_reference_baseline_computed_once_per_prompt(
        tmp_path, ppo_inputs):
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.updates=2", "ppo.batch_size=2", "ppo.samples_per_prompt=2",
                   "ppo.max_new_tokens=4", "ppo.missing_eos_penalty=null")
    summary = ppo_run(cfg, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    rows = summary["rows_forwarded"]
    assert rows["reward"] == 2 * 2 * 2  # updates × prompts × responses
    assert rows["policy_train"] == rows["reward"] * cfg.ppo.ppo_epochs
    assert rows["reference_greedy"] == len(state["reference_baseline"]) <= 4  # one greedy answer per prompt
    h = state["history"]
    for update in range(2):  # with the baseline repeated over each prompt's responses
        assert math.isclose(h["score_vs_reference"][update], h["score_final"][update], abs_tol=1e-6)


def test_zero_value_head_starts_at_zero_and_settings_name_the_choices(tmp_path, ppo_inputs):
    head = ValueHead.zero(16)
    assert torch.equal(head(torch.randn(2, 3, 16)), torch.zeros(2, 3))
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.value_head_init=zero")
    models = build_models(cfg, ppo_inputs / "sft", ppo_inputs / "rm", None)
    assert torch.count_nonzero(models.critic.head.proj.weight) == 0
    with pytest.raises(ConfigError, match=r"ppo\.score_baseline='greedy'\W+choose one of: reference, group, none"):
        validate_config(make_cfg(ppo_inputs, tmp_path, "ppo.score_baseline=greedy"))
    with pytest.raises(ConfigError, match=r"ppo\.value_head_init='ones'\W+choose one of: zero, reward, fresh"):
        validate_config(make_cfg(ppo_inputs, tmp_path, "ppo.value_head_init=ones"))


# --- tools/reward_spread.py: the signal PPO has to work with --------------------------------------


def _spread_tool():
    return load_tool("reward_spread")


def test_spread_separates_between_and_within_prompt_variation():
    tool = _spread_tool()
    s = tool.spread([[1.0, 3.0], [5.0, 5.0], [-2.0, 0.0]])  # means 2, 5, −1; stds 1, 0, 1
    assert math.isclose(s.between_std, math.sqrt(((2 - 2) ** 2 + (5 - 2) ** 2 + (-1 - 2) ** 2) / 3))
    assert math.isclose(s.within_std, 2 / 3) and math.isclose(s.best_of_n_gain, 2 / 3)
    assert math.isclose(tool.within_correlation([[1, 2, 3], [4, 4, 4]], [[2, 4, 7], [1, 2, 3]]),
                        tool.correlation([1, 2, 3], [2, 4, 7]))  # the constant prompt is left out
    with pytest.raises(ValueError, match="at least one score"):
        tool.spread([[1.0], []])


def test_reward_spread_tool_runs_on_tiny_models_and_writes_json(tmp_path, ppo_inputs):
    import json

    tool = _spread_tool()
    out = tmp_path / "spread.json"
    assert tool.main(["--policy", str(ppo_inputs / "sft"), "--reward", str(ppo_inputs / "rm"), "--num-prompts", "3",
                      "--samples", "2", "--max-new-tokens", "4", "--no-bf16", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["prompts"] == 3 and result["samples"] == 2
    assert result["between_prompt_std"] >= 0 and result["within_prompt_std"] >= 0 and result["token_entropy"] > 0
    assert set(result["form_margins_over_bare"]) == set(tool.FORMS) and result["form_margins_over_bare"]["X."] == 0.0
    with pytest.raises(SystemExit, match="no rm output of smollm2_135m"):
        tool.main(["--policy", str(ppo_inputs / "sft"), "--output-root", str(tmp_path / "empty")])
