"""tools/bench_generation.py in its tiny mode: both backends, first call and warm calls, the ratio,
token agreement, JSON written (the static step compiled with aot_eager here: inductor's code
generation is exercised by tests/test_generation_backends.py)."""
from __future__ import annotations

import json

import pytest
from tool_loader import load_tool

tool = load_tool("bench_generation")


def test_tiny_run_writes_both_backends_and_their_agreement(tmp_path, capsys, one_thread):
    out = tmp_path / "bench.json"
    assert tool.main(["--tiny", "--precision", "fp32", "--compile-backend", "aot_eager", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["setting"]["model"] == "tiny" and report["setting"]["num_prompts"] == 4
    assert report["setting"]["max_new_tokens"] == 8
    assert report["setting"]["static"] == {"backend": "aot_eager", "mode": "default", "cache_bucket": 32}
    (result,) = report["results"]
    assert result["precision"] == "fp32"
    for backend in ("hf", "static"):
        entry = result["backends"][backend]
        assert entry["first_call_seconds"] > 0 and len(entry["warm_seconds"]) == 1
        assert entry["new_tokens_per_s"] == pytest.approx(4 * 8 / entry["median_seconds"])
    assert result["ratio_static_over_hf"] == pytest.approx(
        result["backends"]["static"]["new_tokens_per_s"] / result["backends"]["hf"]["new_tokens_per_s"])
    assert result["prefill_seconds"] > 0
    for backend in ("hf", "static"):  # 4 rows × 7 decode steps in the time left after the prefill (or None)
        entry = result["backends"][backend]
        left = entry["median_seconds"] - result["prefill_seconds"]
        assert entry["decode_new_tokens_per_s"] == (pytest.approx(4 * 7 / left) if left > 0 else None)
    # fp32, same seed: the same tokens; logprobs equal up to float32 rounding
    assert result["agreement"]["tokens_identical"] and result["agreement"]["rows_differing"] == 0
    assert result["agreement"]["max_logprob_difference"] < 1e-4
    assert all(0 <= d < 1e-4 for d in result["agreement"]["max_logprob_difference_from_fp32"].values())
    assert "static / hf = " in capsys.readouterr().out


def test_agreement_compares_logprobs_before_the_first_differing_token():
    import torch

    class Out:
        def __init__(self, response):
            self.response = torch.tensor(response)

    class Recorded:
        def __init__(self, steps):
            self.logprobs = [torch.tensor(step) for step in steps]

    hf = (Out([[1, 2, 3], [4, 5, 6]]), Recorded([[-0.1, -0.3], [-0.2, -1.0], [-0.5, -0.5]]))
    static = (Out([[1, 2, 3], [4, 9, 6]]), Recorded([[-0.1, -0.35], [-0.25, -3.0], [-0.5, -0.1]]))
    result = tool.agreement(hf, static)
    # row 1 differs from step 1: its steps 1 and 2 (|Δ| 2.0 and 0.4) are not compared; row 0's step 1 (0.05) is
    assert result["tokens_identical"] is False and result["rows_differing"] == 1
    assert result["first_difference_step"] == 1
    assert result["max_logprob_difference"] == pytest.approx(0.05)
