"""The suite's figures, drawn one way everywhere: per-layer profiles, layer × step heatmaps and spectra.

Every figure has a descriptive title, labelled axes with units, layer names on layer axes (never fractional
ticks) and a constrained layout, so nothing is clipped at TensorBoard's image size. Headless (Agg canvas). Any
values can be drawn (:func:`plottable`): non-finite ones are left out, huge ones clipped to float32's range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from lightning_align.logging import FLOAT32_MAX, new_figure


def plottable(values: Sequence[float]) -> list[float]:
    """Values matplotlib can draw: non-finite ones NaN (left out), finite ones clipped to float32's range.

    Example:
        >>> plottable([1e300, float("inf"), -2.0])
        [3.4028234663852886e+38, nan, -2.0]
    """
    return [min(max(float(v), -FLOAT32_MAX), FLOAT32_MAX) if math.isfinite(v) else math.nan for v in values]


def _layer_axis(ax: object, names: Sequence[str], axis: str = "x") -> None:
    """One tick per layer, labelled with its name (smaller and rotated when there are many)."""
    size = 8 if len(names) <= 12 else 6 if len(names) <= 30 else 4
    if axis == "x":
        ax.set_xticks(range(len(names)))  # type: ignore[attr-defined]
        ax.set_xticklabels(names, rotation=45 if len(names) > 4 else 0, ha="right" if len(names) > 4 else "center", fontsize=size)  # type: ignore[attr-defined]
    else:
        ax.set_yticks(range(len(names)))  # type: ignore[attr-defined]
        ax.set_yticklabels(names, fontsize=size)  # type: ignore[attr-defined]


def spans_decades(values: Sequence[float], decades: float = 2.0) -> bool:
    """Whether all finite values are positive and max/min reaches ``10**decades``.

    Example:
        >>> spans_decades([1e-4, 0.5]), spans_decades([0.1, 0.9]), spans_decades([0.0, 5.0]), spans_decades([1e-14, 0.5])
        (True, False, False, False)
    """
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) <= max(finite) * 1e-9:  # zero, negative, or round-off from zero (1e-14 at init)
        return False
    return max(finite) / min(finite) >= 10**decades


def layer_profile(names: Sequence[str], curves: Mapping[str, Sequence[float]], *, ylabel: str, title: str) -> Figure:
    """One line per curve (e.g. per step) over the layers; log scale when positive values span decades.

    Example:
        >>> fig = layer_profile(["fc1", "fc2"], {"step 0": [0.5, 0.4], "step 10": [0.2, 0.1]}, ylabel="cos", title="t")
        >>> [t.get_text() for t in fig.axes[0].get_xticklabels()]
        ['fc1', 'fc2']
    """
    fig, ax = new_figure(max(5.0, 0.3 * len(names) + 2.0), 3.6)
    curves = {label: plottable(values) for label, values in curves.items()}
    for label, values in curves.items():
        ax.plot(range(len(names)), values, marker="o", label=label)
    if spans_decades([v for vs in curves.values() for v in vs], 1.5):
        ax.set_yscale("log")
    if ax.get_yscale() == "linear":
        ax.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
    _layer_axis(ax, names)
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    return fig


def layer_heatmap(names: Sequence[str], steps: Sequence[int], values: Sequence[Sequence[float]], *, label: str, title: str) -> Figure:
    """A layer × step heatmap (``values[layer][step]``, NaN for unmeasured), log colours over decades.

    Example:
        >>> fig = layer_heatmap(["a", "b"], [0, 10], [[1.0, 2.0], [3.0, float("nan")]], label="x", title="t")
        >>> fig.axes[0].get_ylabel()
        'layer'
    """
    fig, ax = new_figure(min(9.0, max(5.0, 0.2 * len(steps) + 3.0)), min(9.0, max(3.0, 0.22 * len(names) + 1.6)))
    values = [plottable(row) for row in values]
    if not names or not steps:  # nothing measured: an empty frame that says so
        values = [[math.nan]]
        ax.text(0.5, 0.5, "nothing measured", ha="center", va="center", transform=ax.transAxes)
    flat = [v for row in values for v in row]
    norm = LogNorm() if spans_decades(flat, 1.5) else None
    image = ax.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    fig.colorbar(image, ax=ax, label=label)
    _layer_axis(ax, names, axis="y")
    shown = range(0, len(steps), max(1, len(steps) // 8))
    ax.set_xticks(list(shown))
    ax.set_xticklabels([str(steps[i]) for i in shown], fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=10)
    return fig


def spectrum(values: Sequence[float], *, ylabel: str, title: str) -> Figure:
    """Eigenvalues, largest first, on a log scale, one integer tick per index.

    Example:
        >>> spectrum([3.0, 1.0, 0.1], ylabel="eigenvalue", title="t").axes[0].get_yscale()
        'log'
    """
    fig, ax = new_figure(5.0, 3.6)
    ax.semilogy(range(1, len(values) + 1), [v if math.isnan(v) else max(v, 1e-30) for v in plottable(values)], marker="o")
    ax.set_xticks(range(1, len(values) + 1))
    ax.set_xlabel("index (largest first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return fig
