"""tools/overoptimisation.py on tiny models: noisy rankings, the tracked points, the fits, the files."""
from __future__ import annotations

import json
import math
import random

import pytest
from tool_loader import load_tool

tool = load_tool("overoptimisation")


def test_noise_replaces_a_seeded_fraction_of_rankings_by_permutations(tmp_path):
    kept = tool.noisy_rankings("embedded:comparisons", 40, 0.0, seed=0)
    noisy = tool.noisy_rankings("embedded:comparisons", 40, 0.5, seed=0)
    assert len(kept) == len(noisy) == 40 and noisy == tool.noisy_rankings("embedded:comparisons", 40, 0.5, seed=0)
    changed = [a != b for a, b in zip(kept, noisy)]
    assert 8 <= sum(changed) <= 32  # about half (a shuffle may also give the same ranking back)
    for a, b, shuffled in zip(kept, noisy, changed):
        assert a["completions"] == b["completions"]
        if shuffled:  # a permutation of the K completions, no ties
            assert sorted(b["ranking"]) == list(range(len(b["completions"])))


def test_the_gold_fit_s_peak_is_where_d_alpha_minus_beta_log_d_turns_down():
    alpha, beta = 0.6, 0.4
    d = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0]
    points = [tool.Point(i, x * x, x, x * (alpha - beta * math.log(x)) if x > 0 else 0.0, 0.3 * x, None)
              for i, x in enumerate(d)]
    fitted = tool.fits(points)
    assert fitted["gold"]["alpha"] == pytest.approx(alpha) and fitted["gold"]["beta"] == pytest.approx(beta)
    assert fitted["gold_peak_sqrt_kl"] == pytest.approx(math.exp(alpha / beta - 1))
    assert fitted["proxy"]["beta"] == pytest.approx(0.0, abs=1e-9)  # the proxy rises linearly: no peak


# bf16-mixed: the frozen models hold bfloat16 linear weights, so the measurements must run under PPO's autocast
# (precision=auto picks it on CPUs with native bfloat16; experiment=quick's fp32 alone would not see a mismatch)
@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_end_to_end_on_tiny_models(tmp_path, ppo_inputs, one_thread, capsys, precision):
    random.seed(0)
    code = tool.main(["--model", "tiny", "--sft", str(ppo_inputs / "sft"), "--rankings", "24", "--updates", "4",
                      "--eval-every", "2", "--prompts", "4", "--samples", "2", "--out", str(tmp_path / "o"),
                      "experiment=quick", f"paths.output_root={tmp_path / 'out'}", "ppo.batch_size=4",
                      "ppo.num_minibatches=1", "ppo.max_new_tokens=6", "eval.max_new_tokens=6",
                      f"precision={precision}"])
    assert code == 0
    result = json.loads((tmp_path / "o" / "overoptimisation.json").read_text())
    assert [p["update"] for p in result["points"]] == [0, 2, 4]
    assert result["points"][0]["kl"] == pytest.approx(0.0, abs=1e-5)  # before any update: the SFT policy itself
    assert len((tmp_path / "o" / "proxy_rankings.jsonl").read_text().splitlines()) == 24
    assert (tmp_path / "o" / "overoptimisation.png").read_bytes()[:4] == b"\x89PNG"
    assert "| update |" in (tmp_path / "o" / "overoptimisation.md").read_text()
    assert "update 4:" in capsys.readouterr().out
