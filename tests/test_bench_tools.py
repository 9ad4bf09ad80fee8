"""The training benchmarks in tools/ (bench_sft, bench_rm, bench_memory) run end to end on the tiny
preset and write their JSON: they build models the way the stages do, so a change of the stages'
interfaces shows up here and not only when someone next measures (bench_memory once fell behind
PPOModels). What they measure is reported in docs/benchmarks.md; here only that they run and that
their figures hang together."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parent.parent / "tools"


def run_tool(name: str, tmp_path: Path, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), "--model", "tiny", *args, "--out", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_bench_sft_measures_a_training_step(tmp_path):
    report = run_tool("bench_sft", tmp_path, "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32",
                      "--precisions", "fp32")
    (result,) = report["results"]
    assert report["model"] == "tiny" and result["precision"] == "fp32"
    assert set(report["peaks_flops_per_s"]) == {"fp32"}  # no bf16 peak when bf16 is not benchmarked
    # the file rounds step_s to 1 ms (a tiny step takes a few) and tokens_per_s to 0.1
    step = result["step_s"]
    assert 2 * 32 / (step + 5e-4) - 0.05 <= result["tokens_per_s"] <= 2 * 32 / max(step - 5e-4, 1e-9) + 0.05
    assert 0 < result["model_flops_per_s"] and result["params"] > 0


def test_bench_rm_measures_k_wise_against_pairwise_steps(tmp_path):
    report = run_tool("bench_rm", tmp_path, "--steps", "1", "--warmup", "0", "--seq", "32", "--precisions", "fp32")
    by_k = {r["k"]: r for r in report["results"]}
    assert set(by_k) == {2, 4}
    for k, r in by_k.items():  # the same sequences per step, grouped into prompts of k
        assert r["prompts_per_step"] * k == r["sequences_per_step"]
        assert r["pairs_per_step"] == r["prompts_per_step"] * k * (k - 1) // 2
    assert report["k4_over_k2"]["fp32"] == pytest.approx(
        by_k[4]["comparisons_per_s"] / by_k[2]["comparisons_per_s"], rel=0.02)


def test_bench_memory_builds_the_four_ppo_models_and_runs_an_update(tmp_path):
    report = run_tool("bench_memory", tmp_path, "--strategies", "fp32", "--gc", "off", "--updates", "1",
                      "--warmup", "0", "--batch", "2", "--new-tokens", "4")
    (result,) = report["results"]
    assert result["strategy"] == "fp32" and set(result["weights_mb"]) == {"policy", "reference", "reward", "critic"}
    assert result["peak_rss_mb"] >= result["rss_after_models_mb"] > result["baseline_rss_mb"] > 0
    assert len(result["update_times_s"]) == 1 and result["trainable_params"] > 0
    assert "| fp32 |" in report["table_md"]
