"""Generation backends (rlhf_pl.generation): ``static`` samples what ``hf`` samples (same seed: same
tokens, masks and ``ended`` in fp32; logprobs within bf16 rounding under autocast), its compiled
step equals the eager one and does not recompile for another prompt length in the same cache
bucket, it never samples from stale weights (optimizer steps, load_state_dict, LoRA), ``on_token``
streams and cancels as in ``hf``, and the backend is chosen by the config.

The compiled cases share few graphs (inductor compiles each in ~10-30 s on this CPU, most of it in
the C++ compiler): with inductor, one fp32 graph of 2 rows × 32 cache columns for the plain tiny
Llama and one under bf16 autocast; the LoRA cases (adapters on, adapters off: two graphs) compile
with ``backend=aot_eager`` — the same dynamo capture, guards and parameters-as-graph-inputs that
decide whether updated weights are seen, without inductor's code generation."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import MissingConfigException
from tiny_models import EOS, PAD, VOCAB
from tiny_models import tiny_causal_lm as _tiny
from torch import nn
from torch._dynamo.utils import counters
from transformers import MistralConfig, MistralForCausalLM
from transformers.cache_utils import DynamicCache

from rlhf_pl import registry
from rlhf_pl.config import register_configs, validate_config
from rlhf_pl.data.collate import pad_left
from rlhf_pl.errors import ConfigError
from rlhf_pl.generation import GenerationError, HFGeneration, StaticGeneration, cache_length, static_cache_from
from rlhf_pl.models.adapters import add_lora_, reference_from_policy
from rlhf_pl.models.generate import GreedySampler
from rlhf_pl.plugins.samplers import TemperatureSampler
from rlhf_pl.plugins.specs import HFGenerationConfig, StaticGenerationConfig, TemperatureSamplerConfig
from rlhf_pl.runtime import weights_cast_once
from rlhf_pl.sampling import build_backend, sample, sample_texts

PROMPTS = [[5, 9, 13, 7, 30], [11, 4, 8, 21, 17, 33, 6, 40], [3, 3]]  # ragged: left padding 3, 0 and 6
HF = HFGeneration(HFGenerationConfig())
EAGER = StaticGeneration(StaticGenerationConfig(compile=False, cache_bucket=16))


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def model(request):
    return _tiny(request.param)


class Recording(TemperatureSampler):
    """Temperature sampling, remembering every logits row it was given."""

    def __init__(self, temperature: float = 1.0):
        super().__init__(TemperatureSamplerConfig(temperature=temperature))
        self.seen: list[torch.Tensor] = []

    def sample(self, logits, generator=None):
        self.seen.append(logits.clone())
        return super().sample(logits, generator)


class EOSAfter(TemperatureSampler):
    """Temperature sampling, but row r draws EOS at step ``ends[r]`` (None: never forced): EOS early."""

    def __init__(self, ends: list):
        super().__init__(TemperatureSamplerConfig(temperature=1.0))
        self.ends, self.step = ends, 0

    def sample(self, logits, generator=None):
        tokens = super().sample(logits.index_fill(-1, torch.tensor([EOS]), float("-inf")), generator)
        for row, end in enumerate(self.ends):
            if end == self.step:
                tokens[row] = EOS
        self.step += 1
        return tokens


def run(backend, model, prompts, sampler, n, *, seed=0, num_samples=1, on_token=None):
    ids, mask = pad_left(prompts, PAD)
    return backend.generate(model, ids, mask, sampler, n, EOS, PAD, torch.Generator().manual_seed(seed),
                            num_samples=num_samples, on_token=on_token)


def assert_same(a, b):
    assert a.prompt_length == b.prompt_length
    for field in ("sequences", "response", "response_mask", "ended", "attention_mask"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


# --- static samples what hf samples -------------------------------------------------------------------


@pytest.mark.parametrize("num_samples", [1, 3])
def test_static_samples_the_same_tokens_masks_and_ends_as_hf_in_fp32(model, num_samples, one_thread):
    """Same seed, temperature 1, ragged prompts; rows 0 and 4 are forced to EOS early (steps 2 and 0),
    the others run to max_new_tokens. Row i·K + j is sample j of prompt i in both."""
    rows = len(PROMPTS) * num_samples
    ends = [2, None, None, None, 0, None, None, None, None][:rows]
    hf = run(HF, model, PROMPTS, EOSAfter(ends), 7, seed=3, num_samples=num_samples)
    static = run(EAGER, model, PROMPTS, EOSAfter(ends), 7, seed=3, num_samples=num_samples)
    assert_same(hf, static)
    assert hf.response.shape == (rows, 7) and hf.ended.tolist() == [e is not None for e in ends]
    assert hf.response_mask[0].tolist() == [1, 1, 1, 0, 0, 0, 0] and hf.response[0, 3:].tolist() == [PAD] * 4
    if num_samples == 3:  # the 3 samples of a prompt differ: they were drawn, not copied
        assert len({tuple(r) for r in hf.response[3:6].tolist()}) == 3


def test_static_stops_early_when_every_row_ended(model, one_thread):
    out = run(EAGER, model, PROMPTS, EOSAfter([1, 0, 2]), 10)
    assert out.response.shape == (3, 3) and out.ended.all()
    assert out.response_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1]]
    assert_same(out, run(HF, model, PROMPTS, EOSAfter([1, 0, 2]), 10))


def test_static_logits_equal_hf_logits_at_every_step_in_fp32(model, one_thread):
    """The static cache attends over T = 16 columns (the unused ones masked) instead of p + s: the
    same function of the tokens, equal within float32 rounding."""
    hf_sampler, static_sampler = Recording(), Recording()
    run(HF, model, PROMPTS, hf_sampler, 6, seed=1, num_samples=2)
    run(EAGER, model, PROMPTS, static_sampler, 6, seed=1, num_samples=2)
    assert len(hf_sampler.seen) == len(static_sampler.seen) == 6
    assert torch.equal(hf_sampler.seen[0], static_sampler.seen[0])  # the same eager prefill
    for a, b in zip(hf_sampler.seen, static_sampler.seen):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_cache_length_rounds_up_to_the_bucket():
    assert [cache_length(p, 32, 64) for p in (1, 32, 33, 96, 97)] == [64, 64, 128, 128, 192]
    assert cache_length(5, 3, 1) == 8


# --- on_token: streaming and cancellation -------------------------------------------------------------


def test_on_token_sees_every_step_and_cancelled_rows_end_as_in_hf(model, one_thread):
    """The streaming hook gets each step's tokens and the rows ended so far; returning a row ends it
    (the app's worker cancels requests this way): its later tokens are padding and masked out."""

    def recorder(calls):
        def on_token(tokens, ended):
            calls.append((tokens.tolist(), ended.tolist()))
            stop = torch.zeros_like(ended)
            if len(calls) == 2:
                stop[1] = True  # cancel row 1 after its second token
            if len(calls) == 3:
                stop[:] = True  # then everyone
            return stop
        return on_token

    hf_calls, static_calls = [], []
    hf = run(HF, model, PROMPTS, EOSAfter([None] * 3), 8, on_token=recorder(hf_calls))
    static = run(EAGER, model, PROMPTS, EOSAfter([None] * 3), 8, on_token=recorder(static_calls))
    assert static_calls == hf_calls and len(hf_calls) == 3
    assert_same(hf, static)
    assert static.response_mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert static.response[1, 2].item() == PAD and static.ended.all()
    assert static_calls[2][1] == [False, True, False]  # row 1 ended before the third step's tokens


# --- unsupported models -------------------------------------------------------------------------------


class TupleCache(nn.Module):
    """Not a transformers model: a wrapper around one."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs):
        return self.inner(**kwargs)


def test_a_model_without_static_cache_support_is_refused_naming_it_and_generation_hf(one_thread):
    with pytest.raises(GenerationError, match=r"TupleCache does not: use generation=hf"):
        run(EAGER, TupleCache(_tiny("llama")), PROMPTS, GreedySampler(), 3)
    torch.manual_seed(0)
    mistral = MistralForCausalLM(MistralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=4, eos_token_id=EOS, pad_token_id=PAD)).eval()
    with pytest.raises(GenerationError, match=r"MistralForCausalLM has sliding_attention layers: use generation=hf"):
        run(EAGER, mistral, PROMPTS, GreedySampler(), 3)


# --- compiled -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled():
    """One inductor-compiled backend for the module; dynamo's state is reset first so the graph counts
    are this file's."""
    torch._dynamo.reset()
    return StaticGeneration(StaticGenerationConfig(compile=True, cache_bucket=32))


@pytest.fixture(scope="module")
def captured():
    """Compiled with aot_eager: dynamo's graph capture and guards without inductor's code generation."""
    return StaticGeneration(StaticGenerationConfig(compile=True, backend="aot_eager", cache_bucket=32))


@pytest.fixture(scope="module")
def llama(tiny_model):
    """A private copy of the tiny Llama (the compiled tests train it in place)."""
    return copy.deepcopy(tiny_model).eval()


def greedy(backend, model, prompts, n=8):
    ids, mask = pad_left(prompts, PAD)
    return backend.generate(model, ids, mask, GreedySampler(), n, EOS, PAD).response


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


PAIR_A = [[5, 9, 13, 7, 30, 8], [11, 4]]  # p = 6: 6 + 8 new tokens -> T = 32
PAIR_B = [[5, 9, 13, 7, 30, 8, 20, 21, 22, 23, 24, 25, 26], [11, 4]]  # p = 13: still T = 32


def test_compiled_equals_eager_and_another_prompt_length_in_the_bucket_does_not_recompile(compiled, llama,
                                                                                          one_thread):
    ids, mask = pad_left(PAIR_A, PAD)
    eager_sampler, compiled_sampler = Recording(), Recording()
    eager = EAGER.generate(llama, ids, mask, eager_sampler, 8, EOS, PAD, torch.Generator().manual_seed(2))
    before = graphs()
    out = compiled.generate(llama, ids, mask, compiled_sampler, 8, EOS, PAD, torch.Generator().manual_seed(2))
    assert graphs() == before + 1  # the first call compiles the decode step
    assert_same(eager, out)
    for a, b in zip(eager_sampler.seen, compiled_sampler.seen, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
    assert torch.equal(greedy(compiled, llama, PAIR_B), greedy(HF, llama, PAIR_B))
    assert cache_length(13, 8, 32) == cache_length(6, 8, 32) == 32
    assert graphs() == before + 1  # p = 13 reused p = 6's graph: same rows, same cache length


def _train(model: nn.Module, params, steps: int = 4) -> None:
    """A few SGD steps teaching ``model`` to continue every prompt with token 7 (greedy output changes)."""
    optimizer = torch.optim.SGD(params, lr=0.5)
    ids, _ = pad_left(PAIR_A, PAD)
    sequences = torch.cat([ids, torch.full((2, 8), 7)], dim=1)
    model.train()
    for _ in range(steps):
        model(input_ids=sequences, labels=sequences).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_static_never_samples_stale_weights_after_an_optimizer_step_or_load_state_dict(compiled, llama,
                                                                                      one_thread):
    original = copy.deepcopy(llama.state_dict())
    before = greedy(compiled, llama, PAIR_A)
    assert torch.equal(before, greedy(HF, llama, PAIR_A))
    _train(llama, llama.parameters())
    after = greedy(compiled, llama, PAIR_A)
    assert not torch.equal(after, before), "the update must change the greedy tokens for this test to mean anything"
    assert torch.equal(after, greedy(HF, llama, PAIR_A))  # the updated weights, not the compiled-in ones
    llama.load_state_dict(original)
    assert torch.equal(greedy(compiled, llama, PAIR_A), before)


def test_static_never_samples_stale_weights_with_lora_and_its_disabled_reference(captured, tiny_model, one_thread):
    """LoRA's B starts at 0 (the adapted model is the base); after training the adapters the policy
    samples the updated model, and PPO's reference (the policy with its adapters disabled) the base.
    Adding, training and disabling adapters after the first compiled call: dynamo's guards see the
    changed modules and flags, its graph inputs the trained adapter weights."""
    policy = copy.deepcopy(tiny_model).eval()
    base = greedy(HF, tiny_model, PAIR_A)
    assert torch.equal(greedy(captured, policy, PAIR_A), base)  # compiled for the plain model first
    add_lora_(policy, r=4, alpha=8.0, dropout=0.0, target_modules=["all-linear"])
    assert torch.equal(greedy(captured, policy, PAIR_A), base)
    _train(policy, [p for p in policy.parameters() if p.requires_grad])
    trained = greedy(captured, policy, PAIR_A)
    assert not torch.equal(trained, base)
    assert torch.equal(trained, greedy(HF, policy, PAIR_A))
    reference = reference_from_policy(policy)
    assert torch.equal(greedy(captured, reference, PAIR_A), base)
    assert torch.equal(greedy(captured, policy, PAIR_A), trained)  # adapters on again


def test_compiled_grouped_query_attention_samples_what_hf_samples(captured, one_thread):
    """The test Llama has 2 key/value heads for 4 query heads: the compiled step runs SDPA with
    enable_gqa (hf's eager step folds the query heads instead); same seed, K = 3: the same tokens."""
    llama = _tiny("llama")
    assert llama.config.num_key_value_heads < llama.config.num_attention_heads
    ends = [None, 1, None, None, None, 3, None, None, None]
    hf = run(HF, llama, PROMPTS, EOSAfter(ends), 6, seed=5, num_samples=3)
    assert_same(hf, run(captured, llama, PROMPTS, EOSAfter(ends), 6, seed=5, num_samples=3))


def bf16_ulp(x: float) -> float:
    """Spacing of bfloat16 numbers (8 significant bits) at magnitude |x|."""
    return 2.0 ** (math.floor(math.log2(abs(x))) - 7)


def test_under_bf16_autocast_static_logprobs_agree_with_hf_within_bf16_rounding(compiled, tiny_model, tiny_tokenizer,
                                                                                one_thread):
    """bf16-mixed as the stages sample (autocast, weights cast once): the compiled static step and hf
    run different kernels (fused casts, attention over 32 columns), so their bf16 logits may differ
    by a rounding step. Tolerance: 4 bf16 ulps at the largest |logit|, i.e. a logit moved by up to
    2 ulps of its magnitude, and a logprob (logit − logsumexp) by up to twice that. Compared over the
    steps before the sampled tokens first differ (with the same seed they usually never do)."""
    prompts = [tiny_tokenizer.encode("hello there friend, how"), tiny_tokenizer.encode("what is")]
    ids, mask = pad_left(prompts, tiny_tokenizer.pad_token_id)
    samplers = {}
    outs = {}
    for name, backend in (("hf", HF), ("static", compiled)):
        samplers[name] = Recording()
        with torch.autocast("cpu", dtype=torch.bfloat16), weights_cast_once(torch.device("cpu")):
            outs[name] = backend.generate(tiny_model, ids, mask, samplers[name], 12, tiny_tokenizer.eos_token_id,
                                          tiny_tokenizer.pad_token_id, torch.Generator().manual_seed(1))
    hf, static = outs["hf"].response, outs["static"].response
    same = int((hf == static).all(0).long().cumprod(0).sum())  # steps before the first differing token
    assert same >= 4
    scale = max(x.abs().max().item() for x in samplers["hf"].seen)
    tolerance = 4 * bf16_ulp(scale)
    for step in range(same):
        a, b = (torch.log_softmax(samplers[k].seen[step], -1) for k in ("hf", "static"))
        tokens = hf[:, step:step + 1]
        assert (a.gather(-1, tokens) - b.gather(-1, tokens)).abs().max().item() <= tolerance, step


# --- through sampling and the config ------------------------------------------------------------------


def test_sample_and_sample_texts_pass_the_backend_through(tiny_model, tiny_tokenizer, one_thread):
    prompts = [tiny_tokenizer.encode("hello there"), tiny_tokenizer.encode("hi")]
    ids, mask = pad_left(prompts, tiny_tokenizer.pad_token_id)
    sampler = TemperatureSampler(TemperatureSamplerConfig(temperature=1.0))
    a = sample(tiny_model, ids, mask, sampler, 6, tiny_tokenizer, generator=torch.Generator().manual_seed(4),
               num_samples=2)
    b = sample(tiny_model, ids, mask, sampler, 6, tiny_tokenizer, generator=torch.Generator().manual_seed(4),
               num_samples=2, backend=EAGER)
    assert torch.equal(a.sequences, b.sequences) and torch.equal(a.mask, b.mask)

    class Counting(StaticGeneration):
        calls = 0

        def generate(self, *args, **kwargs):
            Counting.calls += 1
            return super().generate(*args, **kwargs)

    counting = Counting(StaticGenerationConfig(compile=False))
    texts = sample_texts(tiny_model, tiny_tokenizer, prompts, 2, GreedySampler(), 5, batch_size=2, backend=counting)
    assert Counting.calls == 2 and [len(s) for s in texts] == [2, 2]  # one prompt (2 rows) per batch
    assert texts == sample_texts(tiny_model, tiny_tokenizer, prompts, 2, GreedySampler(), 5, batch_size=2)


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_composed_generation_static_builds_the_backend_and_hf_is_the_default():
    cfg = compose_cfg("+stage=ppo", "generation=static", "generation.cache_bucket=48", "generation.compile=false")
    validate_config(cfg)
    backend = build_backend(cfg)
    assert isinstance(backend, StaticGeneration)
    assert (backend.config.cache_bucket, backend.config.compile, backend.config.mode) == (48, False, "default")
    assert isinstance(build_backend(compose_cfg("+stage=ppo")), HFGeneration)


def test_unknown_generation_lists_the_installed_ones_and_bad_settings_name_the_key():
    with pytest.raises(MissingConfigException, match=r"generation/nosuch(.|\n)*hf(.|\n)*static"):
        compose_cfg("+stage=ppo", "generation=nosuch")
    with pytest.raises(registry.PluginError, match="unknown generation plugin 'nosuch'; installed: hf, static"):
        registry.get_spec("generation", "nosuch")
    with pytest.raises(ConfigError, match=r"generation\.mode='fast'.*default, reduce-overhead"):
        validate_config(compose_cfg("+stage=ppo", "generation=static", "generation.mode=fast"))
    with pytest.raises(ConfigError, match=r"generation\.cache_bucket=0: must be an integer >= 1"):
        StaticGenerationConfig(cache_bucket=0)
    with pytest.raises(ConfigError, match=r"generation\.mode='max-autotune' is a mode of the inductor backend"):
        validate_config(compose_cfg("+stage=ppo", "generation=static", "generation.backend=aot_eager",
                                    "generation.mode=max-autotune"))


def test_one_graph_past_the_recompile_limit_is_an_error_not_eager_code(tiny_model, one_thread):
    """Last in the file: it resets dynamo (the limit counts every decode graph of the process)."""
    torch._dynamo.reset()
    backend = StaticGeneration(StaticGenerationConfig(backend="aot_eager", recompile_limit=1, cache_bucket=16))
    assert greedy(backend, tiny_model, [[5, 6, 7]], 3).shape == (1, 3)  # graph 1: 1 row
    with pytest.raises(GenerationError, match=r"more than generation\.recompile_limit=1 compiled decode graphs"):
        greedy(backend, tiny_model, [[5, 6, 7]] * 2, 3)  # 2 rows: a second graph
    torch._dynamo.reset()


def test_under_autocast_the_static_cache_holds_what_the_attention_reads():
    """Under bf16 autocast the float32 keys (and bf16 values) of the prefill are stored in bfloat16 —
    the values SDPA casts them to at every step — and repeated K times; outside autocast, as they are."""
    prefill = DynamicCache()
    keys, values = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4).bfloat16()
    prefill.update(keys, values.float(), 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = static_cache_from(prefill, num_samples=2, length=8).layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16 and layer.keys.shape == (4, 3, 8, 4)
    assert torch.equal(layer.keys[:, :, :5], keys.bfloat16().repeat_interleave(2, dim=0))
    assert torch.equal(layer.values[:, :, :5], values.repeat_interleave(2, dim=0))
    assert static_cache_from(prefill, num_samples=1, length=8).layers[0].keys.dtype == torch.float32
