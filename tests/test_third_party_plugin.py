"""The example third-party reward head (plugins/rlhf-pl-gated-head) as a user would meet it.

The package is pip-installed into a temporary directory (``--target``), never into the test
environment; every check runs in a subprocess with that directory on ``PYTHONPATH``, so the entry
point is discovered exactly as for a pip-installed package.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from process_helpers import Installed, install_plugin

REPO = Path(__file__).resolve().parent.parent
PLUGIN_SRC = REPO / "plugins" / "rlhf-pl-gated-head"
DIST_NAMES = ("rlhf-pl-gated-head", "rlhf_pl_gated_head")  # as written, and as pip may normalise it


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    inst = install_plugin(PLUGIN_SRC, tmp_path_factory.mktemp("gated"))
    assert (inst.site / "rlhf_pl_gated_head" / "head.py").is_file()
    return inst


def test_not_visible_without_the_install(tmp_path):
    """The main environment does not have it: the checks below see the temp install only."""
    proc = subprocess.run([sys.executable, "-m", "rlhf_pl.plugins"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "gated" not in proc.stdout


def test_listed_with_its_package(installed, tmp_path):
    rows = installed.listed_rows("gated", tmp_path)
    assert len(rows) == 1 and "reward_head" in rows[0], rows
    assert any(name in rows[0] for name in DIST_NAMES), rows[0]


def test_shown_in_help(installed, tmp_path):
    proc = installed.run("-m", "rlhf_pl", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "reward_head: ensemble, gated, linear, mlp" in proc.stdout


def test_composes_with_typed_fields_and_rejects_a_bad_type(installed, tmp_path):
    proc = installed.run("-m", "rlhf_pl", "+stage=rm", "reward_head=gated", "reward_head.gate_bias=-1.5",
                         "reward_head.normalise=false", "--cfg", "job", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    head = OmegaConf.create(proc.stdout).reward_head
    assert (head.gate_bias, head.normalise, head.init_std) == (-1.5, False, None)

    bad = installed.run("-m", "rlhf_pl", "+stage=rm", "reward_head=gated", "reward_head.gate_bias=high",
                        "--cfg", "job", cwd=tmp_path)
    assert bad.returncode == 1
    assert "reward_head.gate_bias" in bad.stderr and "high" in bad.stderr


LOAD_BACK = """
import json, sys
from rlhf_pl.models.reward import RewardModel
rm = RewardModel.from_pretrained(sys.argv[1])
scores = rm.score(["What is 2 + 2?", "Reverse the word 'engine'."], ["4.", "enigne"])
print(json.dumps({"head": type(rm.head).__module__ + "." + type(rm.head).__name__,
                  "gate_bias": float(rm.head.gate.bias), "shape": list(scores.shape),
                  "finite": bool(scores.isfinite().all())}))
"""


def test_trains_from_the_command_line_and_loads_back(installed, tmp_path):
    out = tmp_path / "out"
    proc = installed.run("-m", "rlhf_pl", "+stage=rm", "experiment=quick", "reward_head=gated",
                         "reward_head.gate_bias=-0.5", f"paths.output_root={out}",
                         "trainer.enable_progress_bar=false", "data.limit=64", "rm.normalise_size=32",
                         cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = list((out / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["reward_head"] == "gated"
    model_dir = run_dir / "reward_model"
    saved = json.loads((model_dir / "reward_config.json").read_text())
    assert saved["head"]["name"] == "gated"
    assert saved["head"]["distribution"] in DIST_NAMES and saved["head"]["distribution_version"] == "0.1.0"
    assert saved["head"]["config"] == {"gate_bias": -0.5, "normalise": True, "init_std": None}

    loaded = installed.run("-c", LOAD_BACK, str(model_dir), cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["head"] == "rlhf_pl_gated_head.head.GatedHead"
    assert result["shape"] == [2] and result["finite"]
    assert result["gate_bias"] != -0.5  # the trained gate bias was saved and loaded, not the initial one
