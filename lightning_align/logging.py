"""Where measurements go: scalars to every attached logger, spectra and figures to TensorBoard.

Scalars are written with ``logger.log_metrics`` on every attached logger (TensorBoard, CSV, ...),
at ``trainer.global_step``, so they work in any hook and are never throttled or all-reduced behind
the user's back. They are also put in ``trainer.callback_metrics`` so the progress bar, early
stopping, checkpointing and tests can read them. Histograms, figures and text need TensorBoard and
are skipped (once, with a note) when no TensorBoard logger is attached.

Tags follow ``<family>/<what>[/<layer>]`` (see ``DESIGN.md`` section 3); :func:`tag` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

if TYPE_CHECKING:
    import lightning.pytorch as pl
    from matplotlib.figure import Figure


def tag(family: str, what: str, layer: str | None = None) -> str:
    """Build a tag ``family/what[/layer]``.

    Example:
        >>> tag("rank", "weight_stable", "blocks.0.fc")
        'rank/weight_stable/blocks.0.fc'
    """
    return f"{family}/{what}" if layer is None else f"{family}/{what}/{layer}"


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu().item())
    return float(value)


def log_scalars(trainer: pl.Trainer, metrics: Mapping[str, Any], step: int | None = None) -> dict[str, float]:
    """Log scalar metrics to every attached logger and to ``trainer.callback_metrics``.

    Non-finite values are logged as they are (NaN is information), with one warning per call naming them.

    Returns:
        The metrics as plain floats.
    """
    step = trainer.global_step if step is None else step
    values = {name: _as_float(v) for name, v in metrics.items()}
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        shown = ", ".join(f"{n}={values[n]}" for n in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        rank_zero_warn(f"lightning_align: non-finite values at step {step} ({shown}); logged as they are, training goes on.")
    for logger in trainer.loggers:
        logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    return values


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of each attached TensorBoard logger (rank 0 only; empty elsewhere)."""
    if not trainer.is_global_zero:
        return []
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_histogram(trainer: pl.Trainer, name: str, values: torch.Tensor | Sequence[float], step: int | None = None) -> None:
    """Log a distribution (e.g. a spectrum) as a TensorBoard histogram."""
    writers = tensorboard_writers(trainer)
    if not writers:
        return
    data = torch.as_tensor(values).detach().float().cpu().flatten()
    data = data[torch.isfinite(data)]
    if data.numel() == 0:
        return
    for w in writers:
        w.add_histogram(name, data, global_step=trainer.global_step if step is None else step)


def log_figure(trainer: pl.Trainer, name: str, figure: Figure, step: int | None = None) -> None:
    """Log a matplotlib figure to TensorBoard, then close it (it is closed even with no TensorBoard)."""
    import matplotlib.pyplot as plt

    writers = tensorboard_writers(trainer)
    for w in writers:
        w.add_figure(name, figure, global_step=trainer.global_step if step is None else step, close=False)
    plt.close(figure)


def log_text(trainer: pl.Trainer, name: str, text: str, step: int | None = None) -> None:
    """Log markdown text (e.g. a table) to TensorBoard."""
    for w in tensorboard_writers(trainer):
        w.add_text(name, text, global_step=trainer.global_step if step is None else step)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (TensorBoard's text plugin renders it).

    Example:
        >>> print(markdown_table(["a", "b"], [[1, 2]]))
        | a | b |
        | --- | --- |
        | 1 | 2 |
    """
    lines = ["| " + " | ".join(map(str, header)) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def new_figure(width: float = 5.0, height: float = 3.5) -> tuple[Figure, Any]:
    """A headless matplotlib figure and axes (Agg backend; no display needed), laid out so nothing is clipped."""
    from matplotlib.figure import Figure as _Figure

    fig = _Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot(1, 1, 1)


class MemoryLogger(Logger):
    """A logger that keeps every ``log_metrics`` call in memory, to read logged values back in scripts and tests.

    Example:
        >>> log = MemoryLogger()
        >>> log.log_metrics({"elr/spread": 3.0}, step=1)
        >>> log.log_metrics({"elr/spread": 2.0, "elr/critical_lr": 0.5}, step=2)
        >>> log.values("elr/spread"), log.by_step("elr/critical_lr"), log.at(2, "elr/")
        ([3.0, 2.0], {2: 0.5}, {'elr/spread': 2.0, 'elr/critical_lr': 0.5})
    """

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, tag: str) -> list[tuple[int | None, float]]:
        """``(step, value)`` of every logged value of ``tag``, in logging order."""
        return [(s, m[tag]) for s, m in self.rows if tag in m]

    def values(self, tag: str) -> list[float]:
        """The logged values of ``tag``, in logging order."""
        return [v for _, v in self.series(tag)]

    def by_step(self, tag: str) -> dict[int, float]:
        """``{step: value}`` of ``tag`` (the last value logged at a step wins)."""
        return {int(s or 0): v for s, v in self.series(tag)}

    def at(self, step: int, prefix: str = "") -> dict[str, float]:
        """Every metric starting with ``prefix`` logged at ``step``."""
        out: dict[str, float] = {}
        for s, m in self.rows:
            if s == step:
                out.update({k: v for k, v in m.items() if k.startswith(prefix)})
        return out
