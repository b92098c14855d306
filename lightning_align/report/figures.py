"""Matplotlib figures of the report that compare runs: curves over training and overlaid spectra.

Headless (Agg figures, no pyplot state). Every figure has a title, axis labels with units, a legend
when several runs share an axis, and a log axis where the values span two decades or more; figures are
saved with a tight bounding box so nothing is clipped.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.figure import Figure

from lightning_align.figures import spans_decades
from lightning_align.report.events import Run, spectrum_values

DPI = 110
STEP_LABEL = "training step"


def new_figure(width: float = 6.4, height: float = 3.8, nrows: int = 1, ncols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    """A Figure (no pyplot) and its axes array (``squeeze=False``)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (tight bounding box)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    return buf.getvalue()


def log_axis(ax: Any, which: str = "y", base: float = 10) -> None:
    """A log axis labelled with plain numbers (``0.3``, ``2``), not ``2×10^0``."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):
        def _num_to_string(self, x: float, vmin: float, vmax: float) -> str:
            return f"{x:.3g}" if 1e-3 <= abs(x) < 1e3 else f"{x:.0f}" if 1e3 <= abs(x) < 1e6 else f"{x:.0e}"

    axis = ax.yaxis if which == "y" else ax.xaxis
    (ax.set_yscale if which == "y" else ax.set_xscale)("log", base=base)
    axis.set_major_formatter(Plain(base=base, labelOnlyBase=False))
    axis.set_minor_formatter(Plain(base=base, labelOnlyBase=False, minor_thresholds=(1.2, 0.4)))


def size_axis(ax: Any, sizes: Sequence[float]) -> None:
    """A log2 x axis with a tick (plain number) at each size."""
    from matplotlib.ticker import FixedLocator, NullLocator

    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sorted(sizes)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(sorted(sizes), [f"{s:g}" for s in sorted(sizes)])


def run_colors(n: int) -> list[Any]:
    """One colour per run: ``tab10`` up to 10 runs, ``viridis`` beyond."""
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / max(1, n - 1)) for i in range(n)]


def curves_figure(title: str, panels: Sequence[tuple[str, str, dict[str, list[tuple[int, float]]]]], ncols: int = 3) -> Figure:
    """Small multiples: one panel per ``(panel title, y label, {run name: [(step, value)]})``, runs overlaid.

    Example:
        >>> fig = curves_figure("demo", [("loss", "loss (nats)", {"a": [(0, 2.0), (10, 1.0)]})])
        >>> png(fig)[:4]
        b'\\x89PNG'
    """
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(4.3 * ncols, 3.0 * nrows + 0.5, nrows, ncols)
    run_names = list(dict.fromkeys(name for _, _, series in panels for name in series))
    colors = dict(zip(run_names, run_colors(len(run_names))))
    for ax, (panel, ylabel, series) in zip(axes.flat, panels):
        values: list[float] = []
        for name, points in series.items():
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            values += ys
            ax.plot(xs, ys, "o-" if len(xs) < 30 else "-", ms=3, lw=1.4, color=colors[name], label=name)
        if spans_decades(values):
            log_axis(ax)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(STEP_LABEL)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    if len(run_names) > 1:
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside lower center", ncols=min(4, len(run_names)), fontsize=8, title="run")
    fig.suptitle(title, fontsize=12)
    return fig


def spectrum_figure(title: str, ylabel: str, series: dict[str, list[float]]) -> Figure:
    """Sorted spectra (largest first) on a log axis, one line per ``{label: values}``."""
    fig, axes = new_figure(6.0, 3.8)
    ax = axes[0, 0]
    colors = run_colors(len(series))
    for color, (label, values) in zip(colors, series.items()):
        ax.plot(range(1, len(values) + 1), values, "o-" if len(values) < 40 else "-", ms=3, color=color, label=label)
    all_values = [v for vs in series.values() for v in vs]
    if all_values and min(all_values) > 0:
        log_axis(ax)
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8, loc="best")
    return fig


def histogram_spectra(run: Run, tag: str, max_lines: int = 4) -> dict[str, list[float]]:
    """``{"step N": values}`` for up to ``max_lines`` measurements (first, last and evenly between) of a histogram tag."""
    entries = run.histograms.get(tag, [])
    if not entries:
        return {}
    idx = sorted({round(i * (len(entries) - 1) / max(1, max_lines - 1)) for i in range(min(max_lines, len(entries)))})
    return {f"step {entries[i][0]}": spectrum_values(entries[i][1]) for i in idx}
