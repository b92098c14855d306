"""``lightning-align report``: a self-contained HTML page (and PNGs) from runs' TensorBoard event files.

Usage::

    lightning-align report LOGDIR [LOGDIR ...] [--out DIR] [--criterion C] [--max-detail-runs N]

Each ``LOGDIR`` is a run directory (a ``TensorBoardLogger`` ``log_dir``, e.g.
``lightning_logs/version_0``) or any directory above runs (all runs under it are read). Several runs
are compared side by side (curves overlaid, one colour per run); runs that differ in a learning rate
(a sweep) also get the transfer analysis. The page is ``DIR/report.html`` (default: ``LOGDIR/report``
for one ``LOGDIR``, ``./report`` otherwise), its figures ``DIR/NN-*.png``; it opens without a server
or network.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_align.report.events import Run, load_run, load_runs

__all__ = ["Run", "load_run", "load_runs", "main", "write_report"]


def write_report(paths: Sequence[Path | str], out: Path | str, criterion: str = "mean", max_detail_runs: int = 6,
                 title: str | None = None) -> tuple[Path, list[str]]:
    """Write ``out/report.html`` (and its PNGs) for the runs at or under ``paths``; return its path and the verdicts."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from lightning_align.report.html import build

    runs = load_runs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("[0-9][0-9]-*.png"):  # figures of an earlier report in the same place
        old.unlink()
    text, verdicts = build(runs, out, criterion, max_detail_runs, title)
    page = out / "report.html"
    page.write_text(text, encoding="utf-8")
    return page, verdicts


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-align report``; returns the exit status."""
    p = argparse.ArgumentParser(prog="lightning-align report", description=__doc__.splitlines()[0].split(": ", 1)[-1], allow_abbrev=False)
    p.add_argument("logdirs", nargs="+", type=Path, help="run directories, or directories above runs")
    p.add_argument("--out", type=Path, default=None, help="output directory (default LOGDIR/report, or ./report for several)")
    p.add_argument("--criterion", default="mean", choices=("mean", "final", "best", "val_final", "val_best"),
                   help="loss that picks the optimum LR of a sweep (default mean: mean training loss over the run)")
    p.add_argument("--max-detail-runs", type=int, default=6, help="per-run sections only up to this many runs (default 6)")
    p.add_argument("--title", default=None, help="page title")
    opts = p.parse_args(list(sys.argv[2:] if argv is None else argv))
    out = opts.out or (opts.logdirs[0] / "report" if len(opts.logdirs) == 1 else Path("report"))
    try:
        page, verdicts = write_report(opts.logdirs, out, opts.criterion, opts.max_detail_runs, opts.title)
    except FileNotFoundError as err:
        print(f"lightning-align report: {err}", file=sys.stderr)
        return 2
    for line in verdicts:
        print(line)
    print(f"report: {page}")
    return 0
