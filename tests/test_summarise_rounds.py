"""tools/summarise_rounds.py: one row per iterate run from its rounds.json and last eval.json, and
the mean ± standard deviation over runs, against hand-computed figures."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from tool_loader import load_tool

tool = load_tool("summarise_rounds")


def fake_run(root: Path, seed: int, sft: float, round_1: float, gain_ci: float) -> Path:
    """An iterate run directory with SFT and one round; greedy correct rates ``sft`` → ``round_1``."""
    (root / "round_1" / "eval").mkdir(parents=True)
    eval_json = root / "round_1" / "eval" / "eval.json"
    by_group = lambda correct: {"phrasing": {"paraphrase": {"correct_greedy": correct}},  # noqa: E731
                                "task": {"add": {"correct_greedy": 1.0}}}
    policy = lambda correct, **more: {"correct_greedy": correct, "kl": 0.5, "correct_sampled": 0.25,  # noqa: E731
                                      "gold_sampled": 1.0, "by_group": by_group(correct), **more}
    eval_json.write_text(json.dumps({
        "policies": {"sft": policy(sft, correct_greedy_gain=None),
                     "round_1": policy(round_1, correct_greedy_gain=round_1 - sft, correct_greedy_gain_ci=gain_ci)},
        "best_of_n": [{"n": 1, "correct": 0.25, "gold": 1.0}, {"n": 16, "correct": 0.375, "gold": 1.5}],
        "proxy_agreement": {"accuracy": 0.8, "pairs": 100}}, sort_keys=True))  # as eval writes it
    (root / "rounds.json").write_text(json.dumps({"rounds": [
        {"round": 0, "sft": {"metrics": {"wall_time_s": 60}}},
        {"round": 1, "rm": {"metrics": {"val_accuracy": 0.7, "wall_time_s": 120}},
         "ppo": {"metrics": {"wall_time_s": 90}},
         "eval": {"outputs": {"eval": str(eval_json)}, "metrics": {"wall_time_s": 30}}}]}))
    (root / "config.yaml").write_text(f"seed: {seed}\n")
    return root


def test_rows_and_mean_over_runs_against_hand_computed_figures(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0, 0.375, 0.5, 0.1)
    b = fake_run(tmp_path / "b", 1, 0.25, 0.25, 0.05)
    row = tool.row_of(a)
    assert row["seed"] == 0 and row["sft correct"] == 0.375 and row["round_1 correct (paraphrase)"] == 0.5
    assert (row["round_1 gain over SFT"], row["round_1 gain ±95%"]) == (0.125, 0.1)
    assert "sft gain over SFT" not in row and row["RM 1 accuracy"] == 0.7
    assert row["best-of-16 correct gain"] == 0.125 and row["best-of-16 gold gain"] == 0.5
    assert row["minutes"] == pytest.approx(300 / 60)
    assert [k for k in row if k.endswith(" correct")] == ["sft correct", "round_1 correct"]  # SFT's column first
    assert not [k for k in row if "(add)" in k]  # per task: in each run's eval.md, too many for one row
    old_format = {"paraphrase": {"correct_greedy": 0.5}}  # eval.json before group_by took several keys
    assert tool.phrasings(old_format) == old_format
    names = ["round_10", "x", "round_2", "sft"]
    assert sorted(names, key=tool._policy_order) == ["sft", "round_2", "round_10", "x"]  # by number, not as text
    assert tool.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    gains = [0.125, 0.0]
    assert f"| {statistics.mean(gains):.3f} ± {statistics.stdev(gains):.3f} |" in out  # 0.062 ± 0.088
    assert len(out.strip().splitlines()) == 5  # header, rule, two runs, the mean


def test_a_path_that_is_not_an_iterate_run_is_named(tmp_path):
    with pytest.raises(SystemExit, match="no rounds.json"):
        tool.main([str(tmp_path)])
    with pytest.raises(SystemExit, match="missing: not a directory"):  # not passed over in silence
        tool.main([str(tmp_path / "missing")])
