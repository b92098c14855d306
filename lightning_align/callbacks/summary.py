"""AlignSummary: configure the terminal view of the measurement suite (progress bar, end-of-fit table)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from typing_extensions import override

from lightning_align.arguments import checked_init
from lightning_align.headlines import HeadlineHistory
from lightning_align.logging import guarded_write
from lightning_align.summary import TITLE, SummaryStyle, print_summary


class AlignSummary(Callback):
    """The suite's terminal view: headline values in the progress bar and a first -> last table at the end.

    Every :class:`~lightning_align.MeasurementCallback` already does this by default: each one puts its
    headline values (``lr*eig``: ``lr·λmax``, ``min_cos``: the worst alignment over layers,
    ``elr_spread``: max/min effective LR) in ``trainer.progress_bar_metrics``, and at the end of
    ``fit`` (also an interrupted one) the first measurement callback prints one table for all of them
    (rank zero only; first = the first measurement of this fit, also after a resume). Attach
    ``AlignSummary`` to change that: turn the progress-bar values or the table off, or force plain text.

    Args:
        progress_bar: show the headline values in the progress bar.
        table: print the end-of-fit summary table.
        style: ``"auto"`` (rich when installed), ``"rich"`` or ``"plain"``.

    Attributes:
        text: the last table printed, as plain text (``None`` before the end of fit or with nothing measured).

    Example::

        trainer = Trainer(callbacks=[Sharpness(every_n_steps=50), AlignSummary(style="plain")])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.AlignSummary
              init_args: {progress_bar: false}
    """

    @checked_init
    def __init__(self, progress_bar: bool = True, table: bool = True, style: SummaryStyle = "auto") -> None:
        self.progress_bar = progress_bar
        self.table = table
        self.style = style
        self.text: str | None = None

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # teardown, not on_fit_end: after the TQDM bar has closed, and also after an interrupted fit.
        if stage == "fit" and self.table:
            self.text = print_fit_summary(trainer, self.style, owner="AlignSummary")


def find_summary(trainer: pl.Trainer) -> AlignSummary | None:
    """The attached :class:`AlignSummary`, if any."""
    for cb in trainer.callbacks:
        if isinstance(cb, AlignSummary):
            return cb
    return None


def print_fit_summary(trainer: pl.Trainer, style: SummaryStyle = "auto", owner: str | None = None) -> str | None:
    """Merge the headline histories of every attached measurement callback and print them (rank zero); printing
    that fails (a closed terminal, ...) warns once naming ``owner`` and the fit ends as it would without it."""
    merged = HeadlineHistory()
    for cb in trainer.callbacks:
        history: Any = getattr(cb, "headline_history", None)
        if isinstance(history, HeadlineHistory):
            for key, record in history.records.items():
                merged.records.setdefault(key, record)
    if not trainer.is_global_zero:
        return None
    text = None
    with guarded_write(trainer, owner, "summary table", TITLE, "the terminal"):
        text = print_summary(merged.records, style)
        notes = postponement_notes(trainer.callbacks)
        if text is not None and notes:
            print(notes)
            text += "\n" + notes
    return text


def postponement_notes(callbacks: list[Any]) -> str:
    """One line per callback whose overhead budget postponed measurements in this run (``max_overhead``)."""
    lines = []
    for cb in callbacks:
        budget = getattr(cb, "budget", None)
        if budget is not None and budget.postponed:
            lines.append(
                f"{type(cb).__name__}: {budget.postponed} scheduled measurement(s) postponed to keep its measurements "
                f"under {budget.share_text} of training time (max_overhead; {cb.budget_remedy()})"
            )
    return "\n".join(lines)
