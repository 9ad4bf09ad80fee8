"""tools/headroom.py: its per-task figures against hand-computed ones, and a run on a tiny model."""
from __future__ import annotations

import pytest
from tool_loader import load_tool

tool = load_tool("headroom")


def test_headroom_against_hand_computed_figures():
    R = tool.PromptResult
    results = [R(("add", "template"), True, (True, False, False, False)),  # the first 2 disagree
               R(("add", "template"), False, (False, False, False, False)),  # never correct
               R(("add", "paraphrase"), False, (True, True, False, True)),  # the first 2 agree (both correct)
               R(("spell", "template"), False, (False, False, False, True))]  # correct only after the first 2
    rows = tool.headroom(results, group=2)
    assert list(rows)[-1] == ("all", "all")
    assert rows[("add", "template")] == tool.Headroom(2, 0.5, 0.125, 0.5, 0.5)
    assert rows[("add", "paraphrase")] == tool.Headroom(1, 0.0, 0.75, 1.0, 0.0)
    assert rows[("add", "all")] == tool.Headroom(3, pytest.approx(1 / 3), pytest.approx(1 / 3), pytest.approx(2 / 3),
                                                 pytest.approx(1 / 3))
    assert rows[("all", "all")] == tool.Headroom(4, 0.25, 0.3125, 0.75, 0.25)
    assert "| add | template | 2 | 0.50 | 0.12 | 0.50 | 0.50 |" in tool.table(rows, 4)
    unphrased = tool.headroom([R(("add", "all"), True, (True, True))], group=2)  # no phrasing: counted once
    assert unphrased[("add", "all")].prompts == unphrased[("all", "all")].prompts == 1
    with pytest.raises(ValueError, match="group = 5"):
        tool.headroom(results, group=5)


def test_headroom_runs_on_a_tiny_policy(ppo_inputs, capsys):
    assert tool.main(["--policy", str(ppo_inputs / "sft"), "--num-prompts", "6", "--samples", "4",
                      "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert "6 prompts of embedded:eval_prompts, 4 samples at T = 1.0" in out
    assert "| all | all | 6 |" in out and "pass@4" in out
