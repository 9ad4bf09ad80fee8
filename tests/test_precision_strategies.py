"""Precision and memory strategies (issue 5) on CPU with the tiny Llama.

Every strategy bitsandbytes supports on this CPU is exercised through the real SFT and RM stages
(``run_stage`` with the composed command-line config): the run completes, only the trainable
tensors change (frozen ones — incl. packed NF4 bytes — stay bit-identical), the Lightning
checkpoint reloads strictly and the exported model gives the same outputs. int8-frozen and
nf4-frozen have no frozen model in sft/rm (refused there, before loading); their frozen models are
checked in a PPO-shaped update. Tests that need CUDA are marked ``gpu`` and skipped without one.
"""
from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from rlhf_pl import registry
from rlhf_pl.config import ModelConfig, OptimConfig, TinyModelConfig
from rlhf_pl.models import adapters
from rlhf_pl.models.generate import response_logprobs
from rlhf_pl.models.loading import load_model_and_tokenizer, save_pretrained_atomic
from rlhf_pl.models.reward import RewardModel
from rlhf_pl.precision import PrecisionError, PrecisionStrategy, QLoRA

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
ALL = ("fp32", "bf16-mixed", "fp16-mixed", "int8-frozen", "nf4-frozen", "lora", "qlora")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (a busy 2-core machine makes 2 threads crawl)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def strategy(name: str, **overrides) -> PrecisionStrategy:
    s = registry.build_by_name("precision", name, **overrides)
    s.check("cpu", None)
    return s


def tiny(seed: int = 0):
    model, tok, _ = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(seed=seed)))
    return model.train(), tok


def ids(n: int = 3, t: int = 11, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 500, (n, t), generator=torch.Generator().manual_seed(seed))


def perturb_trainable(model: nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    """Give the (zero-initialised) LoRA B matrices and heads non-zero values, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=gen))


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    from rlhf_pl.config import register_configs

    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


# --- registry, config, the promised errors -------------------------------------------------------------


def test_every_strategy_is_installed_and_satisfies_the_protocol():
    values = {"fp32": "32-true", "bf16-mixed": "bf16-mixed", "fp16-mixed": "16-mixed", "int8-frozen": "32-true",
              "nf4-frozen": "32-true", "lora": "32-true", "qlora": "32-true"}
    for name in ALL:
        s = registry.build_by_name("precision", name)
        assert isinstance(s, PrecisionStrategy) and s.name == name and s.trainer_precision == values[name]
        assert s.shares_reference == (name in ("lora", "qlora"))
    assert registry.build_by_name("precision", "qlora", compute="bf16-mixed").trainer_precision == "bf16-mixed"


@pytest.mark.parametrize("capabilities, chosen", [
    ({"avx512_bf16": True, "amx_bf16": False}, "bf16-mixed"),
    ({"avx512_bf16": False, "amx_bf16": True}, "bf16-mixed"),
    ({"avx512_bf16": False, "amx_bf16": False}, "fp32"),
])
def test_auto_is_the_default_and_picks_bf16_only_where_the_cpu_has_native_bf16(monkeypatch, capabilities, chosen):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    cfg = _compose("+stage=sft")
    s = registry.build("precision", cfg.precision)
    assert s.name == "auto"
    with pytest.raises(PrecisionError, match="not been resolved yet"):
        _ = s.chosen
    s.check("cpu", None, stage="sft")
    assert s.chosen == chosen and s.trainer_precision == {"bf16-mixed": "bf16-mixed", "fp32": "32-true"}[chosen]
    assert s.describe().startswith(f"{chosen} (CPU with" if chosen != "fp32"
                                   else "fp32 (CPU without avx512_bf16 or amx_bf16)")
    with pytest.raises(PrecisionError,
                       match=rf"trainer.precision=16-mixed disagrees with precision=auto \(here {chosen}\)"):
        registry.build("precision", cfg.precision).check("cpu", "16-mixed")
    assert registry.build("precision", _compose("+stage=sft", "experiment=quick").precision).name == "fp32"


def test_strategy_settings_compose_and_are_type_checked():
    cfg = _compose("+stage=sft", "model=tiny", "precision=qlora", "precision.r=4",
                   "precision.target_modules=[q_proj,v_proj]", "sft.optim.optimizer=adamw8bit")
    s = registry.build("precision", cfg.precision)
    assert isinstance(s, QLoRA) and s.config.r == 4 and list(s.config.target_modules) == ["q_proj", "v_proj"]
    assert cfg.sft.optim.optimizer == "adamw8bit"
    with pytest.raises(Exception, match="rank"):
        _compose("+stage=sft", "precision=lora", "precision.rank=4")
    with pytest.raises(PrecisionError, match=r"precision.compute='fp8' \(precision=lora\); "
                                             r"choose one of: fp32, bf16-mixed, fp16-mixed"):
        registry.build_by_name("precision", "lora", compute="fp8")
    with pytest.raises(PrecisionError, match=r"precision.r=0 \(precision=qlora\); must be >= 1"):
        registry.build_by_name("precision", "qlora", r=0)


def _run_with_loaders_trapped(monkeypatch, stage: str, *overrides: str) -> BaseException:
    """Validate the composed config and run the stage as run_stage does, with the model loader
    booby-trapped; the exception."""
    from rlhf_pl.config import validate_config
    from rlhf_pl.outputs import Inputs
    from rlhf_pl.stages import rm, sft, stage_module

    def trap(*a, **k):
        raise AssertionError("a model was loaded")

    for mod in (sft, rm):
        monkeypatch.setattr(mod, "load_model_and_tokenizer", trap)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = _compose(f"+stage={stage}", "experiment=quick", "paths.output_root=/nonexistent/never-written", *overrides)
    with pytest.raises(Exception) as info:
        validate_config(cfg)
        module = stage_module(stage)
        module.run(cfg, Path("/nonexistent/never-written"), Inputs(cfg, module.INPUTS))
    return info.value


def _refused_before_loading(monkeypatch, stage: str, *overrides: str) -> str:
    error = _run_with_loaders_trapped(monkeypatch, stage, *overrides)
    assert isinstance(error, (PrecisionError, ValueError)), repr(error)
    return str(error)


@pytest.mark.parametrize("stage, name, bits", [("sft", "int8-frozen", "8 bits"), ("rm", "nf4-frozen", "4 bits")])
def test_quantised_frozen_only_strategies_refuse_stages_that_train_their_only_model(monkeypatch, stage, name, bits):
    message = _refused_before_loading(monkeypatch, stage, f"precision={name}")
    assert message == (
        f"precision={name} holds only frozen models in {bits} (PPO's reference and reward model), and stage {stage} "
        f"has none: it fully fine-tunes its model, whose weights cannot train in {bits}. Use precision=qlora (4-bit "
        "NF4 base + LoRA adapters) or precision=lora to save memory while training, or precision=fp32 / bf16-mixed"
    )


def test_fp16_on_cpu_is_refused_for_plain_and_adapter_strategies(monkeypatch):
    assert _refused_before_loading(monkeypatch, "sft", "precision=fp16-mixed") == (
        "precision=fp16-mixed needs a CUDA GPU; on CPU use precision=bf16-mixed or precision=fp32")
    assert _refused_before_loading(monkeypatch, "rm", "precision=qlora", "precision.compute=fp16-mixed") == (
        "precision=qlora with precision.compute=fp16-mixed needs a CUDA GPU (float16 autocast); on CPU use "
        "precision.compute=bf16-mixed or precision.compute=fp32")


def test_conflicting_trainer_precision_and_unknown_optimizer_are_refused(monkeypatch):
    message = _refused_before_loading(monkeypatch, "sft", "precision=lora", "trainer.precision=bf16-mixed")
    assert message.startswith("trainer.precision=bf16-mixed disagrees with precision=lora "
                              "(Lightning precision 32-true); drop trainer.precision")
    agreeing = _run_with_loaders_trapped(monkeypatch, "sft", "precision=lora", "precision.compute=bf16-mixed",
                                         "trainer.precision=bf16-mixed")
    assert str(agreeing) == "a model was loaded"  # an agreeing trainer.precision passes the checks
    assert _refused_before_loading(monkeypatch, "sft", "sft.optim.optimizer=sgd") == (
        "sft.optim.optimizer='sgd': choose one of: adamw, adamw8bit, paged_adamw8bit")


def test_bitsandbytes_strategies_refuse_accelerators_it_has_no_kernels_for():
    for name in ("int8-frozen", "nf4-frozen", "qlora"):
        with pytest.raises(PrecisionError, match=rf"precision={name} quantises with bitsandbytes, which has no "
                                                 r"kernels for accelerator=mps .*use precision=lora"):
            registry.build_by_name("precision", name).check("mps", None, stage="ppo", frozen=("reference",))
    registry.build_by_name("precision", "lora").check("mps", None, stage="sft", frozen=())  # no bitsandbytes: fine
    registry.build_by_name("precision", "int8-frozen").check("cpu", None, stage="ppo",
                                                             frozen=("reference", "reward model"))


# --- LoRA mechanics ----------------------------------------------------------------------------------


def test_lora_trainable_parameter_count_is_r_times_in_plus_out():
    c, r = TinyModelConfig(), 8
    kv = c.hidden_size  # tiny: num_key_value_heads == num_heads
    per_layer = {"q_proj": (c.hidden_size, c.hidden_size), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
                 "o_proj": (c.hidden_size, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
                 "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}
    expected = c.num_layers * sum(r * (i + o) for i, o in per_layer.values())
    assert expected == 2 * 8 * (4 * 128 + 3 * 192) == 17408

    for name in ("lora", "qlora"):
        model = strategy(name).prepare_trainable(tiny()[0])
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        assert adapters.lora_parameter_count(model) == expected
        assert model.lm_head.weight.requires_grad is False and type(model).__name__ == "LlamaForCausalLM"

    some = strategy("lora", r=4, target_modules=["q_proj", "v_proj"]).prepare_trainable(tiny()[0])
    assert (sum(p.numel() for p in some.parameters() if p.requires_grad)
            == c.num_layers * 4 * (2 * c.hidden_size + c.hidden_size + kv))

    model, tok = tiny()
    rm = strategy("qlora").prepare_trainable(RewardModel.from_causal_lm(model, "linear", tok))
    head = sum(p.numel() for p in rm.head.parameters())
    assert sum(p.numel() for p in rm.parameters() if p.requires_grad) == expected + head  # adapters + the whole head
    assert all(p.requires_grad for p in rm.head.parameters())


def test_unknown_target_module_names_the_available_ones():
    with pytest.raises(ValueError, match=r"\['qkv'\] not found in LlamaForCausalLM; its linear layers are: down_proj, "
                                         r"gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj"):
        strategy("lora", target_modules=["qkv"]).prepare_trainable(tiny()[0])


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merged_export_equals_adapter_model_and_reloads(tmp_path, name):
    s = strategy(name)
    model, tok = tiny()
    model = s.prepare_trainable(model)
    perturb_trainable(model)
    x = ids()
    with_adapters = logits(model, x)
    exported = s.export(model)
    assert not any(adapters.is_quantized(m) for m in exported.modules()) and not adapters.lora_layers(exported)
    torch.testing.assert_close(logits(exported, x), with_adapters, atol=2e-5, rtol=0)
    out = save_pretrained_atomic(exported, tok, tmp_path / "model")
    assert not (out / "adapter_config.json").exists()
    reloaded, _, _ = load_model_and_tokenizer(ModelConfig(name="x", name_or_path=str(out)))
    assert torch.equal(logits(reloaded, x), logits(exported, x))


def test_merge_on_export_false_writes_the_adapter_only(tmp_path):
    s = strategy("lora", merge_on_export=False)
    model, tok = tiny()
    model = s.prepare_trainable(model)
    assert s.export(model) is model and adapters.lora_layers(model)
    out = save_pretrained_atomic(model, tok, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_reference_is_the_policy_with_adapters_disabled(name):
    """After real optimisation steps, the reference's logprobs equal the untouched base model's."""
    s = strategy(name)
    policy = s.prepare_trainable(tiny()[0])
    untouched = s.prepare_trainable(tiny()[0])  # same base held the same way (NF4 for qlora), adapters still zero
    x = ids(4, 14)
    mask = torch.ones_like(x)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        policy(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    reference = s.reference_from_policy(policy)
    assert not isinstance(reference, nn.Module) and reference.config is policy.config
    assert "logits_to_keep" in __import__("inspect").signature(reference.forward).parameters
    ref_lp = response_logprobs(reference, x, mask, 6, temperature=0.7)
    with torch.no_grad():
        base_lp = response_logprobs(untouched, x, mask, 6, temperature=0.7)
        policy_lp = response_logprobs(policy, x, mask, 6, temperature=0.7)
    assert torch.equal(ref_lp, base_lp)
    assert (policy_lp - base_lp).abs().max() > 1e-3  # the policy did move
    assert policy.training and all(p.requires_grad for n, p in policy.named_parameters() if "lora_" in n)
    with pytest.raises(PrecisionError, match="precision=fp32 keeps no adapters"):
        strategy("fp32").reference_from_policy(policy)


def test_qlora_gradients_equal_a_float_model_with_the_dequantized_weights_after_an_eval_pass():
    """The AVX512-BF16 repacking trap: an eval/no-grad pass (rollout, validation) must not change
    what training computes. Reference: a float32 model holding exactly the dequantized weights."""
    s = strategy("qlora")
    q = s.prepare_trainable(tiny()[0])
    perturb_trainable(q)
    x = ids(2, 9)
    q.eval()
    logits(q, x)  # where bitsandbytes would repack the NF4 weights for its bf16 inference kernel
    q.train()
    f = tiny()[0]
    named = dict(f.named_modules())
    for name, layer in q.named_modules():
        if adapters.is_quantized(layer):
            named[name.replace(".base_layer", "")].weight.data.copy_(adapters.float_weight(layer))
    f = strategy("lora").prepare_trainable(f)
    adapters.load_trainable_state_dict(f, adapters.trainable_state_dict(q))
    q(input_ids=x, labels=x).loss.backward()
    f(input_ids=x, labels=x).loss.backward()
    grads_q = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    grads_f = {n: p.grad for n, p in f.named_parameters() if p.requires_grad}
    assert grads_q.keys() == grads_f.keys() and all(g is not None for g in grads_q.values())
    for n in grads_q:
        torch.testing.assert_close(grads_q[n], grads_f[n], atol=1e-5, rtol=1e-4)


def test_qlora_state_dict_round_trips_strictly_including_the_quantisation_statistics():
    s = strategy("qlora")
    source = s.prepare_trainable(tiny(seed=1)[0])  # a different base: its NF4 statistics differ
    perturb_trainable(source)
    target = s.prepare_trainable(tiny(seed=0)[0])
    target.load_state_dict(source.state_dict())  # strict: Linear4bit's absmax/quant_map keys are consumed
    x = ids()
    assert torch.equal(logits(target, x), logits(source, x))


# --- frozen models -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, kind", [("int8-frozen", "int8"), ("nf4-frozen", "nf4"), ("qlora", "nf4")])
def test_frozen_models_are_quantised_like_from_pretrained_and_smaller(tmp_path, name, kind):
    from transformers import AutoModelForCausalLM

    s = strategy(name)
    model, tok = tiny()
    float_logits, float_bytes = logits(model, ids()), _bytes(model)
    frozen = s.prepare_frozen(model)
    layers = [m for m in frozen.modules() if adapters.is_quantized(m)]
    assert len(layers) == 7 * 2 and not frozen.training and not any(p.requires_grad for p in frozen.parameters())
    assert type(frozen.lm_head) is nn.Linear  # the output layer stays float
    assert _bytes(frozen) < float_bytes
    assert (logits(frozen, ids()) - float_logits).abs().max() < (0.05 if kind == "int8" else 0.3)
    # the same weights as transformers' own quantisation while loading
    directory = save_pretrained_atomic(tiny()[0], tok, tmp_path / "m")
    loaded = s.prepare_frozen(AutoModelForCausalLM.from_pretrained(directory, device_map="cpu",
                                                                   **s.frozen_load_kwargs()))
    mine, theirs = frozen.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert torch.equal(logits(loaded, ids()), logits(frozen, ids()))


def frozen_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the state-dict entries that do not train (tied copies of trained weights excluded)."""
    return {k: v.detach().clone() for k, v in module.state_dict(keep_vars=True).items()
            if not (isinstance(v, nn.Parameter) and v.requires_grad)}


def _bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


@pytest.mark.parametrize("name", ["fp32", "bf16-mixed", "int8-frozen", "nf4-frozen", "lora", "qlora"])
def test_ppo_shaped_update_trains_only_the_trainable_weights(name):
    """Policy, reference, reward model, critic held per the strategy; one rollout (generate, score,
    reference logprobs) and two optimisation steps with a KL term. Frozen tensors stay bit-identical."""
    from rlhf_pl.models.generate import generate
    from rlhf_pl.plugins.samplers import TemperatureSampler
    from rlhf_pl.plugins.specs import TemperatureSamplerConfig

    s = strategy(name)
    L.seed_everything(0, verbose=False)
    policy, tok = tiny()
    policy = s.prepare_trainable(policy)
    reference = s.reference_from_policy(policy) if s.shares_reference else s.prepare_frozen(tiny()[0])
    base, _ = tiny()
    reward = s.prepare_frozen(RewardModel.from_causal_lm(base, "linear", tok))
    critic_lm, _ = tiny()
    critic = s.prepare_trainable(RewardModel.from_causal_lm(critic_lm, "linear", tok))
    frozen = {"reward": reward} if s.shares_reference else {"reward": reward, "reference": reference}
    frozen_before = {name: copy.deepcopy(m.state_dict()) for name, m in frozen.items()}
    trainable_before = {**{f"p.{k}": v for k, v in adapters.trainable_state_dict(policy).items()},
                        **{f"c.{k}": v for k, v in adapters.trainable_state_dict(critic).items()}}
    policy_frozen = frozen_state(policy)

    prompts = ids(4, 6)
    opt = torch.optim.AdamW([p for m in (policy, critic) for p in m.parameters() if p.requires_grad], lr=1e-2)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.trainer_precision == "bf16-mixed")
    with autocast:
        gen = generate(policy, prompts, torch.ones_like(prompts), TemperatureSampler(TemperatureSamplerConfig()), 5,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            scores = reward(gen.sequences, gen.attention_mask).rewards
            ref_lp = response_logprobs(reference, gen.sequences, gen.attention_mask, gen.prompt_length, 0.7)
        for _ in range(2):
            lp = response_logprobs(policy, gen.sequences, gen.attention_mask, gen.prompt_length, 0.7)
            values = critic(gen.sequences, gen.attention_mask).raw
            loss = -(lp.sum(-1) * (scores - values.detach())).mean() + 0.1 * (lp - ref_lp).sum(-1).mean() \
                + ((values - scores) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
    for name, m in frozen.items():
        now = m.state_dict()
        assert now.keys() == frozen_before[name].keys()
        assert all(torch.equal(now[k], v) for k, v in frozen_before[name].items()), name
    after = {**{f"p.{k}": v for k, v in adapters.trainable_state_dict(policy).items()},
             **{f"c.{k}": v for k, v in adapters.trainable_state_dict(critic).items()}}
    assert after.keys() == trainable_before.keys()
    changed = [k for k in after if not torch.equal(after[k], trainable_before[k])]
    assert len(changed) >= 0.9 * len(after), f"only {len(changed)} of {len(after)} trainable tensors changed"
    now = frozen_state(policy)
    assert now.keys() == policy_frozen.keys() and all(torch.equal(now[k], v) for k, v in policy_frozen.items())
    if name in ("int8-frozen", "nf4-frozen"):
        assert (any(adapters.is_quantized(m) for m in reward.modules())
                and any(adapters.is_quantized(m) for m in reference.modules()))
        assert not any(adapters.is_quantized(m) for m in policy.modules())  # the fully trained policy stays float32


@pytest.mark.parametrize("name", ["int8-frozen", "nf4-frozen", "lora", "qlora"])
def test_the_ppo_stage_update_loop_runs_with_models_held_per_strategy(tmp_path, name):
    """rlhf_pl.stages.ppo.PPOModule (the stage's own update) with the four models built the way the
    stage is to build them (see rlhf_pl.precision): completes, frozen tensors untouched,
    only trainable tensors change, the first minibatch's ratio is exactly 1, the checkpoint reloads."""
    from rlhf_pl.config import PPOConfig
    from rlhf_pl.data.batches import tokenize_prompts
    from rlhf_pl.data.formats import load_prompts
    from rlhf_pl.models.critic import Critic, ValueHead
    from rlhf_pl.models.ppo_models import PPOModels
    from rlhf_pl.models.reward import trunk_of
    from rlhf_pl.stages.ppo import PPOModule

    s = strategy(name)
    s.check("cpu", None, stage="ppo", frozen=("reference", "reward model"))
    L.seed_everything(0, verbose=False)
    policy, tok = tiny()
    policy = s.prepare_trainable(policy)
    reference = s.reference_from_policy(policy) if s.shares_reference else s.prepare_frozen(tiny()[0])
    reward = s.prepare_frozen(RewardModel.from_causal_lm(tiny()[0], "linear", tok))
    trunk = trunk_of(tiny()[0])
    critic = s.prepare_trainable(Critic(trunk, ValueHead(trunk.config.hidden_size)))
    frozen = {"reward": reward} if s.shares_reference else {"reward": reward, "reference": reference}
    frozen_before = {k: copy.deepcopy(m.state_dict()) for k, m in frozen.items()}
    policy_before = frozen_state(policy)
    trainable_before = adapters.trainable_state_dict(policy)

    models = PPOModels(policy, reference, reward, critic, None, tok, "tiny", "tiny + linear head", "tiny")
    ppo = PPOConfig(updates=2, batch_size=4, max_new_tokens=6, ppo_epochs=2, sample_every=100, checkpoint_every=2)
    prompts = load_prompts("embedded:prompts", limit=16)
    module = PPOModule(models, ppo, registry.build_by_name("samplers", "temperature"),
                       registry.build_by_name("kl_controllers", "fixed"), prompts,
                          tokenize_prompts(prompts, tok, 64), 0, tmp_path)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=s.trainer_precision, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False)
    trainer.fit(module)
    assert module.rollouts_done == 2 and module.history["approx_kl_first"] == [0.0, 0.0]
    for k, m in frozen.items():
        assert all(torch.equal(v, m.state_dict()[k2]) for k2, v in frozen_before[k].items()), k
    policy_after = frozen_state(policy)
    assert all(torch.equal(v, policy_after[k]) for k, v in policy_before.items())
    after = adapters.trainable_state_dict(policy)
    assert sum(not torch.equal(after[k], v) for k, v in trainable_before.items()) >= 0.9 * len(after)
    saved = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=False)
    fresh = s.prepare_trainable(tiny()[0])
    fresh.load_state_dict(saved["policy"])  # strict, also for the NF4 base of qlora
    assert torch.equal(logits(fresh, ids()), logits(policy, ids()))


# --- 8-bit optimizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("choice, cls", [("adamw", "AdamW"), ("adamw8bit", "AdamW8bit"),
                                         ("paged_adamw8bit", "PagedAdamW8bit")])
def test_optimizer_choice_and_8bit_states_on_cpu(choice, cls):
    from rlhf_pl.optim import build_optimizer

    model = tiny()[0]
    built = build_optimizer(model.parameters(), OptimConfig(optimizer=choice, lr=1e-3), total_steps=4)
    opt = built["optimizer"]
    assert type(opt).__name__ == cls
    model(input_ids=ids(), labels=ids()).loss.backward()
    opt.step()
    q_proj = opt.state[model.model.layers[0].self_attn.q_proj.weight]  # 64 × 64 = 4096 elements: 8-bit
    norm = opt.state[model.model.norm.weight]  # 64 elements: 32-bit
    if choice == "adamw":
        assert q_proj["exp_avg"].dtype == torch.float32
    else:
        assert q_proj["state1"].dtype == torch.uint8 and q_proj["state2"].dtype == torch.uint8
        assert norm["state1"].dtype == torch.float32


def test_adamw_runs_the_fused_kernel_and_matches_the_reference_loop():
    """torch's AdamW is built fused on the CPU (the per-tensor loop is ~10× slower there) and takes
    the same steps as the loop implementation, up to float rounding."""
    from rlhf_pl.optim import make_optimizer

    fused_model, loop_model = tiny()[0].eval(), tiny()[0].eval()  # same seed, same weights; no dropout
    optim = OptimConfig(optimizer="adamw", lr=1e-2, weight_decay=0.1)
    fused = make_optimizer(fused_model.parameters(), optim)
    assert fused.defaults["fused"] is True
    loop = torch.optim.AdamW(list(loop_model.parameters()), lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, foreach=False)
    for _ in range(3):
        for model, opt in ((fused_model, fused), (loop_model, loop)):
            opt.zero_grad()
            model(input_ids=ids(), labels=ids()).loss.backward()
            opt.step()
    start = tiny()[0].model.layers[0].self_attn.q_proj.weight
    moved = fused_model.model.layers[0].self_attn.q_proj.weight
    assert not torch.allclose(moved, start)  # the steps did something
    for a, b in zip(fused_model.parameters(), loop_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# --- the stages ------------------------------------------------------------------------------------------


STAGE_ARGS = ("experiment=quick", "trainer.enable_progress_bar=false", "logger.tensorboard=false",
              "trainer.max_epochs=1", "data.val_fraction=0.2")


def _initial(cfg, stage: str, s: PrecisionStrategy, tok_holder: list) -> nn.Module:
    """The module the stage started training from: same seed, same loading and preparation order."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    model, tok, _ = load_model_and_tokenizer(ModelConfig(tiny=TinyModelConfig(seed=cfg.model.tiny.seed)))
    tok_holder.append(tok)
    if stage == "rm":
        model = RewardModel.from_causal_lm(model, "linear", tok)
    return s.prepare_trainable(model)


# The ranking loss sees only reward differences within a prompt, so the reward head's bias gets a zero
# gradient (exactly 0, or a rounding residue, depending on the batch): it may stay where it started.
SHIFT_INVARIANT = {"head.score.bias"}


def _check_trained(initial: nn.Module, ckpt_state: dict, prefix: str) -> nn.Module:
    """Only trainable tensors changed; returns the trained module rebuilt from the checkpoint (strict load)."""
    state = {k[len(prefix):]: v for k, v in ckpt_state.items() if k.startswith(prefix)}
    trainable = {k for k, v in initial.state_dict(keep_vars=True).items()
                 if isinstance(v, nn.Parameter) and v.requires_grad and k not in SHIFT_INVARIANT}
    before = {k: v.clone() for k, v in initial.state_dict().items()}
    assert state.keys() == before.keys()
    frozen_changed = [k for k in before if k not in trainable and k not in ("gain", "bias", *SHIFT_INVARIANT)
                      and not torch.equal(before[k], state[k])]
    assert not frozen_changed, frozen_changed[:5]
    changed = [k for k in trainable if not torch.equal(before[k], state[k])]
    assert len(changed) == len(trainable), sorted(trainable - set(changed))[:5]
    trained = initial
    trained.load_state_dict(state)  # strict, also for NF4 layers
    return trained.eval()


SFT_CASES = {
    "fp32+adamw8bit": ("precision=fp32", "sft.optim.optimizer=adamw8bit"),
    "bf16-mixed": ("precision=bf16-mixed",),
    "lora+bf16+checkpointing": ("precision=lora", "precision.compute=bf16-mixed", "model.gradient_checkpointing=true"),
    "qlora+paged_adamw8bit": ("precision=qlora", "sft.optim.optimizer=paged_adamw8bit"),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_stage(tmp_path, case):
    from rlhf_pl.run import run_stage

    cfg = _compose("+stage=sft", *STAGE_ARGS, "data.limit=20", "sft.num_samples=1", "sft.max_new_tokens=4",
                   f"paths.output_root={tmp_path}", *SFT_CASES[case])
    summary = run_stage(cfg).metrics
    run_dir = Path(summary["model_dir"]).parent
    assert summary["steps"] == 2 and (run_dir / "model" / "config.json").is_file()

    s = registry.build("precision", cfg.precision)
    s.check("cpu", None)
    tok_holder: list = []
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = _check_trained(_initial(cfg, "sft", s, tok_holder), ckpt["state_dict"], "model.")
    if "8bit" in case:
        states = [st.get("__bnb_optimizer_quant_state__", st)["state1"]
                  for st in ckpt["optimizer_states"][0]["state"].values()]
        # bitsandbytes keeps 8-bit moments for tensors of >= 4096 elements (the tiny model's LoRA matrices are smaller)
        assert states and all(st.dtype == (torch.uint8 if st.numel() >= 4096 else torch.float32) for st in states)
        assert any(st.dtype == torch.uint8 for st in states) == case.startswith("fp32")
    x = ids()
    with_adapters = logits(trained, x)
    exported = s.export(trained)
    reloaded, _, _ = load_model_and_tokenizer(ModelConfig(name="sft", name_or_path=str(run_dir / "model")))
    assert torch.equal(logits(reloaded, x), logits(exported, x))  # the saved export is what the checkpoint gives
    torch.testing.assert_close(logits(reloaded, x), with_adapters, atol=2e-5, rtol=0)


def _write_comparisons(path: Path, n: int) -> None:
    rng = random.Random(0)
    colours = ["red", "blue", "green", "yellow", "white"]
    with path.open("w") as f:
        for _ in range(n):
            right, *wrong = rng.sample(colours, 3)
            f.write(json.dumps({"prompt": f"Name the colour {right}.",
                                "completions": [f"It is {w}." for w in wrong] + [f"It is {right}."],
                                "ranking": [[2], [0, 1]]}) + "\n")


RM_CASES = {
    "fp32+adamw8bit": ("precision=fp32", "rm.optim.optimizer=adamw8bit"),
    "bf16-mixed": ("precision=bf16-mixed",),
    "lora": ("precision=lora",),
    "qlora+adamw8bit": ("precision=qlora", "rm.optim.optimizer=adamw8bit"),
}


@pytest.mark.parametrize("case", list(RM_CASES))
def test_rm_stage(tmp_path, case):
    from rlhf_pl.run import run_stage

    comparisons = tmp_path / "comparisons.jsonl"
    _write_comparisons(comparisons, 10)
    cfg = _compose("+stage=rm", *STAGE_ARGS, f"data.comparisons={comparisons}", "data.limit=16", "rm.batch_size=4",
                   "rm.normalise_size=4", f"paths.output_root={tmp_path}", "reward_head=linear", *RM_CASES[case])
    summary = run_stage(cfg).metrics
    run_dir = Path(summary["reward_model_dir"]).parent
    assert summary["steps"] == 2 and summary["init_from"] == "base model tiny"

    s = registry.build("precision", cfg.precision)
    s.check("cpu", None)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    trained = _check_trained(_initial(cfg, "rm", s, []), ckpt["state_dict"], "reward_model.")
    x = ids(4, 12)
    mask = torch.ones_like(x)
    with torch.no_grad():
        with_adapters = trained(x, mask).raw
        exported = s.export(trained)
        saved = RewardModel.from_pretrained(run_dir / "reward_model")
        assert torch.equal(saved(x, mask).raw, exported(x, mask).raw)
        torch.testing.assert_close(saved(x, mask).raw, with_adapters, atol=2e-5, rtol=0)
    assert saved.normalisation_info["n"] == 4


# --- GPU only ----------------------------------------------------------------------------------------------


@gpu
@needs_cuda
def test_qlora_with_fp16_compute_trains_on_cuda():
    s = registry.build_by_name("precision", "qlora", compute="fp16-mixed")
    s.check("cuda", "16-mixed", stage="sft", frozen=())
    model = s.prepare_trainable(tiny()[0]).cuda()
    assert all(m.weight.device.type == "cuda" for m in model.modules() if adapters.is_quantized(m))
    x = ids().cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@gpu
@needs_cuda
def test_paged_adamw8bit_pages_on_cuda():
    from rlhf_pl.optim import make_optimizer

    model = copy.deepcopy(tiny()[0]).cuda()
    opt = make_optimizer(model.parameters(), OptimConfig(optimizer="paged_adamw8bit"))
    model(input_ids=ids().cuda(), labels=ids().cuda()).loss.backward()
    opt.step()
    state = opt.state[model.model.layers[0].self_attn.q_proj.weight]
    assert state["state1"].dtype == torch.uint8 and getattr(state["state1"], "is_paged", False)


def test_mixed_precision_stores_frozen_linear_weights_cast_once_with_bit_identical_outputs(monkeypatch):
    """bf16-mixed (and auto where it means bf16-mixed): a frozen model's transformer linear weights are
    held in bfloat16 — the cast autocast makes at every call, made once — so logits and rewards under
    autocast are bit-identical to the float32-held model's, with fewer bytes; embeddings, norms, the
    output layer and the reward head stay float32. fp32 and auto-as-fp32 leave frozen models as they are."""
    seq = ids(3, 11)
    plain_lm = tiny()[0].requires_grad_(False).eval()
    held_lm = strategy("bf16-mixed").prepare_frozen(tiny()[0])
    base, tok = tiny()
    plain_rm = RewardModel.from_causal_lm(base, "linear", tok).requires_grad_(False).eval()
    held_rm = strategy("bf16-mixed").prepare_frozen(copy.deepcopy(plain_rm))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(plain_lm(input_ids=seq).logits, held_lm(input_ids=seq).logits)
        mask = torch.ones_like(seq)
        assert torch.equal(plain_rm(seq, mask).rewards, held_rm(seq, mask).rewards)

    linear = {n: m.weight.dtype for n, m in held_lm.named_modules() if type(m) is nn.Linear}
    assert linear.pop("lm_head") == torch.float32 and set(linear.values()) == {torch.bfloat16}
    assert len(linear) == 7 * held_lm.config.num_hidden_layers  # q, k, v, o, gate, up, down per layer
    assert held_lm.get_input_embeddings().weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for n, p in held_lm.named_parameters() if "norm" in n)
    assert all(p.dtype == torch.float32 for p in held_rm.head.parameters())
    nbytes = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    assert nbytes(held_lm) < nbytes(plain_lm) and nbytes(held_rm) < nbytes(plain_rm)

    assert all(p.dtype == torch.float32 for p in strategy("fp32").prepare_frozen(tiny()[0]).parameters())
    for capabilities, dtype in (({"avx512_bf16": True}, torch.bfloat16), ({"avx512_bf16": False}, None)):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda capabilities=capabilities: capabilities)
        assert strategy("auto").frozen_linear_dtype() == dtype
    with pytest.raises(ValueError, match="requires grad: only frozen layers"):
        adapters.store_linears_in_(tiny()[0], torch.bfloat16)
