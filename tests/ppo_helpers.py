"""Helpers shared by the PPO test modules (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module

from rlhf_pl.config import register_configs
from rlhf_pl.run import run_stage


def make_cfg(ppo_inputs: Path, out: Path, *overrides: str):
    """The composed ``+stage=ppo experiment=quick`` config reading the ``ppo_inputs`` fixture's models."""
    register_configs()
    with initialize_config_module("rlhf_pl.conf", version_base="1.3"):
        return compose("config", overrides=[
            "+stage=ppo", "experiment=quick", f"paths.output_root={out}", f"ppo.policy_from={ppo_inputs / 'sft'}",
            f"ppo.reward_from={ppo_inputs / 'rm'}", "trainer.enable_progress_bar=false", "logger.tensorboard=false",
            *overrides,
        ])


def ppo_run(cfg, run_dir: Path, **stage_kwargs) -> dict:
    """Run the stage as the command line does (``rlhf_pl.run.run_stage``: validated, seeded, outputs
    recorded); ``stage_kwargs`` (``scorer``, ``callbacks``) go to ``rlhf_pl.stages.ppo.run``.
    Returns the summary metrics."""
    return run_stage(cfg, run_dir, **stage_kwargs).metrics
