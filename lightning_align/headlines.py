"""Headline values: the few numbers per family worth seeing in the terminal.

Every measurement callback logs many tags (one per layer and quantity). For the progress bar and the
end-of-fit summary table a short, fixed set is enough: ``lr·λmax`` against the stability threshold, the
worst alignment over layers, the spread of effective learning rates, and so on. :data:`HEADLINES` lists
them; each is a regex over tags plus a reduction over the layers it matches (``min``/``max``/``mean``),
computed from the metrics of *one* measurement (all layers of a family arrive together).

A family with no entry in :data:`HEADLINES` (e.g. a user's own :class:`MeasurementCallback` subclass)
gets every layer-less tag ``<family>/<what>`` as its headlines, so nothing is hidden by omission.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

Reduce = Literal["value", "min", "max", "mean"]


@dataclass(frozen=True)
class Headline:
    """One headline value: a tag regex (full match) and a reduction over the tags it matches.

    Args:
        family: tag family (``sharpness``, ``ntk``, ``align``, ``elr``, ``rank``, ``coord``, ...).
        label: name in the summary table.
        pattern: regular expression that must match the whole tag.
        reduce: ``"value"`` (a single tag), or ``"min"``/``"max"``/``"mean"`` over per-layer tags.
        bar: short key shown in the progress bar, or ``None`` for the summary table only.

    Example:
        >>> h = Headline("align", "min cos over layers", r"align/cos/.+", "min", bar="min_cos")
        >>> h.value({"align/cos/fc1": 0.5, "align/cos/fc2": 0.25, "align/speed/fc1": 3.0})
        0.25
    """

    family: str
    label: str
    pattern: str
    reduce: Reduce = "value"
    bar: str | None = None

    def value(self, metrics: Mapping[str, float]) -> float | None:
        """The reduced value over the matching tags of ``metrics`` (``None`` if no tag matches).

        Non-finite values are ignored by ``min``/``max``/``mean`` unless every value is non-finite.
        """
        regex = re.compile(self.pattern)
        values = [float(v) for k, v in metrics.items() if regex.fullmatch(k)]
        if not values:
            return None
        if self.reduce == "value":
            return values[0]
        finite = [v for v in values if math.isfinite(v)] or values
        if self.reduce == "min":
            return min(finite)
        if self.reduce == "max":
            return max(finite)
        return sum(finite) / len(finite)


#: The headline values of each family of the suite (order = order in the summary table).
HEADLINES: tuple[Headline, ...] = (
    Headline("sharpness", "λmax (top Hessian eigenvalue)", r"sharpness/max_eig"),
    Headline("sharpness", "lr·λmax", r"sharpness/lr_x_max_eig", bar="lr*eig"),
    Headline("sharpness", "lr·λmax / threshold", r"sharpness/eos_ratio"),
    Headline("ntk", "NTK max eigenvalue", r"ntk/max_eig"),
    Headline("ntk", "NTK condition number", r"ntk/cond"),
    Headline("ntk", "NTK distance from init", r"ntk/distance_from_init"),
    Headline("ntk", "kernel-target alignment", r"ntk/alignment"),
    Headline("align", "min cos over layers", r"align/cos/.+", "min", bar="min_cos"),
    Headline("align", "mean feature speed", r"align/speed/.+", "mean"),
    Headline("elr", "ELR spread (max/min)", r"elr/spread", bar="elr_spread"),
    Headline("elr", "critical LR", r"elr/critical_lr"),
    Headline("elr", "lr / critical LR", r"elr/lr_over_critical"),
    Headline("elr", "warm-up factor", r"elr/warmup_factor"),
    Headline("rank", "min weight stable rank", r"rank/weight_stable/.+", "min"),
    Headline("rank", "min repr. effective rank", r"rank/repr_effective/.+", "min"),
    Headline("coord", "max activation RMS", r"coord/rms/.+", "max"),
    Headline("coord", "max change from init", r"coord/delta/.+", "max"),
)

KNOWN_FAMILIES = frozenset(h.family for h in HEADLINES)


def headline_values(metrics: Mapping[str, float], families: Iterable[str] | None = None) -> dict[tuple[str, str], float]:
    """Headline values found in one measurement's metrics, keyed by ``(family, label)``.

    Tags of families without an entry in :data:`HEADLINES` are kept as they are when layer-less
    (``<family>/<what>``), labelled by ``<what>``.

    Example:
        >>> headline_values({"elr/spread": 4.0, "elr/fc1": 0.1, "norm/total": 2.0})
        {('elr', 'ELR spread (max/min)'): 4.0, ('norm', 'total'): 2.0}
    """
    wanted = None if families is None else set(families)
    out: dict[tuple[str, str], float] = {}
    for h in HEADLINES:
        if wanted is not None and h.family not in wanted:
            continue
        v = h.value(metrics)
        if v is not None:
            out[(h.family, h.label)] = v
    for name, v in metrics.items():
        parts = name.split("/")
        if len(parts) == 2 and parts[0] not in KNOWN_FAMILIES and (wanted is None or parts[0] in wanted):
            out[(parts[0], parts[1])] = float(v)
    return out


def progress_bar_values(metrics: Mapping[str, float]) -> dict[str, float]:
    """The short progress-bar entries (``Headline.bar``) found in one measurement's metrics.

    Example:
        >>> progress_bar_values({"sharpness/lr_x_max_eig": 1.5, "sharpness/max_eig": 15.0})
        {'lr*eig': 1.5}
    """
    out: dict[str, float] = {}
    for h in HEADLINES:
        if h.bar is not None:
            v = h.value(metrics)
            if v is not None:
                out[h.bar] = v
    return out


@dataclass
class HeadlineRecord:
    """First and last value of one headline over a fit, with the steps they were measured at.

    Example:
        >>> r = HeadlineRecord(0, 1.0, 0, 1.0)
        >>> r.update(10, 3.0); (r.first, r.last, r.last_step)
        (1.0, 3.0, 10)
    """

    first_step: int
    first: float
    last_step: int
    last: float

    def update(self, step: int, value: float) -> None:
        """Record a later measurement."""
        self.last_step, self.last = step, value


class HeadlineHistory:
    """First and last value of each headline, fed with each measurement's metrics.

    Example:
        >>> hist = HeadlineHistory()
        >>> hist.add(0, {"elr/spread": 2.0}); hist.add(5, {"elr/spread": 8.0})
        >>> hist.records[("elr", "ELR spread (max/min)")].last
        8.0
    """

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], HeadlineRecord] = {}

    def add(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record the headline values found in ``metrics`` measured at ``step``."""
        for key, v in headline_values(metrics).items():
            if key in self.records:
                self.records[key].update(step, v)
            else:
                self.records[key] = HeadlineRecord(step, v, step, v)

    def clear(self) -> None:
        """Forget everything (a new fit starts)."""
        self.records.clear()
