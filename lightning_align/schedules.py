"""When a measurement runs: predicates on ``trainer.global_step``.

Schedules are kept apart from quantities (as in f-dangel/cockpit) so every callback shares them. A
step counter that counts optimizer steps (``global_step``) makes them independent of gradient
accumulation. An :class:`OverheadBudget` postpones scheduled measurements that would cost more than a share of
the fit's time (``max_overhead``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal, Union

from lightning_align.arguments import Bound

ScheduleName = Literal["linear", "log"]


@dataclass(frozen=True)
class StepSchedule:
    """Which optimizer steps a measurement runs at.

    Args:
        every_n_steps: run every this many optimizer steps (and at step 0, before training).
        schedule: ``"linear"`` runs at multiples of ``every_n_steps``; ``"log"`` also runs at the powers
            of two below ``every_n_steps`` (1, 2, 4, ...), where early training changes fastest.

    Example:
        >>> s = StepSchedule(every_n_steps=10, schedule="log")
        >>> [t for t in range(25) if s.is_due(t)]
        [0, 1, 2, 4, 8, 10, 20]
    """

    every_n_steps: int = 100
    schedule: ScheduleName = "linear"

    def __post_init__(self) -> None:
        if not isinstance(self.every_n_steps, int) or isinstance(self.every_n_steps, bool):
            raise TypeError(f"every_n_steps must be an int, got {self.every_n_steps!r}")
        if self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}: use 1 to measure at every step")
        if self.schedule not in ("linear", "log"):
            raise ValueError(f"schedule must be 'linear' or 'log', got {self.schedule!r}")

    def is_due(self, step: int) -> bool:
        """Whether the measurement runs after optimizer step ``step`` (0 = before training)."""
        if step % self.every_n_steps == 0:
            return True
        return self.schedule == "log" and step < self.every_n_steps and step & (step - 1) == 0


#: ``max_overhead="auto"``: a measuring callback left at its default schedule keeps its measurements under this
#: share of the fit's wall time (the six measuring callbacks together: under 2%).
DEFAULT_MAX_OVERHEAD = 0.003
#: A callback's ``max_overhead``: a share of the fit's wall time, ``"auto"`` or ``None`` (a fixed schedule).
MaxOverhead = Union[
    Annotated[float, Bound(0, 1, low_open=True, note="a share of training time: 0.01 = 1%")], Literal["auto"], None
]
#: The clock a budget reads (a module attribute, so that tests can replace it with a counter).
clock: Callable[[], float] = time.perf_counter


@dataclass
class OverheadBudget:
    """Keeps one callback's measurements under ``share`` of the fit's wall time.

    A scheduled measurement runs only if the seconds spent measuring so far plus the last measurement's cost stay
    within ``share`` of the seconds spent on everything else (training, data, other callbacks); otherwise it is
    postponed to the next scheduled step. The measurement before training (step 0: cold, with the callback's
    one-off preparation) and a ``log`` schedule's early steps always run and are left out of the account
    (:meth:`exclude`), so the first scheduled measurement after them runs too and the recurring cost stays within
    ``share``. Seconds carry over a resume.
    """

    share: float
    spent: float = 0.0
    last_cost: float = 0.0
    excluded: float = 0.0
    elapsed_before: float = 0.0
    postponed: int = 0
    started: float | None = field(default=None, repr=False)

    @property
    def share_text(self) -> str:
        """The share as a percentage for messages ("0.3%")."""
        return f"{100 * self.share:.3g}%"

    def start(self) -> None:
        """The fit's clock starts (``on_fit_start``)."""
        self.started = clock()

    def elapsed(self) -> float:
        """Seconds of fit so far, over resumes."""
        return self.elapsed_before + (clock() - self.started if self.started is not None else 0.0)

    def allows_next(self) -> bool:
        """Whether one more measurement as dear as the last keeps the measuring time within ``share`` of the rest."""
        return self.spent + self.last_cost <= self.share * (self.elapsed() - self.excluded - self.spent)

    def charge(self, seconds: float) -> None:
        """A measurement that counts against the budget took ``seconds``."""
        self.spent += seconds
        self.last_cost = seconds

    def exclude(self, seconds: float) -> None:
        """Seconds of one-off work (step 0) counted neither as measuring nor as training."""
        self.excluded += seconds

    def state_dict(self) -> dict[str, float]:
        return {"spent": self.spent, "last_cost": self.last_cost, "excluded": self.excluded, "elapsed": self.elapsed(),
                "postponed": self.postponed}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.spent, self.last_cost, self.excluded = float(state["spent"]), float(state["last_cost"]), float(state["excluded"])
        self.elapsed_before, self.postponed = float(state["elapsed"]), int(state["postponed"])
