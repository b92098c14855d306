"""Learning-rate transfer across sizes, from a sweep's runs: loss against LR, the optimum and its shift.

The sweep's axes are read from the runs' saved configs: the varying key named ``lr``/``learning_rate``
is the learning rate, other varying integer keys (``width``, ``depth``, ...) are sizes, the seed is
averaged over, and any other varying key (e.g. the Parametrization ``scheme``) splits the runs into
groups compared side by side. Per group and size the optimum LR minimises the chosen loss
(``criterion``), refined by a parabola in ``log2(lr)`` through the best grid point and its neighbours;
its shift is the least-squares slope of ``log2(optimum)`` against ``log2(size)``: log2 steps per
doubling. Everything comes from the event files (``train/loss``, ``val/loss``,
``sharpness/lr_x_max_eig``, ``coord/*``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lightning_align.report.events import Run, natural_key
from lightning_align.report.figures import (
    STEP_LABEL,
    log_axis,
    new_figure,
    size_axis,
    spans_decades,
)

CRITERIA = {
    "mean": "mean training loss over the run (how fast each LR trains; the least noisy)",
    "final": "final training loss (mean of the last 20% of logged train/loss values, at least 3)",
    "best": "best training loss (min of train/loss smoothed over 20% of the run)",
    "val_final": "final validation loss",
    "val_best": "best validation loss",
}
_LR = re.compile(r"(^|[._])(lr|learning_rate)$")
_IGNORED = re.compile(r"^(trainer\.logger|ckpt_path|config)(\.|$)")


@dataclass
class Axes:
    """The sweep's axes as dotted config keys."""

    lr: str
    sizes: list[str]
    groups: list[str]
    seed: str | None = None


@dataclass
class Optimum:
    """The optimum of one loss-vs-LR curve: its grid LR, refined LR, loss, and whether it sits on the grid's edge."""

    lr: float
    refined: float
    loss: float
    at_edge: bool


@dataclass
class Transfer:
    """The analysis: per group, per size axis, per size value, the loss curves and optima."""

    axes: Axes
    criterion: str
    lrs: list[float]
    # group label -> size axis -> size value -> criterion -> [loss per lr] (mean over seeds; inf = diverged/missing)
    losses: dict[str, dict[str, dict[float, dict[str, list[float]]]]] = field(default_factory=dict)
    optima: dict[str, dict[str, dict[float, Optimum]]] = field(default_factory=dict)
    slopes: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, dict[str, dict[float, dict[float, list[Run]]]]] = field(default_factory=dict)

    def verdicts(self) -> list[str]:
        """One line per size axis: how far the optimum moves per doubling, per group."""
        lines = []
        for axis in self.axes.sizes:
            name = axis.rsplit(".", 1)[-1]
            parts = []
            for group, slopes in self.slopes.items():
                if axis not in slopes or not math.isfinite(slopes[axis]):
                    continue
                opts = self.optima[group][axis]
                sizes = sorted(opts)
                edge = any(o.at_edge for o in opts.values())
                span = f"{name} {sizes[0]:g}→{sizes[-1]:g}: LR {opts[sizes[0]].refined:.3g} → {opts[sizes[-1]].refined:.3g}"
                parts.append(f"{group + ': ' if group else ''}optimum moves by {slopes[axis]:+.2f} log2 steps per {name} doubling"
                             f" ({span}{'; an optimum is at the edge of the LR grid' if edge else ''})")
            if parts:
                lines.append(f"[{CRITERIA[self.criterion].split(' (')[0]}] " + "; ".join(parts))
        return lines


def _value(v: Any) -> Any:
    return v if isinstance(v, (int, float, str, bool)) or v is None else str(v)


def detect_axes(runs: Sequence[Run]) -> Axes | None:
    """The sweep axes (``None`` if no learning rate varies across the runs)."""
    flats = [r.flat_config() for r in runs]
    keys = sorted({k for f in flats for k in f}, key=natural_key)
    varying = [k for k in keys if not _IGNORED.match(k) and len({repr(_value(f.get(k))) for f in flats}) > 1]
    lrs = [k for k in varying if _LR.search(k)]
    if not lrs or len(runs) < 2:
        return None
    seed = "seed_everything" if "seed_everything" in varying else None
    sizes, groups = [], []
    for k in varying:
        if k in (lrs[0], seed):
            continue
        vals = [f.get(k) for f in flats]
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in vals):
            sizes.append(k)
        else:
            groups.append(k)
    return Axes(lrs[0], sizes, groups, seed)


def _series(run: Run, tag: str) -> list[float]:
    return [v for _, v in run.scalars.get(tag, [])]


def run_losses(run: Run) -> dict[str, float]:
    """The run's losses for every criterion (``inf`` where diverged or not logged).

    Example:
        >>> from pathlib import Path
        >>> r = Run(Path("."), "r", scalars={"train/loss": [(i, 10.0 - i) for i in range(10)]})
        >>> run_losses(r)["final"], run_losses(r)["mean"], run_losses(r)["val_final"]
        (2.0, 5.5, inf)
    """
    out = dict.fromkeys(CRITERIA, math.inf)
    train = _series(run, "train/loss")
    if train:
        n = min(len(train), max(3, len(train) // 5))
        smooth = np.convolve(np.asarray(train), np.ones(n) / n, mode="valid")
        out["final"] = float(np.mean(train[-n:]))
        out["best"] = float(np.min(smooth))
        out["mean"] = float(np.mean(train))
    val = _series(run, "val/loss")
    if val:
        out["val_final"], out["val_best"] = val[-1], float(np.min(val))
    return {k: (v if math.isfinite(v) else math.inf) for k, v in out.items()}


def optimum(lrs: Sequence[float], losses: Sequence[float]) -> Optimum | None:
    """The best grid LR, refined by a parabola in ``log2(lr)`` through it and its neighbours.

    Example:
        >>> o = optimum([0.25, 0.5, 1.0], [2.0, 1.0, 1.0])
        >>> o.lr, round(math.log2(o.refined), 3), o.at_edge
        (0.5, -0.5, False)
    """
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        return None
    i = min(finite, key=lambda j: losses[j])
    refined = lrs[i]
    edge = i == 0 or i == len(lrs) - 1
    if not edge and math.isfinite(losses[i - 1]) and math.isfinite(losses[i + 1]):
        x = np.log2([lrs[i - 1], lrs[i], lrs[i + 1]])
        a, b, _ = np.polyfit(x, [losses[i - 1], losses[i], losses[i + 1]], 2)
        if a > 0:
            refined = float(2 ** np.clip(-b / (2 * a), x[0], x[2]))
    return Optimum(lrs[i], refined, losses[i], edge)


def slope(sizes: Sequence[float], lrs: Sequence[float]) -> float:
    """Least-squares slope of ``log2(lr)`` against ``log2(size)`` (log2 steps per doubling).

    Example:
        >>> round(slope([64, 128, 256], [0.01, 0.005, 0.0025]), 6)
        -1.0
    """
    if len(sizes) < 2:
        return math.nan
    return float(np.polyfit(np.log2(sizes), np.log2(lrs), 1)[0])


def group_label(run: Run, keys: Sequence[str]) -> str:
    """``scheme=mup`` style label of a run's group values."""
    flat = run.flat_config()
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={_value(flat.get(k))}" for k in keys)


def analyse(runs: Sequence[Run], criterion: str = "mean") -> Transfer | None:
    """The transfer analysis of ``runs`` (``None`` when they are not an LR sweep)."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    axes = detect_axes(runs)
    if axes is None:
        return None
    lrs = sorted({float(r.flat_config()[axes.lr]) for r in runs})
    result = Transfer(axes, criterion, lrs)
    size_axes = axes.sizes or ["(none)"]
    for axis in size_axes:
        others = [s for s in axes.sizes if s != axis]
        # cell: (group + other sizes) -> size value -> lr -> runs
        cells: dict[str, dict[float, dict[float, list[Run]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
        for r in runs:
            flat = r.flat_config()
            label = "; ".join(filter(None, [group_label(r, axes.groups), group_label(r, others)]))
            size = float(flat[axis]) if axis in flat else 1.0
            cells[label][size][float(flat[axes.lr])].append(r)
        for label, by_size in sorted(cells.items()):
            result.runs.setdefault(label, {})[axis] = by_size
            for size, by_lr in sorted(by_size.items()):
                curves: dict[str, list[float]] = {}
                for crit in CRITERIA:
                    curve = []
                    for lr in lrs:
                        vals = [run_losses(r)[crit] for r in by_lr.get(lr, [])]
                        curve.append(float(np.mean(vals)) if vals and all(math.isfinite(v) for v in vals) else math.inf)
                    curves[crit] = curve
                result.losses.setdefault(label, {}).setdefault(axis, {})[size] = curves
                opt = optimum(lrs, curves[criterion])
                if opt is not None:
                    result.optima.setdefault(label, {}).setdefault(axis, {})[size] = opt
            opts = result.optima.get(label, {}).get(axis, {})
            sizes = sorted(opts)
            result.slopes.setdefault(label, {})[axis] = slope(sizes, [opts[s].refined for s in sizes]) if axis != "(none)" else math.nan
    return result


# ---------------------------------------------------------------- figures


def _size_colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    return [colormaps["viridis"](0.9 * i / max(1, n - 1)) for i in range(n)]


#: Panels of the loss-vs-LR figure: (title, [(criterion, line style)]).
LOSS_PANELS = (
    ("mean training loss over the run", (("mean", "-"),)),
    ("training loss: final (solid), best (dashed)", (("final", "-"), ("best", "--"))),
    ("validation loss: final (solid), best (dashed)", (("val_final", "-"), ("val_best", "--"))),
)


def loss_vs_lr_figure(t: Transfer, axis: str) -> Figure:
    """Loss against LR, one colour per size, ★ at each optimum: rows = groups, columns = the losses logged."""
    groups = [g for g in t.losses if axis in t.losses[g]]

    def logged(crit: str) -> bool:
        return any(math.isfinite(v) for g in groups for curves in t.losses[g][axis].values() for v in curves[crit])

    panels = [(title, [c for c in crits if logged(c[0])]) for title, crits in LOSS_PANELS]
    panels = [(title, crits) for title, crits in panels if crits]
    name = axis.rsplit(".", 1)[-1]
    fig, axs = new_figure(4.6 * len(panels), 3.4 * len(groups) + 0.7, len(groups), len(panels), sharex=True)
    for row, group in enumerate(groups):
        by_size = t.losses[group][axis]
        colors = _size_colors(len(by_size))
        for col, (title, crits) in enumerate(panels):
            ax = axs[row, col]
            values = []
            star = next((c for c, _ in crits if c == t.criterion), crits[0][0])
            for color, (size, curves) in zip(colors, sorted(by_size.items())):
                for crit, style in crits:
                    ys = [v if math.isfinite(v) else np.nan for v in curves[crit]]
                    values += [v for v in ys if math.isfinite(v)]
                    ax.plot(t.lrs, ys, "o" + style, ms=3.5, lw=1.4 if style == "-" else 1.0, color=color,
                            alpha=1.0 if style == "-" else 0.6, label=f"{name} {size:g}" if style == "-" else None)
                opt = optimum(t.lrs, curves[star])
                if opt is not None:
                    ax.plot([opt.lr], [opt.loss], "*", ms=13, color=color, markeredgecolor="k", zorder=5)
            ax.set_xscale("log", base=2)
            if spans_decades(values, 1.0):
                log_axis(ax)
            verdict = " — the verdict's criterion" if star == t.criterion and any(c == t.criterion for c, _ in crits) else ""
            ax.set_title(f"{group + chr(10) if group else ''}{title}{verdict}", fontsize=9)
            ax.set_xlabel(f"learning rate ({t.axes.lr})", fontsize=8)
            ax.set_ylabel("loss (nats)")
            ax.grid(alpha=0.3, which="both")
            if col == 0:
                ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"Loss against learning rate per {name} (★ = best LR)", fontsize=11)
    return fig


def optimum_figure(t: Transfer, axis: str) -> Figure:
    """The refined optimum LR against size, one line per group, slope in the legend."""
    name = axis.rsplit(".", 1)[-1]
    fig, axs = new_figure(5.6, 3.8)
    ax = axs[0, 0]
    for group, by_axis in t.optima.items():
        opts = by_axis.get(axis, {})
        sizes = sorted(opts)
        if not sizes:
            continue
        s = t.slopes[group][axis]
        ax.plot(sizes, [opts[x].refined for x in sizes], "o-", label=f"{group or 'runs'}: {s:+.2f} log2 steps / doubling")
    size_axis(ax, sorted({x for by_axis in t.optima.values() for x in by_axis.get(axis, {})}))
    ax.set_yscale("log", base=2)
    ax.set_xlabel(name)
    ax.set_ylabel("optimal learning rate (log2 scale)")
    ax.set_title(f"Optimum LR ({t.criterion}) against {name}", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return fig


def transferred_lr(t: Transfer, group: str, axis: str) -> float:
    """The LR tuned at the smallest size (its grid optimum): the one a user would carry over."""
    opts = t.optima.get(group, {}).get(axis, {})
    return opts[min(opts)].lr if opts else t.lrs[len(t.lrs) // 2]


def over_training_figure(t: Transfer, axis: str, tag: str, ylabel: str, title: str) -> Figure | None:
    """``tag`` over training per size at the transferred LR (one panel per group); ``None`` if not logged."""
    groups = [g for g in t.runs if axis in t.runs[g]]
    panels = []
    for group in groups:
        lr = transferred_lr(t, group, axis)
        lines = {}
        for size, by_lr in sorted(t.runs[group][axis].items()):
            runs = by_lr.get(lr, [])
            if runs and tag in runs[0].scalars:
                lines[size] = runs[0].scalars[tag]
        if lines:
            panels.append((group, lr, lines))
    if not panels:
        return None
    name = axis.rsplit(".", 1)[-1]
    fig, axs = new_figure(4.6 * len(panels), 3.6, 1, len(panels), sharey=True)
    for ax, (group, lr, lines) in zip(axs[0], panels):
        colors = _size_colors(len(lines))
        values = []
        for color, (size, points) in zip(colors, lines.items()):
            values += [v for _, v in points]
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, color=color, label=f"{name} {size:g}")
        if spans_decades(values, 1.0):
            log_axis(ax)
        ax.set_title(f"{group + ', ' if group else ''}lr {lr:.3g}", fontsize=9)
        ax.set_xlabel(STEP_LABEL)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axs[0, 0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=11)
    return fig


def coord_figure(t: Transfer, axis: str) -> Figure | None:
    """The coordinate check across sizes: last ``coord/rms`` and ``coord/delta`` per layer against size."""
    stats = [("coord/rms/", "activation RMS"), ("coord/delta/", "‖h_t − h_0‖ / ‖h_0‖")]
    groups = [g for g in t.runs if axis in t.runs[g]]
    rows = []
    for group in groups:
        lr = transferred_lr(t, group, axis)
        per_size = {size: by_lr.get(lr, []) for size, by_lr in sorted(t.runs[group][axis].items())}
        per_size = {s: r[0] for s, r in per_size.items() if r}
        if any(k.startswith("coord/") for r in per_size.values() for k in r.scalars):
            rows.append((group, lr, per_size))
    if not rows:
        return None
    name = axis.rsplit(".", 1)[-1]
    fig, axs = new_figure(9.0, 3.4 * len(rows) + 0.5, len(rows), 2)
    for row, (group, lr, per_size) in enumerate(rows):
        for col, (prefix, label) in enumerate(stats):
            ax = axs[row, col]
            layers = sorted({k[len(prefix):] for r in per_size.values() for k in r.scalars if k.startswith(prefix)}, key=natural_key)
            values = []
            for layer in layers:
                xs, ys = [], []
                for size, run in per_size.items():
                    series = run.scalars.get(prefix + layer)
                    if series:
                        xs.append(size)
                        ys.append(series[-1][1])
                values += ys
                ax.plot(xs, ys, "o-", ms=3.5, label=layer)
            size_axis(ax, list(per_size))
            if spans_decades(values, 1.0):
                log_axis(ax)
            ax.set_xlabel(name)
            ax.set_ylabel(f"{label} at the last step")
            ax.set_title(f"{group + ', ' if group else ''}lr {lr:.3g}: {label}", fontsize=9)
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, title="layer", title_fontsize=7)
    fig.suptitle(f"Coordinate check across {name} (flat lines: the parametrization scales right)", fontsize=11)
    return fig
