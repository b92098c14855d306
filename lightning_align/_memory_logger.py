"""MemoryLogger: logged values kept in memory, to read them back in scripts and tests.

A private module (the leading underscore keeps the CLI from offering it among the loggers); import it as
``lightning_align.logging.MemoryLogger``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import Logger


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
