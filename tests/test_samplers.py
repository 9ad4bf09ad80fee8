"""Samplers: warped logits against hand-computed filtered distributions, sampling frequencies, validation."""
from __future__ import annotations

import math

import pytest
import torch

from rlhf_pl import registry
from rlhf_pl.plugins.samplers import Sampler, TemperatureSampler, TopKSampler, TopPSampler
from rlhf_pl.plugins.specs import TemperatureSamplerConfig, TopKSamplerConfig, TopPSamplerConfig

NEG_INF = float("-inf")


def _probs(sampler: Sampler, logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(sampler.warp(logits), dim=-1)


def test_temperature_divides_logits_and_keeps_every_token():
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=0.5))
    logits = torch.tensor([[1.0, 2.0, -3.0]])
    assert torch.equal(sampler.warp(logits), torch.tensor([[2.0, 4.0, -6.0]]))
    expected = torch.tensor([math.exp(2), math.exp(4), math.exp(-6)])
    assert torch.allclose(_probs(sampler, logits)[0], expected / expected.sum(), atol=1e-6)


def test_top_k_keeps_exactly_k_highest_after_temperature():
    sampler = TopKSampler(TopKSamplerConfig(temperature=2.0, k=2))
    logits = torch.tensor([[3.0, 1.0, 4.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    warped = sampler.warp(logits)
    assert torch.equal(warped[0], torch.tensor([1.5, NEG_INF, 2.0, NEG_INF]))
    assert torch.isfinite(warped[1]).sum() == 2  # a tie at the boundary still keeps exactly k
    assert warped[1, 3] == 2.5
    p_first = 1 / (1 + math.exp(0.5))  # e^1.5 / (e^1.5 + e^2)
    assert torch.allclose(_probs(sampler, logits)[0], torch.tensor([p_first, 0, 1 - p_first, 0]), atol=1e-6)


def test_top_k_larger_than_vocab_filters_nothing():
    sampler = TopKSampler(TopKSamplerConfig(temperature=1.0, k=50))
    logits = torch.tensor([[0.1, 0.2, 0.3]])
    assert torch.equal(sampler.warp(logits), logits)


def test_top_p_keeps_smallest_set_reaching_p_in_vocab_order():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # ranked: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    nucleus = TopPSampler(TopPSamplerConfig(temperature=1.0, p=0.75))
    assert torch.allclose(_probs(nucleus, logits), torch.tensor([[0.0, 0.625, 0.0, 0.375]]), atol=1e-6)
    assert torch.allclose(_probs(TopPSampler(TopPSamplerConfig(temperature=1.0, p=0.9)), logits),
                          torch.tensor([[0.0, 0.5, 0.15, 0.3]]) / 0.95, atol=1e-6)
    only_top = TopPSampler(TopPSamplerConfig(temperature=1.0, p=0.3))  # top token alone exceeds p: kept
    assert torch.equal(_probs(only_top, logits), torch.tensor([[0.0, 1.0, 0.0, 0.0]]))
    full = TopPSampler(TopPSamplerConfig(temperature=1.0, p=1.0))
    assert torch.allclose(_probs(full, logits), probs, atol=1e-6)


def test_top_p_applies_temperature_before_the_nucleus():
    probs = torch.tensor([[0.6, 0.3, 0.1]])
    sampler = TopPSampler(TopPSamplerConfig(temperature=0.5, p=0.8))
    sharpened = probs ** 2 / (probs ** 2).sum()  # T = 0.5 squares the probabilities: 0.783, 0.196, 0.022
    kept = torch.tensor([[sharpened[0, 0], sharpened[0, 1], 0.0]])
    assert torch.allclose(_probs(sampler, probs.log()), kept / kept.sum(), atol=1e-6)


@pytest.mark.parametrize("sampler, expected", [
    (TemperatureSampler(TemperatureSamplerConfig(temperature=1.0)), [0.1, 0.2, 0.3, 0.4]),
    (TopKSampler(TopKSamplerConfig(temperature=1.0, k=2)), [0.0, 0.0, 3 / 7, 4 / 7]),
    (TopPSampler(TopPSamplerConfig(temperature=1.0, p=0.5)), [0.0, 0.0, 3 / 7, 4 / 7]),
])
def test_sample_frequencies_match_the_filtered_distribution(sampler, expected):
    logits = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(40_000, 4)
    draws = sampler.sample(logits, generator=torch.Generator().manual_seed(0))
    assert draws.shape == (40_000,) and draws.dtype == torch.long
    freq = torch.bincount(draws, minlength=4).float() / draws.numel()
    assert torch.allclose(freq, torch.tensor(expected), atol=0.01)
    assert all(freq[i] == 0 for i, e in enumerate(expected) if e == 0)


def test_masked_tokens_are_never_drawn_at_either_end_of_the_vocabulary():
    """The CDF inversion's edges: a uniform of exactly 1 lands on the last token with mass, never on
    −inf tokens after it; zero-mass tokens before the first token with mass are never drawn."""
    inf = float("-inf")
    logits = torch.tensor([[inf, inf, 0.0, inf], [0.0, inf, inf, inf], [inf, 0.0, inf, 0.0]]).repeat(2_000, 1)
    draws = TemperatureSampler(TemperatureSamplerConfig(temperature=1.0)).sample(
        logits, generator=torch.Generator().manual_seed(3)).view(2_000, 3)
    assert (draws[:, 0] == 2).all() and (draws[:, 1] == 0).all()
    assert set(draws[:, 2].tolist()) == {1, 3}


def test_a_large_vocabulary_keeps_the_mass_of_its_small_tokens():
    """49,152 entries (SmolLM2's vocabulary): one token of mass 0.5, the rest sharing 0.5 (1e-5
    each) — the cumulative sums must not swallow the small ones."""
    v = 49_152
    probs = torch.full((v,), 0.5 / (v - 1))
    probs[1_000] = 0.5
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.0))
    generator = torch.Generator().manual_seed(0)
    # 20 batches of 1,000 rows: one batch of 20,000 would hold 12 GB of probabilities and sums.
    draws = torch.cat([sampler.sample(probs.log().expand(1_000, v), generator=generator)
                       for _ in range(20)])
    assert abs((draws == 1_000).float().mean().item() - 0.5) < 0.015
    assert abs((draws < 1_000).float().mean().item() - 0.5 * 1_000 / (v - 1)) < 0.005


def test_seeded_generator_makes_sampling_reproducible():
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=0.7))
    logits = torch.randn(8, 30, generator=torch.Generator().manual_seed(1))
    first = sampler.sample(logits, generator=torch.Generator().manual_seed(5))
    second = sampler.sample(logits, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, second)


@pytest.mark.parametrize("build, message", [
    (lambda: TemperatureSampler(TemperatureSamplerConfig(temperature=0.0)),
     "sampler.temperature must be a finite number > 0, got 0.0"),
    (lambda: TopKSampler(TopKSamplerConfig(temperature=-1.0)),
     "sampler.temperature must be a finite number > 0, got -1.0"),
    (lambda: TopKSampler(TopKSamplerConfig(k=0)), "sampler.k must be an integer >= 1, got 0"),
    (lambda: TopPSampler(TopPSamplerConfig(p=1.5)), "sampler.p must be in (0, 1], got 1.5"),
    (lambda: TopPSampler(TopPSamplerConfig(p=0.0)), "sampler.p must be in (0, 1], got 0.0"),
])
def test_invalid_config_names_the_key(build, message):
    with pytest.raises(ValueError) as info:
        build()
    assert str(info.value) == message


def test_registry_builds_each_sampler_and_they_satisfy_the_protocol():
    top_p = registry.build_by_name("samplers", "top_p", p=0.5, temperature=1.0)
    assert isinstance(top_p, TopPSampler) and top_p.p == 0.5 and top_p.temperature == 1.0
    for name, cls in [("temperature", TemperatureSampler), ("top_k", TopKSampler), ("top_p", TopPSampler)]:
        sampler = registry.build_by_name("samplers", name)
        assert type(sampler) is cls and isinstance(sampler, Sampler)
        assert sampler.temperature == 0.7


def test_warp_rejects_logits_with_a_time_axis():
    with pytest.raises(ValueError, match=r"\(batch, vocab\), got \(2, 3, 4\)"):
        TemperatureSampler(TemperatureSamplerConfig()).warp(torch.zeros(2, 3, 4))


def test_the_benchmarks_sampler_never_draws_eos():
    from rlhf_pl.plugins.samplers import NoEOSSampler

    sampler = NoEOSSampler(1.0, eos_token_id=2)
    logits = torch.zeros(64, 5)
    logits[:, 2] = 10.0  # EOS would win almost always
    drawn = sampler.sample(logits, generator=torch.Generator().manual_seed(0))
    assert not (drawn == 2).any() and sampler.warp(logits)[:, 2].isneginf().all()
