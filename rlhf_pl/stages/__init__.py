"""Stages: one module each, read top to bottom, with one entry point.

Every stage module defines ``INPUTS`` (name -> :class:`rlhf_pl.outputs.InputSpec`: the earlier
outputs it reads) and ``run(cfg, run_dir, inputs) -> StageResult``: it takes the composed config,
its run directory and its :class:`rlhf_pl.outputs.Inputs` (paths given explicitly, else the latest
recorded outputs), and returns the outputs it wrote and its final metrics. It does not record
anything in the output index: :func:`rlhf_pl.run.run_stage` does, so that a caller (the iterate
stage) can chain stages by passing outputs explicitly.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from rlhf_pl.errors import ConfigError

# name -> (module, one-line description). Order is the order of the RLHF recipe.
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("rlhf_pl.stages.sft", "supervised fine-tuning on demonstration conversations"),
    "collect": ("rlhf_pl.stages.collect", "K completions of a model-written turn per prompt, ranked by the labeler"),
    "rm": ("rlhf_pl.stages.rm", "reward model from K-wise rankings of completions"),
    "ppo": ("rlhf_pl.stages.ppo", "PPO against the reward model with a KL penalty to the SFT policy"),
    "eval": ("rlhf_pl.stages.eval", "the policies against a gold labeler: gold, proxy, KL, win rate, best-of-n"),
    "iterate": ("rlhf_pl.stages.iterate", "the loop: SFT, then rounds of collect → rm → ppo → eval"),
    "app": ("rlhf_pl.stages.app", "the feedback web app: chat, demonstrations with suggestions, ranking, admin"),
}


@dataclass
class StageResult:
    """What a stage wrote and measured. ``outputs``: name -> path of what later stages read (recorded
    in the output index as this stage's latest); ``metrics``: JSON-able final figures, ``objective``
    (what sweeps minimise) among them."""

    outputs: dict[str, Path] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def stage_module(name: str) -> ModuleType:
    """The module of stage ``name`` (its ``INPUTS`` and ``run``)."""
    if name not in STAGES:
        raise ConfigError(f"stage={name!r}; choose one of: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name][0])


def usage() -> str:
    lines = ["No stage chosen. Pick one with +stage=<name>:", ""]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in STAGES.items()]
    lines += [
        "",
        "Examples:",
        "  python -m rlhf_pl +stage=iterate                  # the whole recipe: SFT, 2 RLHF rounds, the eval table",
        "  python -m rlhf_pl +stage=iterate experiment=quick # the same with a tiny random model, about a minute",
        "  python -m rlhf_pl +stage=sft                      # one stage: SFT of SmolLM2-135M on the embedded data",
        "  python -m rlhf_pl +stage=app                      # the feedback web app (accounts: app.add_user=<name>)",
        "  python -m rlhf_pl +stage=sft --cfg job            # print the composed config",
        "  python -m rlhf_pl --help                          # config groups and their options",
    ]
    return "\n".join(lines)
