"""Config values checked when the config is composed (rlhf_pl.config.validate_config): choices and
ranges declared as field metadata, cross-field rules, keys added with ``+section.key=value``."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf, open_dict

from rlhf_pl import registry
from rlhf_pl.config import RULES, Config, ConfigError, register_configs, setting, validate_config
from rlhf_pl.errors import InputError, NonFiniteLossError, UserError


@pytest.fixture(scope="module", autouse=True)
def hydra_conf():
    """Hydra initialised once for the module (composing is then cheap); cleared for other modules."""
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        yield


def compose_cfg(*overrides: str) -> DictConfig:
    return compose("config", overrides=list(overrides))


def error_of(cfg: DictConfig) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(cfg)
    return str(info.value)


def error_with(cfg: DictConfig, key: str, value) -> str:
    """The error of ``cfg`` with ``key`` set to ``value`` (``cfg`` itself is left as it was)."""
    old = OmegaConf.select(cfg, key)
    OmegaConf.update(cfg, key, value)
    try:
        return error_of(cfg)
    finally:
        OmegaConf.update(cfg, key, old)


# --- every shipped config is valid ----------------------------------------------------------------


@pytest.mark.parametrize("overrides", [(), ("+stage=sft",), ("+stage=rm",), ("+stage=ppo",),
                                       ("+stage=sft", "experiment=quick"), ("+stage=rm", "experiment=quick"),
                                       ("+stage=ppo", "experiment=quick")])
def test_shipped_configs_validate(overrides):
    validate_config(compose_cfg(*overrides))


@pytest.fixture(scope="module")
def plugin_configs() -> list[tuple[Any, str, DictConfig]]:
    """(installed plugin, its config group, the composed +stage=ppo config choosing it), every plugin once."""
    return [(plugin, group, compose_cfg("+stage=ppo", f"{group}={plugin.name}"))
            for kind, group in registry.KINDS.items() for plugin in registry.installed(kind)]


def test_every_plugin_default_config_validates(plugin_configs):
    for _, _, cfg in plugin_configs:
        validate_config(cfg)


def test_structured_configs_validate_with_missing_or_null_plugin_groups():
    cfg = OmegaConf.structured(Config)  # precision and sampler are ??? here, the other groups None
    validate_config(cfg)
    cfg.sampler = None
    validate_config(cfg)
    cfg.ppo.critic = "both"
    assert error_of(cfg).startswith("ppo.critic='both'")


def test_structured_config_with_an_added_key_fails():
    cfg = OmegaConf.structured(Config)
    with open_dict(cfg.sft):
        cfg.sft.nosuchkey = 1
    assert "unknown key sft.nosuchkey" in error_of(cfg)


# --- choices ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, choices", [
    ("ppo.critic=both", "ppo.critic", ("separate", "shared")),
    ("ppo.kl_estimator=k4", "ppo.kl_estimator", ("k1", "k2", "k3")),
    ("ppo.kl_penalty=both", "ppo.kl_penalty", ("reward", "loss")),
    ("ppo.missing_eos_mode=drop", "ppo.missing_eos_mode", ("replace", "add")),
    ("ppo.score_norm=whiten", "ppo.score_norm", ("none", "scale", "standardise")),
    ("ppo.value_head_init=ones", "ppo.value_head_init", ("zero", "reward", "fresh")),
    ("ppo.score_baseline=mean", "ppo.score_baseline", ("reference", "none")),
    ("rm.normalise_on=samples", "rm.normalise_on", ("demonstrations", "prompts_samples")),
    ("sft.optim.optimizer=sgd", "sft.optim.optimizer", ("adamw", "adamw8bit", "paged_adamw8bit")),
    ("ppo.policy_optim.schedule=step", "ppo.policy_optim.schedule", ("cosine", "linear", "constant")),
    ("data.overlong=shorten", "data.overlong", ("truncate", "drop")),
])
def test_a_bad_choice_names_key_value_and_choices(override, key, choices):
    message = error_of(compose_cfg("+stage=ppo", override))
    bad = override.split("=", 1)[1]
    assert message.startswith(f"{key}='{bad}'"), message
    assert all(choice in message for choice in choices), message


def _choice_fields(cls: type, prefix: str):
    """(dotted key, choices) of every field with declared choices below dataclass ``cls``."""
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if "choices" in f.metadata:
            yield f"{prefix}{f.name}", f.metadata["choices"]
        elif dataclasses.is_dataclass(default):
            yield from _choice_fields(type(default), f"{prefix}{f.name}.")


def test_every_declared_choice_field_is_checked():
    keys, cfg = [], compose_cfg("+stage=ppo")
    for key, choices in _choice_fields(Config, ""):
        message = error_with(cfg, key, "no_such_choice")
        assert message.startswith(f"{key}='no_such_choice': choose one of: {', '.join(choices)}"), message
        keys.append(key)
    expected = {"ppo.critic", "rm.normalise_on", "data.overlong", "sft.optim.schedule", "ppo.critic_optim.optimizer"}
    assert expected <= set(keys)


def test_every_plugin_choice_field_is_checked(plugin_configs):
    checked = []
    for plugin, group, cfg in plugin_configs:
        for key, choices in _choice_fields(plugin.spec().config, f"{group}."):
            message = error_with(cfg, key, "no_such_choice")
            assert message.startswith(f"{key}='no_such_choice'") and all(c in message for c in choices), message
            checked.append((plugin.name, key))
    assert ("lora", "precision.compute") in checked and ("mlp", "reward_head.activation") in checked


# --- ranges -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, expected", [
    ("sft.batch_size=-1", "sft.batch_size=-1: must be an integer >= 1"),
    ("sft.num_samples=-1", "sft.num_samples=-1: must be an integer >= 0"),
    ("rm.normalise_size=1", "rm.normalise_size=1: must be an integer >= 2"),
    ("rm.epochs=0", "rm.epochs=0: must be an integer >= 1"),
    ("ppo.updates=0", "ppo.updates=0: must be an integer >= 1"),
    ("ppo.vf_coef=-0.5", "ppo.vf_coef=-0.5: must be a finite number >= 0"),
    ("ppo.clip_eps=1.5", "ppo.clip_eps=1.5: must be a finite number in (0, 1]"),
    ("ppo.lam=0", "ppo.lam=0.0: must be a finite number in (0, 1]"),
    ("ppo.gamma=nan", "ppo.gamma=nan: must be a finite number in (0, 1]"),
    ("ppo.value_clip=0", "ppo.value_clip=0.0: must be a finite number > 0, or null"),
    ("ppo.max_grad_norm=-1", "ppo.max_grad_norm=-1.0: must be a finite number > 0, or null"),
    ("data.val_fraction=1", "data.val_fraction=1.0: must be a finite number in [0, 1)"),
    ("data.limit=0", "data.limit=0: must be an integer >= 1, or null"),
    ("data.max_length=0", "data.max_length=0: must be an integer >= 1"),
    ("sft.optim.lr=0", "sft.optim.lr=0.0: must be a finite number > 0"),
    ("rm.optim.warmup_ratio=1.5", "rm.optim.warmup_ratio=1.5: must be a finite number in [0, 1]"),
    ("sft.optim.betas=[0.9,1.0]", "sft.optim.betas=[0.9, 1.0]: every item must be a finite number in [0, 1)"),
    ("sft.optim.betas=[0.9]", "sft.optim.betas=[0.9]: must have exactly 2 items"),
    ("trainer.num_nodes=0", "trainer.num_nodes=0: must be an integer >= 1"),
    ("model.dropout=1", "model.dropout=1.0: must be a finite number in [0, 1)"),
    ("model.tiny.num_layers=0", "model.tiny.num_layers=0: must be an integer >= 1"),
    ("seed=-3", "seed=-3: must be an integer in [0, 4294967295]"),
    ("sampler=top_p sampler.p=0", "sampler.p=0.0: must be a finite number in (0, 1]"),
    ("sampler=top_k sampler.k=0", "sampler.k=0: must be an integer >= 1"),
    ("sampler.temperature=0", "sampler.temperature=0.0: must be a finite number > 0"),
    ("reward_head=ensemble reward_head.n_heads=1", "reward_head.n_heads=1: must be an integer >= 2"),
    ("reward_head.init_std=0", "reward_head.init_std=0.0: must be a finite number > 0, or null"),
    ("kl_controller=fixed kl_controller.beta=-1", "kl_controller.beta=-1.0: must be a finite number >= 0"),
    ("labeler.noise=2", "labeler.noise=2.0: must be a finite number in [0, 1]"),
    ("precision=lora precision.r=0", "precision.r=0: must be an integer >= 1"),
    ("precision=lora precision.target_modules=[]", "precision.target_modules=[]: must have at least 1 item(s)"),
    ("precision=int8-frozen precision.threshold=-1", "precision.threshold=-1.0: must be a finite number >= 0"),
])
def test_a_value_out_of_range_names_key_value_and_range(override, expected):
    assert error_of(compose_cfg("+stage=ppo", *override.split())) == expected


def _below(rules: dict, kind: type):
    """A value just outside the lower bound of ``rules``."""
    if "gt" in rules:
        return kind(rules["gt"])
    return kind(rules["ge"]) - (1 if kind is int else 0.5)


def _bounded_fields(cls: type, prefix: str):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _bounded_fields(type(default), f"{prefix}{f.name}.")
        elif ({"ge", "gt"} & set(f.metadata)) and not isinstance(default, list):
            kind = int if int in (typing.get_args(hints[f.name]) or (hints[f.name],)) else float
            yield f"{prefix}{f.name}", _below(f.metadata, kind)


def test_every_lower_bound_is_checked():
    count, cfg = 0, compose_cfg("+stage=ppo")
    for key, value in _bounded_fields(Config, ""):
        assert error_with(cfg, key, value).startswith(f"{key}="), key
        count += 1
    assert count > 50
    validate_config(cfg)  # every value was put back


def test_every_plugin_lower_bound_is_checked(plugin_configs):
    checked = []
    for plugin, group, cfg in plugin_configs:
        for key, value in _bounded_fields(plugin.spec().config, f"{group}."):
            assert error_with(cfg, key, value).startswith(f"{key}="), key
            checked.append(key)
    expected = {"sampler.k", "sampler.p", "kl_controller.horizon", "labeler.direct_words", "reward_head.n_heads"}
    assert expected <= set(checked)


def test_null_turns_optional_settings_off():
    validate_config(compose_cfg("+stage=ppo", "ppo.value_clip=null", "ppo.score_clip=null", "ppo.max_grad_norm=null",
                                "data.limit=null", "ppo.missing_eos_penalty=null"))


# --- rules across fields, plugin checks -----------------------------------------------------------


def test_num_minibatches_must_divide_batch_size_and_the_divisors_are_listed():
    message = error_of(compose_cfg("+stage=ppo", "ppo.batch_size=12", "ppo.num_minibatches=5"))
    assert message == "ppo.num_minibatches=5 must divide ppo.batch_size=12; valid: 1, 2, 3, 4, 6, 12"
    validate_config(compose_cfg("+stage=ppo", "ppo.batch_size=12", "ppo.num_minibatches=4"))
    # with several responses per prompt the minibatches split the episodes
    validate_config(compose_cfg("+stage=ppo", "ppo.batch_size=2", "ppo.samples_per_prompt=3", "ppo.num_minibatches=6"))
    message = error_of(compose_cfg("+stage=ppo", "ppo.batch_size=2", "ppo.samples_per_prompt=3",
                                   "ppo.num_minibatches=4"))
    assert message == ("ppo.num_minibatches=4 must divide the 6 episodes (ppo.batch_size=2 × samples_per_prompt=3); "
                       "valid: 1, 2, 3, 6")


def test_group_baseline_needs_several_responses_per_prompt():
    message = error_of(compose_cfg("+stage=ppo", "ppo.score_baseline=group"))
    assert message.startswith("ppo.score_baseline=group needs ppo.samples_per_prompt >= 2")
    assert "got samples_per_prompt=1" in message
    validate_config(compose_cfg("+stage=ppo", "ppo.score_baseline=group", "ppo.samples_per_prompt=2"))


def test_tiny_heads_must_divide_hidden_size():
    message = error_of(compose_cfg("+stage=sft", "experiment=quick", "model.tiny.num_heads=3"))
    assert "model.tiny.hidden_size=64" in message and "model.tiny.num_heads=3" in message


def test_plugin_post_init_checks_run_at_composition():
    message = error_of(compose_cfg("+stage=ppo", "kl_controller=pi", "kl_controller.beta_min=20"))
    assert message.startswith("kl_controller.beta_min") and "20.0" in message and "beta_max" in message


def test_several_problems_come_in_one_message():
    message = error_of(compose_cfg("+stage=rm", "sft.batch_size=0", "rm.normalise_on=x", "+rm.nosuch=1"))
    assert message.startswith("3 config errors:")
    for part in ("sft.batch_size=0", "rm.normalise_on='x'", "unknown key rm.nosuch=1"):
        assert part in message


# --- keys added with + ------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key, section, some_valid", [
    ("+ppo.nosuchkey=1", "ppo.nosuchkey", "of ppo", ("critic", "batch_size", "policy_optim")),
    ("+sft.nosuchkey=1", "sft.nosuchkey", "of sft", ("batch_size", "optim", "max_new_tokens")),
    ("+model.foo=1", "model.foo", "of model", ("name_or_path", "dropout", "tiny")),
    ("+sampler.nosuch=1", "sampler.nosuch", "of sampler", ("temperature",)),
    ("+ppo.policy_optim.momentum=0.9", "ppo.policy_optim.momentum", "of ppo.policy_optim", ("lr", "betas")),
    ("+nosuch=1", "nosuch", "at the top level", ("seed", "ppo", "sampler")),
])
def test_a_key_added_with_plus_fails_like_an_unknown_key(override, key, section, some_valid):
    message = error_of(compose_cfg("+stage=ppo", override))
    assert message.startswith(f"unknown key {key}=")
    assert f"valid keys {section}: " in message
    assert all(name in message.split(": ", 1)[1] for name in some_valid), message


def test_an_added_key_close_to_a_real_one_gets_a_suggestion():
    assert "did you mean ppo.num_samples?" in error_of(compose_cfg("+stage=ppo", "+ppo.num_sample=2"))


# --- the vocabulary and the error types -----------------------------------------------------------


def test_setting_refuses_an_unknown_rule():
    with pytest.raises(TypeError, match="unknown config rule"):
        setting(1, minimum=0)
    assert set(RULES) == {"choices", "ge", "gt", "le", "lt", "length", "min_length"}


def test_user_errors_keep_the_builtin_types_callers_catch():
    from rlhf_pl.data.chat import ChatTemplateError
    from rlhf_pl.data.formats import DataError
    from rlhf_pl.models.loading import ModelLoadError
    from rlhf_pl.plugins.labelers import LabelerError

    for cls, base in ((ConfigError, ValueError), (InputError, FileNotFoundError),
                      (NonFiniteLossError, FloatingPointError), (DataError, ValueError),
                      (registry.PluginError, ValueError), (ChatTemplateError, ValueError),
                      (LabelerError, ValueError), (ModelLoadError, RuntimeError)):
        assert issubclass(cls, UserError) and issubclass(cls, base), cls


def test_validation_is_cheap_no_torch():
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_module\n"
        "from rlhf_pl.config import register_configs, validate_config\n"
        "register_configs()\n"
        "with initialize_config_module('rlhf_pl.conf', version_base='1.3'):\n"
        "    overrides = ['+stage=ppo', 'reward_head=mlp', 'kl_controller=pi', 'precision=lora']\n"
        "    cfg = compose('config', overrides=overrides)\n"
        "validate_config(cfg)\n"
        "assert 'torch' not in sys.modules, 'validate_config imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_declared_choices_are_the_ones_the_code_implements():
    """The schema's choice tuples and the code's tables are one list (a choice the code lacks fails here)."""
    from rlhf_pl.config import OptimConfig, choices_of
    from rlhf_pl.optim import OPTIMIZERS, SCHEDULES

    assert set(choices_of(OptimConfig, "optimizer")) == set(OPTIMIZERS)
    assert set(choices_of(OptimConfig, "schedule")) == set(SCHEDULES)
