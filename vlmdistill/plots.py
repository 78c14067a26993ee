"""Figures written as PNG files with matplotlib's Agg canvas (no display, no pyplot state)."""

from __future__ import annotations

import os

from .extras import require


def new_figure(rows: int = 1, cols: int = 1, *, width: float = 4.0, height: float = 3.0):
    """A figure of `rows x cols` panels on an Agg canvas, and its axes (always a flat list)."""
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "drawing figures").FigureCanvasAgg
    Figure = require("matplotlib.figure", "drawing figures").Figure

    figure = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False)
    return figure, [ax for row in axes for ax in row]


def save_figure(figure, path: str, dpi: int = 110) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=dpi)
    return path


def bar_panel(ax, labels, means, stds=None, *, title: str = "", ylabel: str = "", per_seed=None,
              reference: tuple[float, str] | None = None, percent: bool = False) -> None:
    """One bar per arm (mean, ± std as error bars), each seed's value as a dot, an optional reference line."""
    scale = 100.0 if percent else 1.0
    positions = list(range(len(labels)))
    ax.bar(positions, [m * scale for m in means], yerr=None if stds is None else [s * scale for s in stds],
           capsize=3, color="#7a9cc6", edgecolor="#2f4b73")
    for x, values in zip(positions, per_seed or []):
        ax.plot([x] * len(values), [v * scale for v in values], "o", color="#1b2a41", markersize=3, zorder=3)
    if reference is not None:
        ax.axhline(reference[0] * scale, color="#c0504d", linestyle="--", linewidth=1, label=reference[1])
        ax.legend(fontsize=7, loc="best")
    ax.set_xticks(positions, labels, rotation=20, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel + (" (%)" if percent else ""), fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
