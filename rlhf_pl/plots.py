"""Plots written into the run directory (PNG, atomically), next to the TensorBoard logs."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, (xs, _) in curves.items() if len(xs)]
    if not names:
        raise ValueError(f"nothing to plot for {path}: every curve is empty")
    fig, axes = plt.subplots(len(names), 1, figsize=(7, 2.6 * len(names)), sharex=True, squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        xs, ys = curves[name]
        ax.plot(list(xs), list(ys), lw=1.5)
        if hlines and name in hlines:
            ax.axhline(hlines[name], ls="--", color="grey", lw=1)
        if overlays and name in overlays:
            ys_over, label = overlays[name]
            ax.plot(list(xs), list(ys_over), ls="--", color="tab:orange", lw=1.5, label=label)
            ax.legend(loc="best", fontsize="small")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
