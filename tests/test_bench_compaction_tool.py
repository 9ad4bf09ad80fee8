"""tools/bench_compaction.py on a tiny policy: both ways run, the figures and the JSON are written, bad
arguments are refused by name."""
from __future__ import annotations

import json

import pytest
from tool_loader import load_tool

tool = load_tool("bench_compaction")


def test_bench_compaction_runs_both_ways_and_writes_json(ppo_inputs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert tool.main(["--policy", str(ppo_inputs / "sft"), "--num-prompts", "3", "--k", "4", "--batch-size", "8",
                      "--max-new-tokens", "6", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["runs"]) == {"compact", "all_rows"}
    assert all(len(runs) == 1 and runs[0]["seconds"] > 0 and 12 <= runs[0]["new_tokens"] <= 72
               for runs in result["runs"].values())
    assert result["answers"] == 12 and 0 <= result["answers_that_differ"] <= 12
    median = result["median_seconds"]
    assert result["speedup"] == pytest.approx(median["all_rows"] / median["compact"])
    assert "all rows / compact = " in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--k", "0"], "--k must be >= 1, got 0"),
    (["--temperature", "0"], "--temperature must be > 0, got 0.0"),
])
def test_bench_compaction_refuses_bad_arguments(ppo_inputs, argv, message, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--policy", str(ppo_inputs / "sft"), *argv])
    assert message in capsys.readouterr().err


def test_bench_compaction_refuses_a_policy_that_is_not_a_directory(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tool.parse_args(["--policy", str(tmp_path / "nope")])
    assert f"--policy {tmp_path / 'nope'} is not a directory" in capsys.readouterr().err
