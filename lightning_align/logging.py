"""Where measurements go: scalars to every attached logger, spectra and figures to TensorBoard.

Scalars are written with ``logger.log_metrics`` on every attached logger (TensorBoard, CSV, ...),
at ``trainer.global_step``, so they work in any hook and are never throttled or all-reduced behind
the user's back. They are also put in ``trainer.callback_metrics`` so the progress bar, early
stopping, checkpointing and tests can read them. Histograms, figures and text need TensorBoard and
are skipped when no TensorBoard logger is attached.

Measuring never kills training: any value (huge, infinite, NaN, all equal, none) is written as far as it means
something (a histogram of the finite values, clipped to float32's range; NaN scalars as they are), and a writer that
fails (a full disk, a logger's bug) costs one warning per callback and kind of write, naming the tag and the error;
training goes on as it would without the suite.

Tags follow ``<family>/<what>[/<layer>]`` (listed in docs/design.md); :func:`tag` builds them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

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


#: Who writes when no callback is named (e.g. a script calling these functions).
SUITE = "lightning_align"
#: The largest float32: histogram and figure values are clipped to it (TensorBoard stores float32).
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
#: The edge of TensorBoard's default histogram buckets; wider data gets buckets over its own range.
_TB_BUCKETS_MAX = 1e20
_reported: weakref.WeakKeyDictionary[Any, set[tuple[str, str]]] = weakref.WeakKeyDictionary()
_owner: contextvars.ContextVar[str] = contextvars.ContextVar("lightning_align_writer", default=SUITE)


def callback_name(callback: Any) -> str:
    """A callback's name in messages: its class, and its ``name`` when set."""
    name = getattr(callback, "name", None)
    return f"{type(callback).__name__}(name={name!r})" if name else type(callback).__name__


@contextlib.contextmanager
def writing_as(owner: str) -> Iterator[None]:
    """Writes inside are ``owner``'s (named when one fails) unless a call names another: the measurement
    callbacks' hooks run their measurements inside."""
    token = _owner.set(owner)
    try:
        yield
    finally:
        _owner.reset(token)


def first_time(trainer: Any, owner: str, kind: str) -> bool:
    """Whether ``owner`` has not yet reported ``kind`` in this trainer's fits (and mark it reported)."""
    seen = _reported.setdefault(trainer, set())
    if (owner, kind) in seen:
        return False
    seen.add((owner, kind))
    return True


@contextlib.contextmanager
def guarded_write(trainer: Any, owner: str | None, kind: str, name: str, sink: str = "TensorBoard") -> Iterator[None]:
    """Run one write; an exception becomes a warning (once per ``owner`` and ``kind``), never a failed fit."""
    owner = owner or _owner.get()
    try:
        yield
    except Exception as err:  # noqa: BLE001  (a measurement's output must never stop training)
        if first_time(trainer, owner, f"failed {kind}"):
            cause = err.__cause__ or err  # Lightning's TensorBoardLogger re-raises a writer's error as a ValueError
            rank_zero_warn(
                f"{owner}: writing the {kind} {name!r} to {sink} failed ({type(cause).__name__}: {cause}); training goes "
                f"on without it, and later failed {kind} writes of {owner} are skipped without a word."
            )


def _as_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().cpu().item())
    return float(value)


def log_scalars(
    trainer: pl.Trainer, metrics: Mapping[str, Any], step: int | None = None, *, owner: str | None = None
) -> dict[str, float]:
    """Log scalar metrics to every attached logger and to ``trainer.callback_metrics``.

    Non-finite values are logged as they are (NaN is information), with one warning per call naming them. A logger
    that fails warns once per ``owner`` (see :func:`guarded_write`).

    Returns:
        The metrics as plain floats.
    """
    step = trainer.global_step if step is None else step
    values: dict[str, float] = {}
    for name, v in metrics.items():
        with guarded_write(trainer, owner, "scalar", name, "any logger (not a number)"):
            values[name] = _as_float(v)
    bad = [name for name, v in values.items() if not math.isfinite(v)]
    if bad:
        shown = ", ".join(f"{n}={values[n]}" for n in bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        source = owner or _owner.get()
        by = "" if source == SUITE else f" from {source}"
        rank_zero_warn(f"lightning_align: non-finite values at step {step} ({shown}){by}; logged as they are, training goes on.")
    for logger in trainer.loggers:
        with guarded_write(trainer, owner, "scalar", next(iter(values), ""), type(logger).__name__):
            logger.log_metrics(values, step=step)
    trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
    return values


def tensorboard_writers(trainer: pl.Trainer, owner: str | None = None) -> list[Any]:
    """The ``SummaryWriter`` of each attached TensorBoard logger (rank 0 only; empty elsewhere); one that cannot be
    made (e.g. its directory cannot be created) is left out with a warning."""
    if not trainer.is_global_zero:
        return []
    writers = []
    for lg in trainer.loggers:
        if isinstance(lg, TensorBoardLogger):
            with guarded_write(trainer, owner, "writer", str(getattr(lg, "log_dir", "")), "TensorBoardLogger"):
                writers.append(lg.experiment)
    return writers


def histogram_data(values: torch.Tensor | Sequence[float]) -> tuple[np.ndarray, Any] | None:
    """The finite values as float64, clipped to float32's range, and the buckets that hold them: TensorBoard's
    default (``"tensorflow"``) within ±1e20, 30 equal buckets over the data's range beyond; ``None`` when no value
    is finite.

    Example:
        >>> data, bins = histogram_data([1e30, float("nan"), 2e30, float("inf")])
        >>> data.tolist(), len(bins)
        ([1e+30, 2e+30], 31)
    """
    if isinstance(values, torch.Tensor):
        data = values.detach().double().cpu().flatten().numpy()
    else:
        data = np.asarray(values, dtype=np.float64).ravel()
    data = np.clip(data[np.isfinite(data)], -FLOAT32_MAX, FLOAT32_MAX)
    if data.size == 0:
        return None
    low, high = float(data.min()), float(data.max())
    if max(-low, high) <= _TB_BUCKETS_MAX:
        return data, "tensorflow"
    if low == high:
        low, high = low - abs(low) * 1e-6, high + abs(high) * 1e-6
    return data, np.linspace(low, high, 31)


def log_histogram(
    trainer: pl.Trainer, name: str, values: torch.Tensor | Sequence[float], step: int | None = None, *, owner: str | None = None
) -> None:
    """Log a distribution (e.g. a spectrum) as a TensorBoard histogram of its finite values (see
    :func:`histogram_data`); with none finite, nothing is written (said once per ``owner``)."""
    owner = owner or _owner.get()
    writers = tensorboard_writers(trainer, owner)
    if not writers:
        return
    prepared = None
    with guarded_write(trainer, owner, "histogram", name):
        prepared = histogram_data(values)
        if prepared is None and first_time(trainer, owner, "empty histogram"):
            rank_zero_info(f"{owner}: no finite value for the histogram {name!r} at step {trainer.global_step}; not written.")
    if prepared is None:
        return
    data, bins = prepared
    for w in writers:
        with guarded_write(trainer, owner, "histogram", name):
            w.add_histogram(name, data, global_step=trainer.global_step if step is None else step, bins=bins)


def log_figure(
    trainer: pl.Trainer, name: str, figure: Figure | Callable[[], Figure], step: int | None = None, *, owner: str | None = None
) -> None:
    """Log a matplotlib figure to TensorBoard, then close it (it is closed even with no TensorBoard).

    ``figure`` may be a function drawing it: it is then drawn only when a TensorBoard logger is attached, and an
    error while drawing is a warning (once per ``owner``), like an error while writing.
    """
    import matplotlib.pyplot as plt

    writers = tensorboard_writers(trainer, owner)
    drawn = figure if not callable(figure) else None
    if writers:
        with guarded_write(trainer, owner, "figure", name):
            drawn = figure() if callable(figure) else figure
            for w in writers:
                with guarded_write(trainer, owner, "figure", name):
                    w.add_figure(name, drawn, global_step=trainer.global_step if step is None else step, close=False)
    if drawn is not None:
        plt.close(drawn)


def log_text(trainer: pl.Trainer, name: str, text: str, step: int | None = None, *, owner: str | None = None) -> None:
    """Log markdown text (e.g. a table) to TensorBoard."""
    for w in tensorboard_writers(trainer, owner):
        with guarded_write(trainer, owner, "text", name):
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

__all__ = [
    "MemoryLogger", "callback_name", "guarded_write", "histogram_data", "writing_as", "log_figure", "log_histogram", "log_scalars", "log_text",
    "markdown_table", "new_figure", "tag", "tensorboard_writers",
]
