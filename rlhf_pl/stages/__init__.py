"""Stages: one module each, read top to bottom. ``run(cfg, run_dir)`` returns the final metrics."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Callable

# name -> (module, one-line description). Order is the order of the RLHF recipe.
STAGES: dict[str, tuple[str, str]] = {
    "sft": ("rlhf_pl.stages.sft", "supervised fine-tuning on demonstration conversations"),
    "rm": ("rlhf_pl.stages.rm", "reward model from K-wise rankings of completions"),
    "ppo": ("rlhf_pl.stages.ppo", "PPO against the reward model with a KL penalty to the SFT policy"),
}


def stage_runner(name: str) -> Callable[[Any, Path], dict]:
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name][0]).run


def usage() -> str:
    lines = ["No stage chosen. Pick one with +stage=<name>:", ""]
    lines += [f"  {name:<8} {desc}" for name, (_, desc) in STAGES.items()]
    lines += [
        "",
        "Examples:",
        "  python -m rlhf_pl +stage=sft                      # SmolLM2-135M on the embedded default data",
        "  python -m rlhf_pl +stage=sft experiment=quick     # tiny random model, under a minute",
        "  python -m rlhf_pl +stage=sft --cfg job            # print the composed config",
        "  python -m rlhf_pl --help                          # config groups and their options",
    ]
    return "\n".join(lines)
