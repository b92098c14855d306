"""Where measurements go: scalars to every attached logger, spectra and figures to TensorBoard.

Scalars are written with ``logger.log_metrics`` on every attached logger (TensorBoard, CSV, ...),
at ``trainer.global_step``, so they work in any hook and are never throttled or all-reduced behind
the user's back. They are also put in ``trainer.callback_metrics`` so the progress bar, early
stopping, checkpointing and tests can read them. Histograms, figures and text need TensorBoard and
are skipped (once, with a note) when no TensorBoard logger is attached.

Tags follow ``<family>/<what>[/<layer>]`` (listed in docs/design.md); :func:`tag` builds them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.loggers import TensorBoardLogger
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


# In a private module, so the CLI does not offer it as a logger (it keeps values in memory, for scripts).
from lightning_align._memory_logger import MemoryLogger  # noqa: E402

__all__ = ["MemoryLogger", "log_figure", "log_histogram", "log_scalars", "log_text", "markdown_table", "new_figure", "tag", "tensorboard_writers"]
