"""When a measurement runs: predicates on ``trainer.global_step``.

Schedules are kept apart from quantities (as in f-dangel/cockpit) so every callback shares them. A
step counter that counts optimizer steps (``global_step``) makes them independent of gradient
accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
