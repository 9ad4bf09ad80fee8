"""Resumable checkpoints (written by the ppo stage) and the RNG states they carry.

``<run_dir>/checkpoints/last.pt`` holds plain containers and tensors only (read with
``weights_only=True``), written atomically (:func:`rlhf_pl.io.torch_save`); then
``latest.json`` points at it, so a kill at any moment leaves the previous complete checkpoint.
``+resume=<run dir>`` (or a ``.pt`` file) names one; :func:`load_for_resume` finds, loads and
checks it against the new run's settings.
"""
from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rlhf_pl.errors import ConfigError, InputError
from rlhf_pl.io import torch_save, write_json

log = logging.getLogger(__name__)

CHECKPOINT_DIR, CHECKPOINT_FILE, POINTER_FILE = "checkpoints", "last.pt", "latest.json"
CHECKPOINT_FORMAT = 1


def write_checkpoint(run_dir: Path, state: dict[str, Any], pointer: Mapping[str, Any]) -> Path:
    """``state`` (with the format number added) to ``<run_dir>/checkpoints/last.pt``, then the
    ``latest.json`` pointer naming it with the ``pointer`` fields (e.g. progress). Returns the file."""
    path = torch_save({"format": CHECKPOINT_FORMAT, **state}, Path(run_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE)
    write_json(path.parent / POINTER_FILE, {"file": CHECKPOINT_FILE, **pointer})
    return path


def find_checkpoint(resume: str) -> Path:
    """``+resume=``: a run directory (its ``checkpoints/latest.json`` pointer, else ``last.pt``) or a .pt file."""
    path = Path(resume).expanduser()
    if path.is_file():
        return path
    folder = path / CHECKPOINT_DIR
    pointer = folder / POINTER_FILE
    if pointer.is_file():
        named = folder / json.loads(pointer.read_text())["file"]
        if named.is_file():
            return named
    if (folder / CHECKPOINT_FILE).is_file():
        return folder / CHECKPOINT_FILE
    raise InputError(f"resume={resume!r}: no checkpoint at {folder / CHECKPOINT_FILE}; valid: a PPO run directory "
                     f"with {CHECKPOINT_DIR}/{CHECKPOINT_FILE} (written every ppo.checkpoint_every updates) "
                     "or a .pt file")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by :func:`write_checkpoint`, on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path}: checkpoint format {state.get('format')!r}; this rlhf_pl reads {CHECKPOINT_FORMAT}")
    return state


def load_for_resume(resume: str, *, updates: int, settings: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """The checkpoint named by ``resume``. A run that has done ``updates`` updates or more is refused
    (ConfigError: raise ``ppo.updates``); ``settings`` (this run's ``ppo`` section as plain data) and
    ``seed`` that differ from the checkpoint's are logged as a warning."""
    path = find_checkpoint(resume)
    state = load_checkpoint(path)
    if state["rollouts_done"] >= updates:
        raise ConfigError(f"resume={resume!r}: that run has done {state['rollouts_done']} updates and "
                          f"ppo.updates={updates}; raise ppo.updates to continue it")
    changed = {k: (v, settings[k]) for k, v in state["ppo"].items() if k in settings and settings[k] != v}
    if changed or state["seed"] != seed:
        log.warning("resuming with settings that differ from the checkpoint's (old, new): %s%s", changed,
                    f"; seed {state['seed']} -> {seed}" if state["seed"] != seed else "")
    log.info("resuming from %s (update %d of %d)", path, state["rollouts_done"], updates)
    return state


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every RNG the run uses: torch (CPU, CUDA), Python, NumPy and the sampling generator."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "sampling": generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = state["numpy"]
    key = np_state["key"].numpy().astype(np.uint32)
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": key, "pos": np_state["pos"]},
                         "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]})
    generator.set_state(state["sampling"])
