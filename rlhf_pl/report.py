"""What every stage reports with: sample tables, trends and plots, beside the TensorBoard logs.

Pure helpers (tables, running means, least-squares trends) and the writers that put them in the
run directory (``samples.md``, ``*.png``, TensorBoard text), all written atomically.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, Optional, Sequence

from rlhf_pl.io import save_figure, write_text

# --- tables ---------------------------------------------------------------------------------------


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table (TensorBoard's text plugin renders it) of string-able cells; "" for no rows."""
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", "<br>")


def tensorboard_writer(trainer: Any) -> Any:
    """The SummaryWriter of the trainer's TensorBoard logger, or None."""
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


class SampleLog:
    """Sample tables of a run: each :meth:`add` appends a section to ``<run_dir>/samples.md``
    (rewritten atomically) and the table to TensorBoard text under ``tag``."""

    def __init__(self, path: Path, title: str, tag: str) -> None:
        self.path, self.title, self.tag = Path(path), title, tag
        self.sections: list[str] = []

    def add(self, rows: Sequence[dict[str, Any]], heading: str, step: int, trainer: Any = None) -> str:
        """Write ``rows`` under ``heading``; returns the table. Nothing is written for no rows, nor on a
        data-parallel rank other than 0."""
        table = markdown_table(rows)
        if not table or (trainer is not None and not trainer.is_global_zero):
            return table
        self.sections.append(f"## {heading}\n\n{table}\n")
        write_text(self.path, f"# {self.title}\n\n" + "\n".join(self.sections))
        writer = tensorboard_writer(trainer) if trainer is not None else None
        if writer is not None:
            writer.add_text(self.tag, table, global_step=step)
        return table


# --- trends ---------------------------------------------------------------------------------------


def running_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / (i + 1 - max(0, i + 1 - window)) for i in range(len(values))]


class Trend(NamedTuple):
    """Least-squares line through a metric's per-step values."""

    start: float  # the fitted value at the first step
    rise: float  # slope × (n − 1): the fitted change from the first step to the last
    t: float  # slope / its standard error: |t| > 2 is a change beyond the step-to-step noise (nan for n < 3)

    def line(self, n: int) -> list[float]:
        """The fitted values at steps 0 … n − 1 of the n it was fitted on."""
        return [self.start + self.rise * i / max(1, n - 1) for i in range(n)]

    def plain(self) -> dict[str, Optional[float]]:
        """JSON-safe: rounded floats, nan and inf as None."""
        return {k: (None if math.isnan(v) or math.isinf(v) else round(v, 4)) for k, v in self._asdict().items()}


def linear_trend(values: Sequence[float]) -> Trend:
    """Fit ``values[i] ≈ a + b·i``. The standard error of ``b`` is
    ``sqrt(Σ residual² / (n − 2) / Σ (i − ī)²)``. Shape: n floats (n = 1: rise 0, t nan; n = 0: start nan)."""
    n = len(values)
    if n < 2:
        return Trend(float(values[0]) if n else math.nan, 0.0, math.nan)
    x_mean, y_mean = (n - 1) / 2, sum(values) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    slope = sum((i - x_mean) * (y - y_mean) for i, y in enumerate(values)) / sxx
    start = y_mean - slope * x_mean
    if n < 3:
        return Trend(start, slope * (n - 1), math.nan)
    residual = sum((y - y_mean - slope * (i - x_mean)) ** 2 for i, y in enumerate(values))
    stderr = math.sqrt(residual / (n - 2) / sxx)
    t = slope / stderr if stderr > 0 else math.copysign(math.inf, slope) if slope else math.nan
    return Trend(start, slope * (n - 1), t)


# --- plots ----------------------------------------------------------------------------------------

@contextmanager
def _panels(n: int, path: Path | str, *, title: str, xlabel: str, height: float) -> Iterator[list[Any]]:
    """``n`` stacked axes sharing x; on exit titled, labelled and saved as PNG (atomically), then closed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(n, 1, figsize=(7, height * n), sharex=True, squeeze=False)
    try:
        yield list(axes[:, 0])
        for ax in axes[:, 0]:
            ax.grid(alpha=0.3)
        axes[0, 0].set_title(title)
        axes[-1, 0].set_xlabel(xlabel)
        fig.tight_layout()
        save_figure(fig, path, dpi=110)
    finally:
        plt.close(fig)


def plot_curves(
    curves: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: Path | str,
    *,
    title: str,
    xlabel: str = "step",
    hlines: dict[str, float] | None = None,
    overlays: dict[str, tuple[Sequence[float], str]] | None = None,
) -> Path:
    """One panel per curve name: ``{name: (xs, ys)}``; ``hlines`` draws a dashed reference line in
    the panel of the same name (e.g. a KL target); ``overlays`` ``{name: (ys, label)}`` draws a
    dashed, labelled second line over the same xs (e.g. a fitted trend). Returns the written path."""
    names = [n for n, (xs, _) in curves.items() if len(xs)]
    if not names:
        raise ValueError(f"nothing to plot for {path}: every curve is empty")
    with _panels(len(names), path, title=title, xlabel=xlabel, height=2.6) as axes:
        for ax, name in zip(axes, names):
            xs, ys = curves[name]
            ax.plot(list(xs), list(ys), lw=1.5)
            if hlines and name in hlines:
                ax.axhline(hlines[name], ls="--", color="grey", lw=1)
            if overlays and name in overlays:
                ys_over, label = overlays[name]
                ax.plot(list(xs), list(ys_over), ls="--", color="tab:orange", lw=1.5, label=label)
                ax.legend(loc="best", fontsize="small")
            ax.set_ylabel(name)
    return Path(path)


def plot_points(panels: dict[str, dict[str, tuple[Sequence[float], Sequence[float], str]]], path: Path | str, *,
                title: str, xlabel: str) -> Path:
    """One panel per name; in each, labelled series ``{label: (xs, ys, style)}`` where style is a
    matplotlib format string ("o-" line with markers, "s" markers only, "--" dashed). Returns the path."""
    if not panels:
        raise ValueError(f"nothing to plot for {path}: no panels")
    with _panels(len(panels), path, title=title, xlabel=xlabel, height=3.2) as axes:
        for ax, (name, series) in zip(axes, panels.items()):
            for label, (xs, ys, style) in series.items():
                ax.plot(list(xs), list(ys), style, label=label, lw=1.5)
            ax.set_ylabel(name)
            ax.legend(loc="best", fontsize="small")
    return Path(path)
