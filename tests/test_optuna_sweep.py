"""hydra/sweeper=optuna_rm runs a real Optuna search on the tiny model: each trial returns the objective
the RM stage writes to its summary.json, and the best value Optuna records is the best trial's objective."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import yaml


def test_optuna_sweep_returns_each_trials_objective(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_pl", "-m", "+stage=rm", "experiment=quick", "hydra/sweeper=optuna_rm",
         "hydra.sweeper.n_trials=3", "rm.optim.lr=tag(log, interval(1e-4, 1e-2))", "rm.batch_size=choice(8, 16)",
         "data.limit=64", "trainer.max_epochs=1", "rm.normalise_size=16", "trainer.enable_progress_bar=false",
         f"paths.output_root={out}"],
        cwd=tmp_path, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (out / "multirun").iterdir()
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna"
    trials = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in trials] == ["0", "1", "2"]
    objectives, overrides = {}, {}
    for trial in trials:
        summary = json.loads((trial / "summary.json").read_text())
        assert summary["objective"] == summary["val_loss"] and math.isfinite(summary["objective"])
        objectives[trial.name] = summary["objective"]
        overrides[trial.name] = dict(o.split("=", 1) for o in yaml.safe_load((trial / ".hydra" / "overrides.yaml")
                                                                            .read_text()))
    assert len({o["rm.optim.lr"] for o in overrides.values()}) == 3  # three different points of the space
    best = min(objectives, key=objectives.get)
    assert results["best_value"] == objectives[best]  # direction: minimize (the RM's validation loss)
    for key, value in results["best_params"].items():
        assert float(overrides[best][key]) == float(value), key
    for o in overrides.values():
        assert 1e-4 <= float(o["rm.optim.lr"]) <= 1e-2 and o["rm.batch_size"] in ("8", "16")
