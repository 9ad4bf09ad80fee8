"""Stage outputs and inputs: the one module that knows ``outputs/index.json``.

``<paths.output_root>/index.json`` remembers, per stage and model name, the outputs of the latest
finished run: ``{"sft": {"tiny": {"model": "/abs/.../model"}}, ...}``. A stage input left at
``auto`` (``rm.init_from``, ``ppo.policy_from``, ``ppo.reward_from``) is the latest recorded
output of the stage that makes it; a path given instead must hold what that stage writes. A
stage's :class:`Inputs` can also be given explicitly (the iterate stage chains rounds that way),
and then the index is not read at all.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from omegaconf import DictConfig, OmegaConf

from rlhf_pl.errors import InputError
from rlhf_pl.io import write_json

INDEX_FILE = "index.json"


@dataclass(frozen=True)
class InputSpec:
    """One input of a stage: the config key that names it, the stage and output that make it."""

    key: str  # dotted config key, e.g. "ppo.policy_from"; its value is "auto" or a path
    stage: str  # the stage whose output it is, e.g. "sft"
    output: str  # that stage's output name, e.g. "model"
    marker: str  # a file every such output holds, e.g. "config.json"
    required: bool = True  # False: "auto" with nothing recorded resolves to None (the stage has a fallback)
    fallback: tuple[tuple[str, str], ...] = ()  # (stage, output) pairs tried in order when nothing is recorded

    @property
    def makers(self) -> str:
        """The commands that write this input, e.g. "+stage=ppo or +stage=sft"."""
        return " or ".join(f"+stage={stage}" for stage, _ in ((self.stage, self.output), *self.fallback))


def index_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_root) / INDEX_FILE


def _read_index(cfg: DictConfig) -> dict[str, Any]:
    path = index_path(cfg)
    return json.loads(path.read_text()) if path.exists() else {}


def record(cfg: DictConfig, stage: str, outputs: Mapping[str, Path]) -> None:
    """Remember ``outputs`` (name -> path) as the latest of ``stage`` for ``cfg.model.name``."""
    if not outputs:
        return
    index = _read_index(cfg)
    index.setdefault(stage, {})[cfg.model.name] = {name: str(Path(p).resolve()) for name, p in outputs.items()}
    write_json(index_path(cfg), index)


def latest(cfg: DictConfig, stage: str, output: str) -> Optional[Path]:
    """The latest recorded ``output`` of ``stage`` for this model, if it still exists."""
    entry = _read_index(cfg).get(stage, {}).get(cfg.model.name)
    path = entry.get(output) if isinstance(entry, dict) else None
    return Path(path) if path and Path(path).exists() else None


def resolve(cfg: DictConfig, spec: InputSpec) -> Optional[Path]:
    """The path of input ``spec``: its config value, or for ``auto`` the latest recorded output."""
    value = OmegaConf.select(cfg, spec.key)
    if value == "auto":
        found = next((path for stage, output in ((spec.stage, spec.output), *spec.fallback)
                      if (path := latest(cfg, stage, output)) is not None), None)
        if found is None and spec.required:
            raise InputError(
                f"{spec.key}=auto: no {spec.makers} output recorded for model {cfg.model.name!r} in "
                f"{index_path(cfg)}; run `python -m rlhf_pl +stage={(spec.fallback or ((spec.stage, ''),))[-1][0]}` "
                f"first (same model= and "
                f"paths.output_root), or set {spec.key}=<directory written by {spec.makers}>")
        return found
    return check_input(spec, Path(str(value)).expanduser(), f"{spec.key}={value!r}")


def check_input(spec: InputSpec, path: Path, origin: str) -> Path:
    """``path`` if it holds ``spec.marker``, else an InputError naming ``origin`` and what is valid."""
    if not (path / spec.marker).is_file():
        raise InputError(f"{origin}: {path} has no {spec.marker}; valid: 'auto' (the latest {spec.makers} output "
                         f"of this model) or a {spec.output} directory written by {spec.makers}")
    return path


class Inputs:
    """A stage's inputs by name, resolved when first read: an explicitly given path (checked), else
    the config key's value through :func:`resolve`. Shape of the answer: a Path, or None for an
    optional input with nothing recorded."""

    def __init__(self, cfg: DictConfig, specs: Mapping[str, InputSpec],
                 given: Optional[Mapping[str, Path]] = None) -> None:
        unknown = set(given or {}) - set(specs)
        if unknown:
            raise InputError(f"unknown stage input(s) {sorted(unknown)}; "
                             f"this stage reads: {', '.join(specs) or 'none'}")
        self.cfg, self.specs = cfg, dict(specs)
        self._given = {name: Path(p) for name, p in (given or {}).items()}
        self._resolved: dict[str, Optional[Path]] = {}

    def __getitem__(self, name: str) -> Optional[Path]:
        if name not in self._resolved:
            spec = self.specs[name]
            given = self._given.get(name)
            self._resolved[name] = (check_input(spec, given, f"input {name!r}") if given is not None
                                    else resolve(self.cfg, spec))
        return self._resolved[name]


def model_config_at(model_cfg: DictConfig, path: Path) -> DictConfig:
    """``model_cfg`` (dropout, checkpointing, chat template) pointed at a local model directory."""
    return OmegaConf.merge(model_cfg, {"name_or_path": str(path), "gguf_file": None, "package_index_wheel": None,
                                       "revision": None})
