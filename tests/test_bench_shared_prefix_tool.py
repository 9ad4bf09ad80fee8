"""tools/bench_shared_prefix.py in its tiny mode (fp32): both settings timed on both paths, ratios
as computed from the medians, outputs equal up to float32 rounding, the shared RM batch narrower."""
from __future__ import annotations

import json

import pytest
from tool_loader import load_tool

tool = load_tool("bench_shared_prefix")


def test_tiny_run_times_both_paths_and_they_agree(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    assert tool.main(["--tiny", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["setting"]["model"] == "tiny" and report["setting"]["precision"] == "fp32"
    ppo, rm = report["results"]["ppo"], report["results"]["rm"]
    assert ppo["rows"] == 2 * 3 and rm["rankings"] == 2
    for entry in (ppo["no_grad"], ppo["forward_backward"], rm["forward_backward"]):
        medians = entry["median_seconds"]
        assert all(len(entry["seconds"][path]) == 1 for path in ("whole", "shared"))
        assert entry["speedup"] == pytest.approx(medians["whole"] / medians["shared"])
        assert entry["max_abs_difference"] < 1e-4  # the same numbers up to float32 rounding
    assert rm["prefix_columns"] > 0 and rm["columns_shared"] - rm["prefix_columns"] < rm["columns_whole"]
    assert "rm: training step" in capsys.readouterr().out
