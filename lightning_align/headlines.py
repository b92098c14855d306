"""Headline values: the few numbers per family worth seeing in the terminal.

Every measurement callback logs many tags (one per layer and quantity). For the progress bar and the
end-of-fit summary table a short, fixed set is enough: ``lr·λmax`` against the stability threshold, the
worst alignment over layers, the spread of effective learning rates, and so on. Each callback class declares
its own (``headlines`` class attribute); each is a regex over tags plus a reduction over the layers it matches
(``min``/``max``/``mean``), computed from the metrics of *one* measurement (all layers of a family arrive
together). :func:`suite_headlines` gathers the suite's.

A callback that declares none (e.g. a user's own :class:`MeasurementCallback` subclass) gets every layer-less
tag ``<family>/<what>`` as its headlines, so nothing is hidden by omission.
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


def suite_headlines() -> tuple[Headline, ...]:
    """The headlines every callback of the suite declares (``headlines`` class attribute), in table order.

    Example:
        >>> [h.bar for h in suite_headlines() if h.bar]
        ['lr*eig', 'min_cos', 'elr_spread']
    """
    from lightning_align import callbacks  # the callbacks declare them; imported on first use

    order = (callbacks.Sharpness, callbacks.NTKSpectrum, callbacks.FeatureAlignment, callbacks.EffectiveLR,
             callbacks.ELRWarmup, callbacks.RankMonitor, callbacks.CoordCheck)  # fmt: skip
    return tuple(dict.fromkeys(h for cls in order for h in cls.headlines))


def __getattr__(name: str) -> object:
    if name == "HEADLINES":  # the suite's headlines, gathered from the callback classes
        return suite_headlines()
    if name == "KNOWN_FAMILIES":
        return frozenset(h.family for h in suite_headlines())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def headline_values(
    metrics: Mapping[str, float], headlines: Iterable[Headline] | None = None
) -> dict[tuple[str, str], float]:
    """Headline values found in one measurement's metrics, keyed by ``(family, label)``.

    ``headlines``: those to look for (default: the suite's). Layer-less tags (``<family>/<what>``) of families
    none of them covers (e.g. a user's own callback) are kept as they are, labelled by ``<what>``.

    Example:
        >>> headline_values({"elr/spread": 4.0, "elr/fc1": 0.1, "norm/total": 2.0})
        {('elr', 'ELR spread (max/min)'): 4.0, ('norm', 'total'): 2.0}
    """
    headlines = suite_headlines() if headlines is None else tuple(headlines)
    known = {h.family for h in headlines} | {h.family for h in suite_headlines()}
    out: dict[tuple[str, str], float] = {}
    for h in headlines:
        v = h.value(metrics)
        if v is not None:
            out[(h.family, h.label)] = v
    for name, v in metrics.items():
        parts = name.split("/")
        if len(parts) == 2 and parts[0] not in known:
            out[(parts[0], parts[1])] = float(v)
    return out


def progress_bar_values(metrics: Mapping[str, float], headlines: Iterable[Headline] | None = None) -> dict[str, float]:
    """The short progress-bar entries (``Headline.bar``) found in one measurement's metrics.

    Example:
        >>> progress_bar_values({"sharpness/lr_x_max_eig": 1.5, "sharpness/max_eig": 15.0})
        {'lr*eig': 1.5}
    """
    out: dict[str, float] = {}
    for h in suite_headlines() if headlines is None else headlines:
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

    def add(self, step: int, metrics: Mapping[str, float], headlines: Iterable[Headline] | None = None) -> None:
        """Record the headline values (of ``headlines``, default the suite's) found in ``metrics`` at ``step``."""
        for key, v in headline_values(metrics, headlines).items():
            if key in self.records:
                self.records[key].update(step, v)
            else:
                self.records[key] = HeadlineRecord(step, v, step, v)

    def clear(self) -> None:
        """Forget everything (a new fit starts)."""
        self.records.clear()
