"""rlhf_pl.sampling: n completions per prompt (sharing the prompt's prefill), batched by length, cut at stop
strings, scored."""
from __future__ import annotations

import pytest
import torch

from rlhf_pl.data.chat import tokenize_prompt
from rlhf_pl.data.collate import pad_left
from rlhf_pl.data.formats import Message
from rlhf_pl.models.generate import GreedySampler
from rlhf_pl.models.reward import RewardOutput
from rlhf_pl.plugins.samplers import TemperatureSampler
from rlhf_pl.plugins.specs import TemperatureSamplerConfig
from rlhf_pl.sampling import Completions, cut_at_stop_strings, sample, sample_texts

QUESTIONS = ["Hi.", "What is 2 + 3? Answer with the number only, please.", "Spell 'cat'."]


def _prompts(tokenizer) -> list[list[int]]:
    return [tokenize_prompt(tokenizer, [Message("user", q)]) for q in QUESTIONS]


def length_scorer(sequences: torch.Tensor, attention_mask: torch.Tensor) -> RewardOutput:
    """A rule 'reward model': the number of attended tokens. Shape: (b, t) -> (b,)."""
    rewards = attention_mask.sum(1).float()
    return RewardOutput(rewards, rewards)


def content_scorer(sequences: torch.Tensor, attention_mask: torch.Tensor) -> RewardOutput:
    """A rule 'reward model' that tells sequences apart: the sum of the attended token ids (exact in
    float32 at these sizes). Shape: (b, t) -> (b,)."""
    rewards = (sequences * attention_mask).sum(1).float()
    return RewardOutput(rewards, rewards)


def test_n_completions_per_prompt_in_prompt_order_whatever_the_batching(tiny_model, tiny_tokenizer, one_thread):
    """Greedy answers do not depend on how prompts are batched (left padding, sorted by length)."""
    prompts = _prompts(tiny_tokenizer)
    alone = [sample_texts(tiny_model, tiny_tokenizer, [p], 1, GreedySampler(), 6)[0][0] for p in prompts]
    batched = sample_texts(tiny_model, tiny_tokenizer, prompts, 2, GreedySampler(), 6, batch_size=4)
    assert [len(per_prompt) for per_prompt in batched] == [2, 2, 2]
    for index, (one, two) in enumerate(zip(alone, batched)):
        assert {s.prompt_index for s in two} == {index}
        assert two[0].tokens == two[1].tokens == one.tokens and two[0].text == one.text
        assert 1 <= len(one.tokens) <= 6 and one.ended == (one.tokens[-1] == tiny_tokenizer.eos_token_id)


def test_scores_are_read_over_prompt_and_response(tiny_model, tiny_tokenizer, one_thread):
    prompts = _prompts(tiny_tokenizer)
    samples = sample_texts(tiny_model, tiny_tokenizer, prompts, 1, GreedySampler(), 5, scorer=length_scorer)
    for ids, (s,) in zip(prompts, samples):
        assert s.reward == len(ids) + len(s.tokens)


def test_sample_cuts_at_stop_strings_and_decodes_without_special_tokens(tiny_model, tiny_tokenizer, one_thread):
    ids, mask = pad_left(_prompts(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    free = sample(tiny_model, ids, mask, GreedySampler(), 8, tiny_tokenizer)
    assert isinstance(free, Completions) and free.scores is None
    assert free.attention_mask.shape == free.sequences.shape
    assert torch.equal(free.attention_mask[:, free.prompt_length:], free.mask)
    first_text = tiny_tokenizer.decode(free.response[0, :1].tolist())  # the first token's text ends the response
    cut = sample(tiny_model, ids, mask, GreedySampler(), 8, tiny_tokenizer, stop_strings=[first_text])
    assert cut.mask[0].tolist() == [1] + [0] * (cut.mask.shape[1] - 1) and bool(cut.ended[0])
    assert torch.equal(cut.sequences, free.sequences)  # the cut changes the mask, not what was sampled
    for text in free.texts(tiny_tokenizer):
        assert tiny_tokenizer.eos_token not in text and text == text.strip()


def test_stop_strings_end_a_response_after_the_completing_token(tiny_tokenizer):
    tok = tiny_tokenizer
    ids = tok("42. Then more", add_special_tokens=False)["input_ids"]
    response = torch.tensor([ids, ids])
    mask = torch.ones_like(response)
    mask[1, 2:] = 0
    cut, stopped = cut_at_stop_strings(response, mask, tok, [". "])
    k = next(i for i in range(1, len(ids) + 1) if ". " in tok.decode(ids[:i]))
    assert cut[0].tolist() == [1] * k + [0] * (len(ids) - k)
    assert stopped.tolist() == [True, ". " in tok.decode(ids[:2])]
    same, none = cut_at_stop_strings(response, mask, tok, [])
    assert torch.equal(same, mask) and not none.any()


def test_sample_texts_prefills_each_prompt_once_and_keeps_samples_with_their_prompt_and_reward(
        tiny_model, tiny_tokenizer, one_thread):
    """n=3, batch_size=6: 2 distinct prompts per batch (shortest first), each prefilled once, then 2·3 rows decode.
    Every sample stays with its prompt (prompt order, prompt_index) and its reward is its own sequence's."""
    prompts = _prompts(tiny_tokenizer)
    rows: list[tuple[int, int]] = []  # (rows, columns) of every forward call
    handle = tiny_model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(tuple(kwargs["input_ids"].shape)),
                                                  with_kwargs=True)
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.5))
    try:
        samples = sample_texts(tiny_model, tiny_tokenizer, prompts, 3, sampler, 5, batch_size=6,
                               generator=torch.Generator().manual_seed(0), scorer=content_scorer)
    finally:
        handle.remove()
    by_length = sorted(range(3), key=lambda i: len(prompts[i]))
    prefills = [shape for shape in rows if shape[1] > 1]
    assert prefills == [(2, max(len(prompts[i]) for i in by_length[:2])), (1, len(prompts[by_length[2]]))]
    assert {shape[0] for shape in rows if shape[1] == 1} <= {6, 3}
    assert [len(per_prompt) for per_prompt in samples] == [3, 3, 3]
    for index, (ids, per_prompt) in enumerate(zip(prompts, samples)):
        assert [s.prompt_index for s in per_prompt] == [index] * 3
        for s in per_prompt:
            assert s.reward == sum(ids) + sum(s.tokens)  # the reward of this very sequence
            assert s.text == tiny_tokenizer.decode(list(s.tokens), skip_special_tokens=True).strip()
    assert len({s.tokens for per_prompt in samples for s in per_prompt}) > 3  # temperature: samples differ


def test_sample_with_num_samples_repeats_the_prompt_mask_and_scores_every_row(tiny_model, tiny_tokenizer, one_thread):
    ids, mask = pad_left(_prompts(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    out = sample(tiny_model, ids, mask, GreedySampler(), 4, tiny_tokenizer, scorer=length_scorer, num_samples=2)
    assert out.sequences.shape[0] == out.attention_mask.shape[0] == out.scores.rewards.shape[0] == 6
    assert torch.equal(out.attention_mask[:, :out.prompt_length], mask.repeat_interleave(2, dim=0))
    assert torch.equal(out.sequences[:, :out.prompt_length], ids.repeat_interleave(2, dim=0))
    assert torch.equal(out.scores.rewards, out.attention_mask.sum(1).float())
    single = sample(tiny_model, ids, mask, GreedySampler(), 4, tiny_tokenizer)
    assert torch.equal(out.sequences[::2], single.sequences) and torch.equal(out.sequences[1::2], single.sequences)


def test_a_count_per_prompt_prefills_each_prompt_once_for_all_its_samples(tiny_model, tiny_tokenizer, one_thread):
    """n=[2, 0, 3]: prompt 0 gets 2 samples from one prefill, prompt 1 none and no forward call, prompt 2 gets 3
    from one prefill; a batch holds prompts of one count. Equal counts as a list are the int path, token for token."""
    prompts = _prompts(tiny_tokenizer)
    rows: list[tuple[int, int]] = []
    handle = tiny_model.register_forward_pre_hook(lambda _, args, kwargs: rows.append(tuple(kwargs["input_ids"].shape)),
                                                  with_kwargs=True)
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.5))
    try:
        samples = sample_texts(tiny_model, tiny_tokenizer, prompts, [2, 0, 3], sampler, 5, batch_size=6,
                               generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert [shape for shape in rows if shape[1] > 1] == [(1, len(prompts[0])), (1, len(prompts[2]))]
    assert {shape[0] for shape in rows if shape[1] == 1} <= {2, 3}
    assert [[s.prompt_index for s in per_prompt] for per_prompt in samples] == [[0, 0], [], [2, 2, 2]]
    as_list = sample_texts(tiny_model, tiny_tokenizer, prompts, [2, 2, 2], sampler, 5, batch_size=4,
                           generator=torch.Generator().manual_seed(1))
    as_int = sample_texts(tiny_model, tiny_tokenizer, prompts, 2, sampler, 5, batch_size=4,
                          generator=torch.Generator().manual_seed(1))
    assert as_list == as_int


def test_sample_texts_refuses_a_count_list_of_the_wrong_length_or_a_negative_count(tiny_model, tiny_tokenizer):
    prompts = _prompts(tiny_tokenizer)
    for n in ([1, 1], [1, -1, 1], 0):
        with pytest.raises(ValueError, match=r"n=.* must be >= 1"):
            sample_texts(tiny_model, tiny_tokenizer, prompts, n, GreedySampler(), 5)
