"""RewardModel: read-out position under any padding, normalisation, save/load round trip, scoring."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

from rlhf_pl import registry
from rlhf_pl.data.chat import tokenize_completion, tokenize_prompt
from rlhf_pl.data.collate import pad_left, pad_right
from rlhf_pl.data.formats import Message
from rlhf_pl.models.reward import HEAD_WEIGHTS, REWARD_CONFIG, RewardModel, fit_affine
from rlhf_pl.plugins.reward_heads import HeadChoice, RewardHeadOutput


@pytest.fixture()
def reward_model(tiny_model, tiny_tokenizer):
    torch.manual_seed(0)
    return RewardModel.from_causal_lm(copy.deepcopy(tiny_model), "linear", tiny_tokenizer).eval()


def _sequences(tokenizer) -> list[list[int]]:
    """Three prompt+completion sequences of different lengths, each ending with EOS (= pad)."""
    texts = [("What is 2 plus 3?", "5."), ("Hi", "Hello there, how can I help you today?"), ("Reverse 'cat'.", "tac")]
    return [tokenize_prompt(tokenizer, (Message("user", p),)) + tokenize_completion(tokenizer, c) for p, c in texts]


def _alone(model: RewardModel, seqs: list[list[int]]) -> torch.Tensor:
    """Each sequence scored on its own, no padding at all. Shape: (n,)."""
    return torch.cat([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).rewards for s in seqs])


@torch.no_grad()
def test_reward_is_read_at_last_real_token_for_any_padding(reward_model, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    assert pad == tiny_tokenizer.eos_token_id  # pad == EOS, as with SmolLM2
    seqs = _sequences(tiny_tokenizer)
    assert all(s[-1] == pad for s in seqs) and len({len(s) for s in seqs}) == 3
    expected = _alone(reward_model, seqs)

    right_ids, right_mask = pad_right(seqs, pad)
    left_ids, left_mask = pad_left(seqs, pad)
    torch.testing.assert_close(reward_model(right_ids, right_mask).rewards, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(reward_model(left_ids, left_mask).rewards, expected, atol=1e-5, rtol=0)

    # A mask computed from token ids (ids != pad) would drop every sequence's final EOS and read the
    # reward one token early: the rewards would differ.
    token_mask = (right_ids != pad).long()
    assert not torch.allclose(reward_model(right_ids, token_mask).rewards, expected, atol=1e-4)


def test_fit_affine_hand_computed():
    fit = fit_affine(torch.tensor([1.0, 2.0, 3.0, 4.0]), 1.0)
    # mean 2.5, population std sqrt(1.25) = 1.1180340; gain = 1/1.1180340, bias = -2.5 * gain
    assert fit.raw_mean == pytest.approx(2.5) and fit.raw_std == pytest.approx(math.sqrt(1.25))
    assert fit.gain == pytest.approx(0.8944272) and fit.bias == pytest.approx(-2.2360680)
    mean_only = fit_affine(torch.tensor([1.0, 2.0, 3.0, 4.0]), None)
    assert (mean_only.gain, mean_only.bias) == (1.0, -2.5)
    with pytest.raises(ValueError, match="constant"):
        fit_affine(torch.tensor([2.0, 2.0]), 1.0)
    with pytest.raises(ValueError, match="empty reference set"):
        fit_affine(torch.zeros(0), None)


@torch.no_grad()
def test_normalisation_gives_mean_0_and_std_1_on_the_reference_set(reward_model, tiny_tokenizer):
    ids, mask = pad_right(_sequences(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    raw = reward_model(ids, mask).raw

    reward_model.fit_normalisation(raw, 1.0, fitted_on="three sequences")
    rewards = reward_model(ids, mask).rewards
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rewards.std(correction=0).item() == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(reward_model(ids, mask).raw, raw)  # raw rewards are untouched

    reward_model.fit_normalisation(raw, None)
    rewards = reward_model(ids, mask).rewards
    assert rewards.mean().item() == pytest.approx(0.0, abs=1e-5)
    assert rewards.std(correction=0).item() == pytest.approx(raw.std(correction=0).item(), rel=1e-5)


@torch.no_grad()
def test_save_then_from_pretrained_gives_identical_rewards(tiny_model, tiny_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = RewardModel.from_causal_lm(copy.deepcopy(tiny_model), "ensemble", tiny_tokenizer, n_heads=3).eval()
    ids, mask = pad_right(_sequences(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    model.fit_normalisation(model(ids, mask).raw, 1.0, fitted_on="test")
    before = model(ids, mask)

    out = tmp_path / "rm"
    model.save_pretrained(out)
    model.save_pretrained(out)  # replacing an existing directory works too
    expected = {"config.json", "model.safetensors", "tokenizer.json", HEAD_WEIGHTS, REWARD_CONFIG}
    assert expected <= {p.name for p in out.iterdir()}
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # no temp or old directories left behind
    saved = json.loads((out / REWARD_CONFIG).read_text())
    assert saved["head"]["name"] == "ensemble" and saved["head"]["config"] == {"n_heads": 3, "init_std": None}
    assert saved["head"]["distribution"] == registry.installed("reward_heads")[0].distribution
    assert saved["normalisation"]["fitted_on"] == "test" and saved["hidden_size"] == 64

    loaded = RewardModel.from_pretrained(out)
    after = loaded(ids, mask)
    assert not loaded.training and loaded.head_choice == model.head_choice
    torch.testing.assert_close(after.rewards, before.rewards, atol=1e-6, rtol=0)
    torch.testing.assert_close(after.uncertainty, before.uncertainty, atol=1e-6, rtol=0)
    assert after.rewards.mean().item() == pytest.approx(0.0, abs=1e-5)  # normalisation came along
    torch.testing.assert_close(loaded.score(["Hi"], ["Hello"]), model.score(["Hi"], ["Hello"]), atol=1e-6, rtol=0)


def test_from_pretrained_names_the_missing_plugin_package(reward_model, tmp_path):
    out = reward_model.save_pretrained(tmp_path / "rm")
    config = json.loads((out / REWARD_CONFIG).read_text())
    config["head"].update(name="gated", distribution="acme-heads")
    (out / REWARD_CONFIG).write_text(json.dumps(config))
    with pytest.raises(registry.PluginError,
                       match=r"reward_config.json: key head.name='gated'.*pip install acme-heads"):
        RewardModel.from_pretrained(out)
    with pytest.raises(FileNotFoundError, match="not a reward model saved by rlhf_pl"):
        RewardModel.from_pretrained(tmp_path)


@torch.no_grad()
def test_score_uses_chat_template_and_is_batch_invariant(reward_model, tiny_tokenizer):
    prompts = ["What is 2 plus 3?", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
               "Reverse 'cat'."]
    completions = ["5.", "Hello there, how can I help you today?", "tac"]
    scores = reward_model.score(prompts, completions, batch_size=8)
    one_by_one = reward_model.score(prompts, completions, batch_size=1)
    torch.testing.assert_close(scores, one_by_one, atol=1e-5, rtol=0)
    system = (Message("system", "Be brief."), Message("user", "Hi"))
    seq = tokenize_prompt(tiny_tokenizer, system) + tokenize_completion(tiny_tokenizer, completions[1])
    assert scores[1].item() == pytest.approx(_alone(reward_model, [seq]).item(), abs=1e-5)
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        reward_model.score(prompts[:2], completions[:1])


def test_a_head_with_the_wrong_output_is_named(tiny_model):
    class Broken(nn.Module):
        def forward(self, hidden_states, attention_mask):
            return RewardHeadOutput(hidden_states[:, -1, :2])  # (b, 2) instead of (b,)

    model = RewardModel(copy.deepcopy(tiny_model).model, Broken(), HeadChoice("broken", None, "acme-heads"))
    with pytest.raises(ValueError, match=r"reward_head 'broken' returned rewards of shape \(1, 2\), expected \(1,\)"):
        model(torch.tensor([[5, 6]]), torch.ones(1, 2, dtype=torch.long))
