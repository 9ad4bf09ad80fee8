"""A PPO run's summary metrics and curves, from its per-update history (the fields of
:class:`rlhf_pl.rl.results.PPOStats`, one float per update; nan where not measured).

The generic pieces (running means, least-squares trends, plotting) are :mod:`rlhf_pl.report`'s.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rlhf_pl.report import linear_trend, plot_curves, running_mean

History = dict[str, list[float]]


def plot_run(history: History, path: Path, title: str, kl_target: float | None) -> Path:
    """Score (per update, and its running mean over 5 updates: one batch's score is noisy), the score
    minus the reference's on the same prompts (with ``ppo.score_baseline=reference``: the part the
    policy changes, free of the prompt mix), KL (with the controller's target as a dashed line) and
    β over updates. The per-update score panels carry their least-squares line."""
    xs = history["update"]
    curves = {"score": (xs, history["score"]), "score, mean of 5": (xs, running_mean(history["score"], 5))}
    fitted = ["score"]
    if _measured(history["score_vs_reference"]):
        curves["score − reference"] = (xs, history["score_vs_reference"])
        curves["score − reference, mean of 5"] = (xs, running_mean(history["score_vs_reference"], 5))
        fitted.append("score − reference")
    curves.update({"kl": (xs, history["kl"]), "beta": (xs, history["beta"])})
    overlays = {}
    for name in fitted:
        trend = linear_trend(curves[name][1])
        label = f"least squares: rise {trend.rise:+.3f}" + ("" if math.isnan(trend.t) else f", t {trend.t:+.1f}")
        overlays[name] = (trend.line(len(xs)), label)
    return plot_curves(curves, path, title=title, xlabel="update", overlays=overlays,
                       hlines={"kl": kl_target} if kl_target is not None else None)


def summarise(history: History, *, final_beta: float, kl_controller: str, kl_target: float | None, kl_estimator: str,
              updates: int) -> dict[str, Any]:
    """The summary's metrics. Scores are averaged over a quarter of the updates (at least one):
    ``initial_score`` over the first, ``final_score`` over the last; ``objective`` = −final_score.
    The same for the score minus the reference's on the same prompts (null without a baseline).
    ``*_trend``: the least-squares line through every update's value (:func:`rlhf_pl.report.linear_trend`),
    its rise over the run and t = slope / standard error — whether a short run's change is beyond noise."""
    h = history
    quarter = max(1, len(h["score"]) // 4)
    initial, final = _mean(h["score"][:quarter]), _mean(h["score"][-quarter:])
    vs_ref = h["score_vs_reference"]
    measured = _measured(vs_ref)
    vs_initial, vs_final = (_mean(vs_ref[:quarter]), _mean(vs_ref[-quarter:])) if measured else (None, None)
    seconds = [a + b for a, b in zip(h["rollout_seconds"], h["train_seconds"])]
    return {
        "objective": -final, "final_score": final, "initial_score": initial, "score_gain": final - initial,
        "initial_score_vs_reference": vs_initial, "final_score_vs_reference": vs_final,
        "score_vs_reference_gain": vs_final - vs_initial if measured else None,
        "score_trend": linear_trend(h["score"]).plain(),
        "score_vs_reference_trend": linear_trend(vs_ref).plain() if measured else None,
        "final_kl": h["kl"][-1], "final_beta": final_beta, "kl_controller": kl_controller,
        "kl_target": kl_target, "kl_estimator": kl_estimator,
        "updates": updates, "seconds_per_update": _mean(seconds),
        "approx_kl_first": h["approx_kl_first"][-1], "max_abs_log_ratio_first": h["max_abs_log_ratio_first"][-1],
    }


def trend_text(summary: dict[str, Any]) -> str:
    """The fitted trends of a :func:`summarise` result, for the log."""
    parts = []
    for label, key in (("score", "score_trend"), ("score − reference", "score_vs_reference_trend")):
        trend = summary[key]
        text = ("not measured (only with ppo.score_baseline=reference)" if trend is None else f"{trend['rise']:+.3f}"
                + (f" (t {trend['t']:+.1f})" if trend["t"] is not None else ""))
        parts.append(f"{label} {text}")
    return ("(fitted rise, t = slope/standard error; |t| > 2 is beyond the update-to-update noise): "
            + "; ".join(parts))


def _measured(values: Sequence[float]) -> bool:
    """The metric was measured in this run (nan marks one that was not, e.g. without a baseline)."""
    return bool(values) and not any(math.isnan(v) for v in values)


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)
