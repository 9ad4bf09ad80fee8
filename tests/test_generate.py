"""Sampling loop and logprob helpers on a tiny random Llama: padding invariance, KV cache, EOS masking,
K samples per prompt sharing one prefill."""
from __future__ import annotations

import math

import pytest
import torch
from tiny_models import EOS, PAD, VOCAB
from tiny_models import tiny_causal_lm as _tiny
from torch import nn

from rlhf_pl.data.collate import pad_left
from rlhf_pl.models.generate import (
    DynamicCacheDecoder,
    Generation,
    entropy_from_logits,
    generate,
    logprobs_from_logits,
    position_ids_from_mask,
    response_logits,
    response_logprobs,
    response_mask_from_tokens,
)
from rlhf_pl.plugins.samplers import TemperatureSampler
from rlhf_pl.plugins.specs import TemperatureSamplerConfig


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return _tiny(request.param)


class Greedy:
    """argmax sampler (temperature 1): deterministic whatever the batch composition."""

    temperature = 1.0

    def warp(self, logits):
        return logits.float()

    def sample(self, logits, generator=None):
        return logits.argmax(-1)


class Recording(Greedy):
    """Greedy, remembering every logits row it was given."""

    def __init__(self):
        self.seen: list[torch.Tensor] = []

    def sample(self, logits, generator=None):
        self.seen.append(logits.clone())
        return super().sample(logits)


class Scripted(Greedy):
    """Returns scripted tokens: script[step] is the (b,) tensor for that step."""

    def __init__(self, script):
        self.script = [torch.tensor(s) for s in script]
        self.step = 0

    def sample(self, logits, generator=None):
        self.step += 1
        return self.script[self.step - 1]


class NoEOS(Greedy):
    """Greedy with EOS banned: every response runs to max_new_tokens."""

    def sample(self, logits, generator=None):
        return logits.float().index_fill(-1, torch.tensor([EOS]), float("-inf")).argmax(-1)


class RecordingTemperature(TemperatureSampler):
    """Temperature sampling, remembering every logits row it was given."""

    def __init__(self, temperature):
        super().__init__(TemperatureSamplerConfig(temperature=temperature))
        self.seen: list[torch.Tensor] = []

    def sample(self, logits, generator=None):
        self.seen.append(logits.clone())
        return super().sample(logits, generator)


def forward_shapes(model):
    """Records the input_ids shape of every forward call of ``model``; returns (shapes, hook handle)."""
    shapes: list[tuple[int, ...]] = []
    handle = model.register_forward_pre_hook(lambda _, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                             with_kwargs=True)
    return shapes, handle


def left_pad(prompts: list[list[int]], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    return pad_left(prompts, pad)


PROMPT_A = [5, 9, 13, 7, 30]
PROMPT_B = [11, 4, 8, 21, 17, 33, 6, 40]


def test_position_ids_from_mask():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 1, 1, 1]]


def test_response_mask_from_tokens_counts_up_to_first_eos():
    response = torch.tensor([[4, EOS, EOS, 7], [EOS, 3, 3, 3], [4, 5, 6, 7]])
    assert response_mask_from_tokens(response, EOS).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_same_prompt_alone_or_left_padded_in_a_batch_generates_the_same(model):
    alone = generate(model, *left_pad([PROMPT_A]), Greedy(), max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    ids, mask = left_pad([PROMPT_B, PROMPT_A])
    batch = generate(model, ids, mask, Greedy(), max_new_tokens=6, eos_token_id=EOS, pad_token_id=PAD)
    n = alone.response.shape[1]
    assert batch.prompt_length == 8 and alone.prompt_length == 5
    assert torch.equal(batch.response[1, :n], alone.response[0])
    assert batch.response_mask[1, :n].tolist() == alone.response_mask[0].tolist()


def test_response_logprobs_do_not_depend_on_padding(model):
    response_a, response_b = [3, 17, 25, 8], [12, 19, 1, 44]
    seq_alone = torch.tensor([PROMPT_A + response_a])
    alone = response_logprobs(model, seq_alone, torch.ones_like(seq_alone), 5, temperature=0.7)
    ids, mask = left_pad([PROMPT_B, PROMPT_A])
    sequences = torch.cat([ids, torch.tensor([response_b, response_a])], dim=1)
    attention = torch.cat([mask, torch.ones(2, 4, dtype=torch.long)], dim=1)
    batch = response_logprobs(model, sequences, attention, 8, temperature=0.7)
    assert batch.shape == (2, 4)
    assert torch.allclose(batch[1], alone[0], atol=1e-5)


def test_generation_stops_at_eos_and_pads_after_it(model):
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    script = [[6, 7], [EOS, 8], [9, 10], [11, 12]]  # row 0 ends at step 2, row 1 never
    out = generate(model, ids, mask, Scripted(script), max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert isinstance(out, Generation)
    assert out.response.tolist() == [[6, EOS, PAD, PAD], [7, 8, 10, 12]]
    assert out.response_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert out.ended.tolist() == [True, False]
    assert torch.equal(out.sequences[:, 8:], out.response) and torch.equal(out.sequences[:, :8], ids)
    assert torch.equal(out.attention_mask, torch.cat([mask, out.response_mask], dim=1))


def test_generation_stops_early_when_every_sequence_ended(model):
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    script = [[EOS, 7], [4, EOS]] + [[9, 9]] * 8
    out = generate(model, ids, mask, Scripted(script), max_new_tokens=10, eos_token_id=EOS, pad_token_id=EOS)
    assert out.response.tolist() == [[EOS, EOS], [7, EOS]]  # pad == eos: the mask still comes from positions
    assert out.response_mask.tolist() == [[1, 0], [1, 1]]
    assert out.ended.tolist() == [True, True]


def test_kv_cache_logits_equal_a_full_forward_at_every_step(model):
    ids, mask = left_pad([PROMPT_B, PROMPT_A, [3, 3]])
    recorder = Recording()
    out = generate(model, ids, mask, recorder, max_new_tokens=7, eos_token_id=EOS, pad_token_id=PAD)
    full = response_logits(model, out.sequences, out.attention_mask, out.prompt_length)  # (b, n, v)
    cached = torch.stack(recorder.seen, dim=1)  # (b, n, v)
    valid = out.response_mask.bool()
    assert cached.shape == full.shape == (3, out.response.shape[1], VOCAB)
    assert torch.allclose(cached[valid], full[valid], atol=1e-5)


def test_logprobs_at_temperature_match_manual_unpadded_computation(model):
    torch.manual_seed(3)
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=0.7))
    out = generate(model, ids, mask, sampler, max_new_tokens=5, eos_token_id=EOS, pad_token_id=PAD,
                   generator=torch.Generator().manual_seed(0))
    got = response_logprobs(model, out.sequences, out.attention_mask, out.prompt_length, temperature=0.7)
    for row, prompt in enumerate([PROMPT_A, PROMPT_B]):
        tokens = out.response[row].tolist()
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0]  # no padding at all
        for i, token in enumerate(tokens):
            if out.response_mask[row, i]:
                manual = torch.log_softmax(logits[len(prompt) - 1 + i] / 0.7, dim=-1)[token]
                assert math.isclose(got[row, i].item(), manual.item(), abs_tol=1e-5)
            else:
                assert got[row, i].item() == 0.0


def test_seeded_sampling_is_reproducible(model):
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.0))
    runs = [generate(model, ids, mask, sampler, 6, EOS, PAD, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)


def test_generate_runs_without_grad_in_eval_and_restores_train_mode(model):
    model.train()
    try:
        ids, mask = left_pad([PROMPT_A])
        recorder = Recording()
        generate(model, ids, mask, recorder, max_new_tokens=2, eos_token_id=EOS, pad_token_id=PAD)
        assert model.training
        assert not recorder.seen[0].requires_grad
    finally:
        model.eval()


def test_logprobs_and_entropy_from_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [10.0, -10.0, -10.0, -10.0]]])  # (1, 2, 4)
    tokens = torch.tensor([[2, 0]])
    assert torch.allclose(logprobs_from_logits(logits, tokens), torch.tensor([[-math.log(4), 0.0]]), atol=1e-6)
    entropy = entropy_from_logits(logits)
    assert math.isclose(entropy[0, 0].item(), math.log(4), rel_tol=1e-6)
    assert 0 <= entropy[0, 1].item() < 1e-6


def test_right_padded_prompts_are_refused(model):
    ids = torch.tensor([[5, 6, PAD]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        generate(model, ids, torch.tensor([[1, 1, 0]]), Greedy(), 3, EOS, PAD)


def test_k_samples_share_one_prefill_of_b_rows_then_decode_b_times_k_rows(model):
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    shapes, handle = forward_shapes(model)
    try:
        out = generate(model, ids, mask, NoEOS(), max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD, num_samples=3)
    finally:
        handle.remove()
    assert shapes == [(2, 8)] + [(6, 1)] * 3  # one prefill of the 2 distinct prompts, then 3 steps on 2·3 rows
    assert out.sequences.shape == (6, 12) and out.response.shape == out.response_mask.shape == (6, 4)
    assert out.ended.shape == (6,) and out.attention_mask.shape == (6, 12) and out.prompt_length == 8
    assert torch.equal(out.sequences[:, :8], ids.repeat_interleave(3, dim=0))  # row i·K + j: prompt i
    assert torch.equal(out.attention_mask, torch.cat([mask.repeat_interleave(3, dim=0), out.response_mask], dim=1))
    assert torch.equal(out.response, out.response[::3].repeat_interleave(3, dim=0))  # greedy: K equal samples


def test_shared_prefill_samples_what_repeated_prompts_sample_with_the_same_seed(model):
    """Temperature sampling with one seed: K samples from one prefill equal the unshared path (each
    prompt repeated K times with ``repeat_interleave``, num_samples=1), token for token. The logits
    the sampler sees are compared within float tolerance only (the prefill runs over b rows instead
    of b·K, and batched CPU kernels may round differently); the multinomial draws consume the
    generator identically since the logits have the same (b·K, v) shape at every step."""
    ids, mask = left_pad([PROMPT_A, PROMPT_B, [3, 3]])
    shared_sampler, unshared_sampler = RecordingTemperature(1.3), RecordingTemperature(1.3)
    shared = generate(model, ids, mask, shared_sampler, 6, EOS, PAD, generator=torch.Generator().manual_seed(5),
                      num_samples=4)
    unshared = generate(model, ids.repeat_interleave(4, dim=0), mask.repeat_interleave(4, dim=0), unshared_sampler,
                        6, EOS, PAD, generator=torch.Generator().manual_seed(5))
    assert torch.equal(shared.sequences, unshared.sequences)
    assert torch.equal(shared.response_mask, unshared.response_mask) and torch.equal(shared.ended, unshared.ended)
    assert len(shared.response) == 12 and len({tuple(r) for r in shared.response.tolist()}) > 3  # K samples differ
    for got, want in zip(shared_sampler.seen, unshared_sampler.seen, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_num_samples_must_be_a_positive_integer(model):
    ids, mask = left_pad([PROMPT_A])
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_samples"):
            generate(model, ids, mask, Greedy(), 2, EOS, PAD, num_samples=bad)


class NoEOSTemperature(TemperatureSampler):
    """Temperature sampling with EOS banned: a row ends only when ``on_token`` ends it."""

    def warp(self, logits):
        return super().warp(logits).index_fill(-1, torch.tensor([EOS]), float("-inf"))


class AllRows:
    """The hf decoder without ``keep``: every row stays in the cache until the loop ends."""

    def __init__(self, model):
        self.inner = DynamicCacheDecoder(model)

    def prefill(self, prompt_ids, prompt_mask, num_samples):
        return self.inner.prefill(prompt_ids, prompt_mask, num_samples)

    def step(self, tokens, mask):
        return self.inner.step(tokens, mask)


def end_rows_at(steps: dict[int, int], rows: int):
    """An ``on_token`` that ends row i after its ``steps[i]``-th token."""
    count = 0

    def on_token(tokens, ended):
        nonlocal count
        count += 1
        return torch.tensor([steps.get(i) == count for i in range(rows)])

    return on_token


def test_once_half_the_rows_ended_the_cache_drops_them_and_the_rest_sample_as_before(model):
    """Row 0 ends after 1 token, rows 1 and 2 after 2, row 3 runs to the end: the step after the second
    token holds 1 row of 4 unended, so the cache keeps row 3 alone from then on (forward shapes), and every
    row's tokens are those of the loop that keeps all rows, with the same seed (all rows are still sampled)."""
    ids, mask = left_pad([PROMPT_A, PROMPT_B, PROMPT_B, PROMPT_A])
    sampler = NoEOSTemperature(TemperatureSamplerConfig(temperature=1.0))
    stops = {0: 1, 1: 2, 2: 2}
    shapes, handle = forward_shapes(model)
    try:
        compacted = generate(model, ids, mask, sampler, 8, EOS, PAD, generator=torch.Generator().manual_seed(5),
                             on_token=end_rows_at(stops, 4))
    finally:
        handle.remove()
    full = generate(model, ids, mask, sampler, 8, EOS, PAD, generator=torch.Generator().manual_seed(5),
                    on_token=end_rows_at(stops, 4), decoder=AllRows(model))
    assert shapes == [(4, 8), (4, 1)] + [(1, 1)] * 6
    assert torch.equal(compacted.sequences, full.sequences)
    assert torch.equal(compacted.attention_mask, full.attention_mask)
    assert compacted.response_mask.sum(1).tolist() == [1, 2, 2, 8]


class TupleCache(nn.Module):
    """A model returning its KV cache as legacy tuples (no batch_repeat_interleave)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, use_cache=use_cache)
        out.past_key_values = tuple(out.past_key_values)
        return out


def test_a_cache_that_cannot_be_repeated_is_refused_not_re_prefilled(model):
    ids, mask = left_pad([PROMPT_A])
    with pytest.raises(TypeError, match="DynamicCache.batch_repeat_interleave.*tuple"):
        generate(TupleCache(model), ids, mask, Greedy(), 3, EOS, PAD, num_samples=2)


class OtherRankRunsUntil:
    """A stand-in for all_reduce_max over two processes whose other process still samples for the
    first ``steps`` calls: max(this process's flag, the other's)."""

    def __init__(self, steps: int):
        self.steps, self.calls = steps, 0

    def __call__(self, flag: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return flag.clamp(min=1.0 if self.calls <= self.steps else 0.0)


def test_sync_ranks_keeps_calling_the_model_until_every_process_ended_and_returns_the_lone_result(model):
    """A sharded model's forward is collective: a process whose rows ended at step 2 goes on calling
    the model while another samples (8 tokens here: 7 steps after the prefill), feeding padding without drawing from its
    generator; it returns what it returns alone, and its generator ends in the same state."""
    ids, mask = left_pad([PROMPT_A, PROMPT_B])
    script = [[EOS, 7], [4, EOS]]  # both rows end at step 2
    alone_gen, synced_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    shapes, handle = forward_shapes(model)
    try:
        alone = generate(model, ids, mask, Scripted(script), 10, EOS, PAD, generator=alone_gen)
        calls_alone = len(shapes)
        sync = OtherRankRunsUntil(7)
        synced = generate(model, ids, mask, Scripted(script), 10, EOS, PAD, generator=synced_gen, sync_ranks=sync)
    finally:
        handle.remove()
    assert calls_alone == 2  # prefill, one step
    # prefill, then a step per sync call that said "running", on row 1 alone: row 0 ended at the first token
    assert shapes[calls_alone:] == [(2, 8)] + [(1, 1)] * 7
    assert sync.calls == 8  # the 8th said "all ended"
    for field in Generation._fields:
        assert torch.equal(torch.as_tensor(getattr(synced, field)), torch.as_tensor(getattr(alone, field))), field
    assert torch.equal(alone_gen.get_state(), synced_gen.get_state())


def test_sync_ranks_with_temperature_sampling_draws_what_one_process_draws(model):
    ids, mask = left_pad([PROMPT_A, PROMPT_B, [3, 3]])
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.0))
    alone = generate(model, ids, mask, sampler, 6, EOS, PAD, generator=torch.Generator().manual_seed(1))
    synced = generate(model, ids, mask, sampler, 6, EOS, PAD, generator=torch.Generator().manual_seed(1),
                      sync_ranks=OtherRankRunsUntil(0))  # the other process has ended: no extra call
    assert torch.equal(alone.sequences, synced.sequences) and torch.equal(alone.attention_mask, synced.attention_mask)
