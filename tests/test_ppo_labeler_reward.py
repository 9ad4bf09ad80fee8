"""``ppo.reward_from=labeler``: PPO against the labeler plugin's scores, no reward model (Gao et al.'s
gold-reward control): the scores are the labeler's, the stage runs end to end, bad settings are refused."""
from __future__ import annotations

import json
import re

import pytest
import torch
from ppo_helpers import make_cfg, ppo_run

from rlhf_pl.config import validate_config
from rlhf_pl.data.formats import Message, Prompt
from rlhf_pl.errors import ConfigError, InputError
from rlhf_pl.models.reward import LabelerReward
from rlhf_pl.plugins.labeler_specs import RuleLabelerConfig
from rlhf_pl.plugins.labelers import RuleLabeler

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def history(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["history"]

PROMPTS = [("What is 6 times 3?", "multiply", "18"), ("What is 7 plus 5?", "add", "12"),
           ("Reverse the word 'cat'.", "reverse", "tac"), ("What is the capital of Chile?", "capital", "Santiago")]


def prompt(text: str, task: str, answer: str) -> Prompt:
    return Prompt((Message("user", text),), "test", {"task": task, "answer": answer})


def test_labeler_reward_is_the_labelers_score():
    reward = LabelerReward(RuleLabeler(RuleLabelerConfig()), "rule")
    p = prompt(*PROMPTS[0])
    # the answer early: 4 (correct) + 0.5 (direct); the last number is not the answer: 0; 12 words, unfinished: −1
    out = reward([p, p, p], ["6 * 3 = 18.", "18 is the answer, not 17.",
                             "six times three is what we have to work out here and"])
    assert out.rewards.tolist() == [4.5, 0.0, -1.0]
    assert out.raw.tolist() == out.rewards.tolist() and out.uncertainty is None
    assert reward.source == "labeler:rule"


def test_a_labeler_without_scores_is_refused():
    class RanksOnly:
        def rank(self, prompt, completions):
            return (tuple(range(len(completions))),)

    with pytest.raises(InputError, match="labeler 'ranks_only' gives no scores"):
        LabelerReward(RanksOnly(), "ranks_only")


@pytest.mark.parametrize("overrides, expected", [
    (["ppo.score_baseline=reference"],
     "ppo.reward_from=labeler goes with ppo.score_baseline=group or none, got reference"),
    (["~labeler", "ppo.score_baseline=none"], "labeler is unset: add labeler=rule"),
])
def test_labeler_reward_settings_are_checked(tmp_path, ppo_inputs, overrides, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        validate_config(make_cfg(ppo_inputs, tmp_path, "ppo.reward_from=labeler", *overrides))


def test_ppo_against_the_labeler_scores_every_response_with_it(tmp_path, ppo_inputs, monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": t, "task": k, "answer": a}) + "\n" for t, k, a in PROMPTS))
    calls: list[tuple[str, str, float]] = []
    rule_score = RuleLabeler.score

    def recorded(self, prompt, completion):
        value = rule_score(self, prompt, completion)
        calls.append((prompt.messages[-1].content, completion, value))
        return value

    monkeypatch.setattr(RuleLabeler, "score", recorded)  # the stage builds the labeler from the registry
    cfg = make_cfg(ppo_inputs, tmp_path, "ppo.reward_from=labeler", "ppo.score_baseline=group", "ppo.critic=none",
                   "ppo.samples_per_prompt=2", "ppo.batch_size=4", "ppo.updates=2", f"data.prompts={data}",
                   "data.limit=null")
    run_dir = tmp_path / "run"
    metrics = ppo_run(cfg, run_dir)
    assert metrics["reward_from"] == "labeler:rule"
    assert metrics["rows_forwarded"]["reward"] == len(calls) == 2 * 4 * 2
    assert (run_dir / "policy" / "config.json").is_file()
    assert {text for text, _, _ in calls} == {t for t, _, _ in PROMPTS}  # every prompt scored with its own answer
    for update, logged in enumerate(history(run_dir)["score"]):  # the mean score of each rollout: the labeler's
        scores = [value for _, _, value in calls[8 * update:8 * (update + 1)]]
        assert logged == pytest.approx(sum(scores) / 8, abs=1e-5)
    assert len({value for _, _, value in calls}) > 1  # the random policy's answers are scored differently
