"""Figures as PNG files, drawn with matplotlib's Agg canvas (no display, no pyplot global state).

Every plot is a small function that takes plain data and a path and returns the path, so the
commands (compare, bench, reproduce) only gather numbers and pick a file name.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


@dataclass
class Curve:
    """One line: y over x, with an optional +-band (e.g. the std over seeds)."""

    x: Sequence[float]
    y: Sequence[float]
    band: Sequence[float] | None = None


def new_figure(width: float = 6.4, height: float = 4.2) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot(1, 1, 1)


def save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def line_plot(
    curves: Mapping[str, Curve],
    path: Path,
    xlabel: str,
    ylabel: str,
    title: str = "",
    integer_x: bool = False,
) -> Path:
    """One line per label, each with its shaded band where it has one."""
    fig, ax = new_figure()
    for label, c in curves.items():
        x, y = list(c.x), list(c.y)
        (line,) = ax.plot(x, y, marker="o", markersize=3, label=label)
        if c.band is not None and any(b > 0 for b in c.band):
            lo = [v - b for v, b in zip(y, c.band, strict=True)]
            hi = [v + b for v, b in zip(y, c.band, strict=True)]
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if integer_x:
        ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend()
    return save(fig, path)


def accuracy_per_epoch(curves: Mapping[str, Curve], path: Path, title: str = "") -> Path:
    """Test accuracy (%) per epoch, one line per method (mean over seeds, std shaded)."""
    return line_plot(curves, path, xlabel="epoch", ylabel="test accuracy (%)", title=title, integer_x=True)


def bar_plot(
    names: Sequence[str], series: Mapping[str, Sequence[float]], path: Path, ylabel: str, title: str = ""
) -> Path:
    """Grouped bars: one group per name, one bar per series (e.g. ours and the paper's)."""
    fig, ax = new_figure(max(6.4, 0.6 * len(names) * max(len(series), 1)), 4.6)
    width = 0.8 / max(len(series), 1)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + i * width for j in range(len(names))], list(values), width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(names))])
    ax.set_xticklabels(list(names), rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(textwrap.fill(title, 90), fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    return save(fig, path)
