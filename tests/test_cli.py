"""The command line as a user meets it: stage choice, composition errors, help, plugin listing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from rlhf_pl.config import register_configs, validate_config


def run_cli(
    *args: str, cwd: Path, module: str = "rlhf_pl", full_error: bool = False
) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "1" if full_error else "0"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def compose_cfg(*overrides: str):
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_no_stage_lists_stages_and_exits_2(tmp_path):
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "+stage=<name>" in proc.stderr and "sft" in proc.stderr


def test_cfg_job_prints_composed_stage_config(tmp_path):
    proc = run_cli("+stage=sft", "model=tiny", "sampler=top_p", "sampler.p=0.8", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.stage == "sft" and cfg.model.name_or_path == "tiny"
    assert cfg.sampler.p == 0.8 and cfg.sampler.temperature == 0.7


def test_wrong_type_names_the_key(tmp_path):
    proc = run_cli("+stage=sft", "sft.batch_size=many", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 1
    assert "sft.batch_size" in proc.stderr and "many" in proc.stderr


def test_unknown_key_names_the_key(tmp_path):
    proc = run_cli("+stage=sft", "trainer.max_epoch=3", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 1
    assert "max_epoch" in proc.stderr


def test_unknown_plugin_lists_installed_ones(tmp_path):
    proc = run_cli("+stage=sft", "sampler=nucleus", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 1
    assert "nucleus" in proc.stderr
    for name in ("temperature", "top_k", "top_p"):
        assert name in proc.stderr


def test_help_shows_groups_and_plugin_options(tmp_path):
    proc = run_cli("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for group in ("stage", "model", "data", "trainer", "precision", "sampler", "logger", "experiment"):
        assert f"{group}:" in proc.stdout, group
    assert "top_p" in proc.stdout and "bf16-mixed" in proc.stdout


def test_plugin_listing_names_package(tmp_path):
    proc = run_cli(cwd=tmp_path, module="rlhf_pl.plugins")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "top_p" in proc.stdout and "rlhf_pl" in proc.stdout and "fp16-mixed" in proc.stdout


def test_plugin_config_is_typed():
    cfg = compose_cfg("+stage=sft", "sampler=top_k", "sampler.k=7")
    from rlhf_pl import registry

    sampler = registry.build("samplers", cfg.sampler)
    assert sampler.temperature == 0.7 and sampler.k == 7
    with pytest.raises(Exception, match="sampler.k"):
        compose_cfg("+stage=sft", "sampler=top_k", "sampler.k=seven")


def test_registry_unknown_name_lists_installed():
    from rlhf_pl import registry

    with pytest.raises(registry.PluginError, match="installed: temperature, top_k, top_p"):
        registry.get_spec("samplers", "nucleus")


def test_every_shipped_config_composes():
    """Every option of every YAML group composes with every stage and validates (catches typos and
    bad values in conf/) — except the trainer presets this machine cannot run with a stage (CUDA, a
    sharded PPO, ...), which fail with exactly the composition check's reason."""
    import importlib.resources as resources

    from rlhf_pl.errors import ConfigError
    from rlhf_pl.stages import STAGES
    from rlhf_pl.strategies import composition_problem

    conf = resources.files("rlhf_pl.conf")
    for group in ("model", "data", "trainer", "logger", "experiment"):
        for option in sorted(p.name[:-5] for p in conf.joinpath(group).iterdir() if p.name.endswith(".yaml")):
            for stage in STAGES:
                cfg = compose_cfg(f"+stage={stage}", f"{group}={option}")
                assert cfg.stage == stage
                problem = composition_problem(cfg)
                if problem is None:
                    validate_config(cfg)
                    continue
                assert group == "trainer", problem
                with pytest.raises(ConfigError) as err:
                    validate_config(cfg)
                assert problem in str(err.value)


# --- errors the user can fix: one message, exit code 2, no traceback ------------------------------------


def assert_user_error(proc: subprocess.CompletedProcess, *parts: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for part in parts:
        assert part in errors[0], proc.stderr


def test_a_bad_value_is_one_message_and_exit_2(tmp_path):
    proc = run_cli("+stage=sft", "experiment=quick", "sft.batch_size=-1", f"paths.output_root={tmp_path}", cwd=tmp_path)
    assert_user_error(proc, "sft.batch_size=-1", ">= 1")
    assert not (tmp_path / "index.json").exists()


def test_a_bad_choice_lists_the_choices(tmp_path):
    proc = run_cli("+stage=ppo", "experiment=quick", "ppo.critic=both", f"paths.output_root={tmp_path}", cwd=tmp_path)
    assert_user_error(proc, "ppo.critic='both'", "separate, shared")


def test_a_key_added_with_plus_is_refused(tmp_path):
    proc = run_cli("+stage=ppo", "experiment=quick", "+ppo.nosuchkey=1", f"paths.output_root={tmp_path}", cwd=tmp_path)
    assert_user_error(proc, "unknown key ppo.nosuchkey=1", "valid keys of ppo: ", "num_minibatches")


def test_a_broken_data_record_is_one_message_and_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}\n'
                   '{"messages": [{"role": "robot", "content": "Hi"}]}\n')
    proc = run_cli("+stage=sft", "experiment=quick", f"data.demonstrations={bad}", f"paths.output_root={tmp_path}",
                   cwd=tmp_path)
    assert_user_error(proc, f"{bad}:2", "robot")


def test_hydra_full_error_shows_the_traceback(tmp_path):
    proc = run_cli("+stage=sft", "experiment=quick", "sft.batch_size=-1", f"paths.output_root={tmp_path}", cwd=tmp_path,
                   full_error=True)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ConfigError: sft.batch_size=-1" in proc.stderr
