"""Offline coordinate check: train a few steps at several widths (and depths), compare activation sizes.

The test microsoft/mup users run (``mup.coord_check.get_coord_data``): build the model at each width, train
``steps`` steps on one fixed batch, and record per layer the size of its output coordinates at each step
(t = 1 is the forward pass before the first update). Under a correct μP every curve is flat in width; under
SP the hidden activations and outputs grow after one step. We record, per module and step:

- ``l1``: ``mean |h|`` (mup's default statistic);
- ``rms``: ``sqrt(mean h²)``;
- ``delta_rms``: ``rms(h_t − h_1)``, the size of the feature change (0 at t = 1);
- ``delta``: ``‖h_t − h_1‖ / ‖h_1‖``, the relative change, as the ``CoordCheck`` callback logs it.

Layers, loss and recorded outputs come from the same code the callbacks use (``select_modules`` with the
``"weights"`` default, :class:`~lightning_align.measure.probe.ProbeLoss`, ``captured_outputs``).

:meth:`CoordCheckResult.slopes` fits the log-log slope of a statistic against width (or depth);
:meth:`CoordCheckResult.spread` gives max/min over widths. No Lightning import: a LightningModule works as
a plain module (its ``training_step`` gives the loss and ``configure_optimizers`` the optimizer when no
``loss_fn``/``optimizer_factory`` is given).

Example:
    >>> import torch
    >>> from torch import nn
    >>> x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    >>> result = coord_check(
    ...     lambda w: nn.Sequential(nn.Linear(8, w), nn.ReLU(), nn.Linear(w, 3)), [32, 64], (x, y),
    ...     loss_fn=nn.functional.cross_entropy, optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    >>> sorted(result.modules)
    ['0', '2']
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_align.measure.modules import captured_outputs, select_modules
from lightning_align.measure.probe import ProbeLoss

STATS: tuple[str, ...] = ("l1", "rms", "delta_rms", "delta")


@dataclass
class CoordCheckResult:
    """Records of a coordinate check: one dict per (width, depth, seed, step, module).

    Attributes:
        records: dicts with keys ``width``, ``depth``, ``seed``, ``step``, ``module``, ``l1``, ``rms``,
            ``delta_rms``, ``delta``, ``loss``.
        modules: recorded module names, in model order.

    Example::

        result = coord_check(lambda w: MLP(width=w), widths=[64, 128, 256], batch=(x, y))
        result.records[0]["rms"], result.modules
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)

    def values(self, stat: str = "l1", x: str = "width", step: int | None = None, **fixed: Any) -> dict[str, dict[int, dict[int, float]]]:
        """``{module: {step: {x value: mean over seeds}}}`` (records filtered by ``fixed``, e.g. ``depth=4``)."""
        if stat not in STATS and stat != "loss":
            raise ValueError(f"coord_check: unknown statistic {stat!r}; choose one of {list(STATS)}")
        acc: dict[str, dict[int, dict[int, list[float]]]] = {}
        for r in self.records:
            if (step is not None and r["step"] != step) or any(r.get(k) != v for k, v in fixed.items()):
                continue
            acc.setdefault(r["module"], {}).setdefault(r["step"], {}).setdefault(r[x], []).append(r[stat])
        return {m: {t: {k: sum(v) / len(v) for k, v in sorted(d.items())} for t, d in s.items()} for m, s in acc.items()}

    def slopes(self, stat: str = "l1", x: str = "width", **fixed: Any) -> dict[str, dict[int, float]]:
        """Least-squares slope of ``log stat`` against ``log x``, per module and step (NaN if a value is 0)."""
        return {
            m: {t: _loglog_slope(list(d.keys()), list(d.values())) for t, d in steps.items()}
            for m, steps in self.values(stat, x, **fixed).items()
        }

    def spread(self, stat: str = "l1", x: str = "width", **fixed: Any) -> dict[str, dict[int, float]]:
        """``max / min`` of a statistic over the ``x`` values, per module and step (1 = perfectly flat)."""
        out: dict[str, dict[int, float]] = {}
        for m, steps in self.values(stat, x, **fixed).items():
            out[m] = {}
            for t, d in steps.items():
                vals = list(d.values())
                lo, hi = min(vals), max(vals)
                out[m][t] = hi / lo if lo > 0 else (1.0 if hi == 0 else math.inf)
        return out

    def plot(self, stat: str = "l1", x: str = "width", **fixed: Any) -> Any:
        """A matplotlib figure, one panel per step, one log-log curve per module (as mup's ``plot_coord_data``)."""
        from matplotlib.figure import Figure

        data = self.values(stat, x, **fixed)
        steps = sorted({t for s in data.values() for t in s})
        fig = Figure(figsize=(4 * max(len(steps), 1), 3.5), dpi=100)
        for i, t in enumerate(steps):
            ax = fig.add_subplot(1, len(steps), i + 1)
            for m, s in data.items():
                if t in s:
                    ax.plot(list(s[t].keys()), [max(v, 1e-12) for v in s[t].values()], marker="o", label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"t = {t}")
            ax.set_xlabel(x)
            ax.set_ylabel(stat)
        if steps:
            fig.axes[-1].legend(fontsize=6)
        fig.tight_layout()
        return fig


def _loglog_slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    if len(xs) < 2 or any(y <= 0 for y in ys):
        return math.nan
    lx = [math.log(v) for v in xs]
    ly = [math.log(v) for v in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / den


def coord_check(
    module_factory: Callable[..., nn.Module],
    widths: Sequence[int],
    batch: Any,
    *,
    depths: Sequence[int] | None = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
    steps: int = 3,
    seeds: int = 1,
    modules: Sequence[str] | None = None,
) -> CoordCheckResult:
    """Train each width (× depth) for ``steps`` steps on ``batch`` and record per-module coordinate sizes.

    Args:
        module_factory: ``width -> model`` (or ``(width, depth) -> model`` when ``depths`` is given), or
            ``-> (model, optimizer)``; the model must already carry its parametrization (e.g. via
            :func:`~lightning_align.parametrize.auto.auto_parametrize` and ``rewrite_optimizer``).
        widths: widths to compare.
        batch: ``(inputs, targets)``, reused at every step (mup's ``fix_data``).
        depths: depths to compare as well (optional).
        loss_fn: ``loss_fn(outputs, targets)``; default: the model's ``training_step(batch, 0)``.
        optimizer_factory: ``model -> optimizer`` when the factory returns a model only; default: the
            model's ``configure_optimizers()``.
        steps: number of recorded steps (t = 1 .. steps; updates happen between them).
        seeds: seeds averaged over (seed ``s`` seeds the model's init).
        modules: module names or regexes (full match) to record; default every weight layer (Linear,
            Conv, Embedding, Hugging Face ``Conv1D``), as the ``CoordCheck`` callback.

    Returns:
        A :class:`CoordCheckResult`. The caller's RNG streams are not advanced.

    Example::

        result = coord_check(lambda w: MLP(width=w), widths=[64, 128, 256], batch=(x, y), steps=3)
        result.slopes()  # per-module log-log slopes of the coordinate size in width
    """
    if not widths:
        raise ValueError("coord_check: give at least one width")
    if steps < 1 or seeds < 1:
        raise ValueError(f"coord_check: steps and seeds must be >= 1, got steps={steps}, seeds={seeds}")
    result = CoordCheckResult()
    grid = [(w, d) for w in widths for d in (depths if depths is not None else [None])]
    with torch.random.fork_rng(devices=[]):
        for width, depth in grid:
            for seed in range(seeds):
                torch.manual_seed(seed)
                built = module_factory(width) if depth is None else module_factory(width, depth)
                model, optimizer = built if isinstance(built, tuple) else (built, None)
                if optimizer is None:
                    optimizer = optimizer_factory(model) if optimizer_factory else _configure(model)
                _run_one(model, _first_optimizer(optimizer), batch, width, depth, seed, steps, loss_fn, modules, result)
    return result


def _run_one(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: Any, width: int, depth: int | None, seed: int,
    steps: int, loss_fn: Callable[[Any, Any], torch.Tensor] | None, patterns: Sequence[str] | None,
    result: CoordCheckResult,
) -> None:  # fmt: skip
    chosen = select_modules(model, patterns, "weights", owner="coord_check(modules=...)")
    if not result.modules:
        result.modules = list(chosen)
    model.train()
    loss_of = ProbeLoss(model) if loss_fn is None else (lambda b: loss_fn(model(b[0]), b[1]))
    first: dict[str, torch.Tensor] = {}
    for t in range(1, steps + 1):
        with captured_outputs(chosen) as store:
            loss = loss_of(batch)
        for name, out in store.items():
            h = out.detach().float()
            first.setdefault(name, h)
            stats = coordinate_stats(h, first[name])
            result.records.append(
                {"width": width, "depth": depth, "seed": seed, "step": t, "module": name, **stats, "loss": loss.item()}
            )
        if t < steps:
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def coordinate_stats(h: torch.Tensor, h0: torch.Tensor) -> dict[str, float]:
    """The coordinate statistics of a layer output ``h`` against its first value ``h0``: ``l1 = mean|h|``,
    ``rms``, ``delta_rms = rms(h − h0)`` and ``delta = ‖h − h0‖ / ‖h0‖`` (what ``CoordCheck`` logs as
    ``coord/delta``; 0 when ``h0`` is 0)."""
    change, base = (h - h0).pow(2).sum(), h0.pow(2).sum()
    return {
        "l1": h.abs().mean().item(),
        "rms": h.pow(2).mean().sqrt().item(),
        "delta_rms": (change / h.numel()).sqrt().item(),
        "delta": (change / base).sqrt().item() if base > 0 else 0.0,
    }


def _configure(model: nn.Module) -> Any:
    if not hasattr(model, "configure_optimizers"):
        raise ValueError("coord_check: pass `optimizer_factory` (the model has no configure_optimizers)")
    return model.configure_optimizers()


def _first_optimizer(out: Any) -> torch.optim.Optimizer:
    if isinstance(out, torch.optim.Optimizer):
        return out
    if isinstance(out, Mapping):
        return _first_optimizer(out.get("optimizer"))
    if isinstance(out, (list, tuple)) and out:
        return _first_optimizer(out[0])
    raise ValueError(f"coord_check: cannot find an optimizer in {type(out).__name__}")
