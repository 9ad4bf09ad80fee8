"""rlhf_pl.report: tables, sample logs, trends and plots every stage reports with."""
from __future__ import annotations

import math

import pytest

from rlhf_pl.report import SampleLog, linear_trend, markdown_table, plot_curves, running_mean


def test_linear_trend_against_hand_computed_least_squares():
    # x = 0..3, x̄ = 1.5, ȳ = 2.5, Sxx = 5, Sxy = 4 -> slope 0.8, rise 0.8·3 = 2.4; fitted 1.3 2.1 2.9 3.7,
    # residuals −0.3 0.9 −0.9 0.3 -> SS 1.8, se = sqrt(1.8 / 2 / 5) = sqrt(0.18), t = 0.8 / 0.42426 = 1.8856
    trend = linear_trend([1.0, 3.0, 2.0, 4.0])
    assert trend.rise == pytest.approx(2.4)
    assert trend.t == pytest.approx(0.8 / math.sqrt(0.18))
    assert trend.start == pytest.approx(1.3) and trend.line(4) == pytest.approx([1.3, 2.1, 2.9, 3.7])
    assert linear_trend([4.0, 2.0, 3.0, 1.0]).t == pytest.approx(-0.8 / math.sqrt(0.18))  # mirrored: falls
    assert linear_trend([1.0, 2.0, 3.0]).t == math.inf  # exactly on a rising line: no noise at all
    two = linear_trend([0.5, 0.2])
    assert two.rise == pytest.approx(-0.3) and two.start == pytest.approx(0.5) and math.isnan(two.t)
    one = linear_trend([0.7])
    assert one.rise == 0.0 and one.start == 0.7 and math.isnan(one.t) and one.line(1) == [0.7]


def test_trend_plain_is_json_safe():
    assert linear_trend([1.0, 2.0, 3.0]).plain() == {"start": 1.0, "rise": 2.0, "t": None}  # t = inf -> None


def test_running_mean_uses_fewer_values_at_the_start():
    assert running_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_markdown_table_escapes_pipes_and_newlines():
    assert markdown_table([{"a": "x|y", "b": "1\n2"}]) == "| a | b |\n|---|---|\n| x\\|y | 1<br>2 |"
    assert markdown_table([]) == ""


def test_sample_log_appends_sections_to_one_file(tmp_path):
    samples = SampleLog(tmp_path / "samples.md", "PPO samples", "ppo/samples")
    samples.add([{"prompt": "p", "response": "r"}], "update 1", step=1)
    samples.add([], "update 2", step=2)  # nothing to write
    samples.add([{"prompt": "q", "response": "s"}], "update 3", step=3)
    text = (tmp_path / "samples.md").read_text()
    assert text.startswith("# PPO samples\n\n## update 1\n\n| prompt | response |")
    assert "update 2" not in text and text.count("## update") == 2 and "| q | s |" in text


def test_plot_curves_writes_a_png_and_refuses_nothing_to_plot(tmp_path):
    path = plot_curves({"loss": ([0, 1, 2], [3.0, 2.0, 1.5]), "empty": ([], [])}, tmp_path / "p.png", title="t",
                       hlines={"loss": 1.0}, overlays={"loss": ([3.0, 2.25, 1.5], "fit")})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["p.png"]
    with pytest.raises(ValueError, match="every curve is empty"):
        plot_curves({"x": ([], [])}, tmp_path / "q.png", title="t")
