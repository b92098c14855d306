"""The end-of-fit summary: one table, one row per headline value, first -> last.

Rendered with `rich <https://github.com/Textualize/rich>`_ when it is installed (Lightning's
``RichProgressBar`` uses it too) and as plain text otherwise. Printing is the caller's business
(rank zero only: see :class:`~lightning_align.callbacks.summary.AlignSummary`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

from lightning_align.headlines import HeadlineRecord, suite_headlines

SummaryStyle = Literal["auto", "rich", "plain"]
TITLE = "lightning_align: first -> last measurement"
HEADER = ("family", "quantity", "first", "last", "steps")



def format_value(v: float) -> str:
    """Compact number for the table: 4 significant digits.

    Example:
        >>> format_value(0.000123456), format_value(12.5), format_value(float("nan"))
        ('0.0001235', '12.5', 'nan')
    """
    if not math.isfinite(v):
        return str(v)
    return f"{v:.4g}"


def summary_rows(records: Mapping[tuple[str, str], HeadlineRecord]) -> list[tuple[str, str, str, str, str]]:
    """Rows ``(family, quantity, first, last, "first_step -> last_step")`` in the suite's family order.

    Example:
        >>> rows = summary_rows({("elr", "ELR spread (max/min)"): HeadlineRecord(0, 2.0, 50, 6.0)})
        >>> rows
        [('elr', 'ELR spread (max/min)', '2', '6', '0 -> 50')]
    """

    headlines = suite_headlines()
    order = {(h.family, h.label): i for i, h in enumerate(headlines)}
    family_order = {f: i for i, f in enumerate(dict.fromkeys(h.family for h in headlines))}

    def key(item: tuple[tuple[str, str], HeadlineRecord]) -> tuple[int, int, str]:
        (family, label), _ = item
        return (family_order.get(family, len(family_order)), order.get((family, label), len(order)), f"{family}/{label}")

    return [
        (family, label, format_value(r.first), format_value(r.last), f"{r.first_step} -> {r.last_step}")
        for (family, label), r in sorted(records.items(), key=key)
    ]


def format_summary(rows: Sequence[Sequence[str]]) -> str:
    """The summary as a plain-text table (the family is written once per group).

    Example:
        >>> print(format_summary([("elr", "ELR spread (max/min)", "2", "6", "0 -> 50")]))
        lightning_align: first -> last measurement
        family  quantity              first  last  steps
        ------  --------------------  -----  ----  -------
        elr     ELR spread (max/min)  2      6     0 -> 50
    """
    shown = [(r[0] if i == 0 or r[0] != rows[i - 1][0] else "", *r[1:]) for i, r in enumerate(rows)]
    widths = [max(len(str(c)) for c in col) for col in zip(HEADER, *shown)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [TITLE, line(HEADER), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in shown]
    return "\n".join(out)


def rich_available() -> bool:
    """Whether ``rich`` can be imported.

    Example:
        >>> isinstance(rich_available(), bool)
        True
    """
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def print_summary(records: Mapping[tuple[str, str], HeadlineRecord], style: SummaryStyle = "auto") -> str | None:
    """Print the summary table (nothing if there are no records); return the plain-text version.

    Args:
        records: first/last values per ``(family, label)`` (see :class:`~lightning_align.headlines.HeadlineHistory`).
        style: ``"rich"`` (a ``rich`` table), ``"plain"`` (text), ``"auto"`` (rich when installed).

    Example:
        >>> text = print_summary({("elr", "critical LR"): HeadlineRecord(0, 0.5, 9, 0.25)}, style="plain")
        lightning_align: first -> last measurement
        family  quantity     first  last  steps
        ------  -----------  -----  ----  ------
        elr     critical LR  0.5    0.25  0 -> 9
    """
    rows = summary_rows(records)
    if not rows:
        return None
    text = format_summary(rows)
    if style == "rich" or (style == "auto" and rich_available()):
        from rich.console import Console
        from rich.table import Table

        table = Table(title=TITLE, title_justify="left")
        for name in HEADER:
            table.add_column(name, justify="right" if name in ("first", "last") else "left", no_wrap=name != "quantity")
        previous = None
        for row in rows:
            table.add_row(row[0] if row[0] != previous else "", *row[1:], end_section=False)
            previous = row[0]
        Console().print(table)
    else:
        print(text)
    return text
