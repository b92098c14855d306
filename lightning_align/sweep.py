"""``lightning-align sweep``: run a config over a grid of values, one ordinary ``fit`` per point, then report.

Usage::

    lightning-align sweep --config CONFIG --grid KEY=V1,V2,... [--grid ...] [--seeds N] [--jobs N]
        [--reuse-processes] [--print-commands] [--out DIR] [--criterion C] [any fit argument ...]

Each grid point (the product of the ``--grid`` values, times ``--seeds`` seeds) is
``lightning-align fit --config CONFIG [fit arguments] --KEY=V ... --seed_everything=S`` with a
``TensorBoardLogger`` writing to ``DIR/<point>`` (``<point>`` names its values, e.g.
``scheme=mup_width=64_lr=0.001_seed=0``). Keys are LightningCLI's dotted keys
(``model.init_args.width``; ``trainer.callbacks.init_args.scheme`` sets the *last* callback of the
config's list). Values are literals or log-spaced ranges ``logspace(START,STOP,N)`` (``START``/``STOP``
as numbers or powers ``2^-10``), e.g. ``model.init_args.lr=logspace(2^-12,2^-4,9)``.

Every point and value is checked against the config's schema before anything runs; a key not in it
fails naming the nearest valid keys. A point is finished when its directory holds the marker
``sweep_done`` (written after the fit exits successfully, or after it diverged: a loss logged non-finite,
whether or not the fit then failed; the report counts its losses as infinite) or, lacking it, when its event
files reach ``trainer.max_steps``; a rerun of the same command runs only the other points (an unfinished point's
directory is cleared first). ``--print-commands`` prints one shell line per unfinished point instead
(for a SLURM array or any launcher; each line writes the marker when its fit succeeds).

Results are read back from the event files only, by :mod:`lightning_align.report`, which writes
``DIR/report/report.html`` with the learning-rate transfer analysis and prints its verdict.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import io
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import (
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKER = "sweep_done"
LOG_NAME = "fit.log"


class SweepError(Exception):
    """A sweep that cannot start (bad grid, bad key, config error, changed arguments)."""


@dataclass
class Point:
    """One grid point: its values (dotted key -> value text), seed, name and ``fit`` arguments."""

    values: dict[str, str]
    seed: int
    name: str
    directory: Path
    fit_args: list[str] = field(default_factory=list)

    def command(self) -> list[str]:
        """The ``fit`` arguments including the logger that writes to :attr:`directory`."""
        return ["fit", *self.fit_args, f"--trainer.logger={json.dumps(logger_config(self.directory))}"]


def logger_config(directory: Path) -> dict[str, Any]:
    """The ``TensorBoardLogger`` writing directly into ``directory`` (``save_dir/""/version``)."""
    return {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(directory.parent), "name": "", "version": directory.name, "default_hp_metric": False},
    }


# ---------------------------------------------------------------- grid parsing


def _number(text: str) -> float:
    """A float, also written as a power ``B^E`` or ``B**E``.

    Example:
        >>> _number("2^-3"), _number("1e-2")
        (0.125, 0.01)
    """
    m = re.fullmatch(r"\s*([-+0-9.eE]+)\s*(?:\^|\*\*)\s*([-+0-9.eE]+)\s*", text)
    return float(m.group(1)) ** float(m.group(2)) if m else float(text)


def logspace(start: float, stop: float, num: int) -> list[float]:
    """``num`` log-spaced values from ``start`` to ``stop`` (both included), rounded to 12 digits.

    Example:
        >>> logspace(2**-3, 2**-1, 3)
        [0.125, 0.25, 0.5]
    """
    if start <= 0 or stop <= 0 or num < 1:
        raise ValueError(f"logspace needs positive bounds and N >= 1, got ({start}, {stop}, {num})")
    if num == 1:
        return [start]
    a, b = math.log(start), math.log(stop)
    return [float(f"{math.exp(a + i * (b - a) / (num - 1)):.12g}") for i in range(num)]


def _split_top(text: str) -> list[str]:
    """Split on commas outside brackets: ``a,logspace(1,2,3),[4,5]`` -> three items."""
    items, depth, cur = [], 0, ""
    for ch in text:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    return [*items, cur]


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``KEY=V1,V2,...`` -> ``(KEY, [value texts])``; ``logspace(START,STOP,N)`` items are expanded.

    Example:
        >>> parse_grid("model.init_args.lr=logspace(1e-3,1e-1,3)")
        ('model.init_args.lr', ['0.001', '0.01', '0.1'])
        >>> parse_grid("trainer.callbacks.init_args.scheme=mup,sp")
        ('trainer.callbacks.init_args.scheme', ['mup', 'sp'])
    """
    key, sep, rest = spec.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or not rest.strip():
        raise SweepError(f"--grid {spec!r}: expected KEY=V1,V2,... (e.g. model.init_args.width=64,256)")
    values: list[str] = []
    for item in (i.strip() for i in _split_top(rest)):
        m = re.fullmatch(r"logspace\((.+)\)", item)
        if m:
            args = [a.strip() for a in m.group(1).split(",")]
            try:
                start, stop, num = _number(args[0]), _number(args[1]), int(args[2])
                values += [repr(v) for v in logspace(start, stop, num)]
            except (ValueError, IndexError) as err:
                raise SweepError(f"--grid {key}: bad range {item!r}, expected logspace(START,STOP,N): {err}") from None
        elif item:
            values.append(item)
    if len(set(values)) < len(values):
        raise SweepError(f"--grid {key}: repeated values {values}")
    return key, values


def _short(value: str) -> str:
    """A value as written in a point name: numbers to 4 significant digits, paths to their last part."""
    try:
        v = float(value)
        return value if re.fullmatch(r"-?\d+", value) else f"{v:.4g}"
    except ValueError:
        return re.sub(r"[^A-Za-z0-9.+-]+", "-", value.rsplit(".", 1)[-1] if "/" not in value else Path(value).name)


def short_names(keys: Sequence[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that tells it apart from the others.

    Example:
        >>> short_names(["model.init_args.lr", "optimizer.init_args.lr", "model.init_args.width"])
        {'model.init_args.lr': 'model.init_args.lr', 'optimizer.init_args.lr': 'optimizer.init_args.lr', 'model.init_args.width': 'width'}
    """
    out = {}
    for k in keys:
        parts = k.split(".")
        for n in range(1, len(parts) + 1):
            cand = ".".join(parts[-n:])
            if all(not o.endswith(cand) or o == k for o in keys):
                out[k] = cand
                break
    return out


def make_points(grid: Sequence[tuple[str, list[str]]], seeds: Sequence[int], out: Path, base_args: Sequence[str]) -> list[Point]:
    """Every grid point times every seed, named after its values, with its ``fit`` arguments."""
    names = short_names([k for k, _ in grid])
    points = []
    for combo in itertools.product(*(v for _, v in grid)):
        values = {k: v for (k, _), v in zip(grid, combo)}
        for seed in seeds:
            name = "_".join([f"{names[k]}={_short(v)}" for k, v in values.items()] + [f"seed={seed}"])
            args = [*base_args, *(f"--{k}={v}" for k, v in values.items()), f"--seed_everything={seed}"]
            points.append(Point(values, seed, name, out / name, args))
    if len({p.name for p in points}) < len(points):  # values that look alike at 4 digits
        for p in points:
            p.name = "_".join([f"{names[k]}={v}" for k, v in p.values.items()] + [f"seed={p.seed}"])
            p.directory = out / p.name
    return points


# ---------------------------------------------------------------- validation through LightningCLI's parser


class _Parsed(Exception):
    """Raised in place of instantiation: carries the parsed config."""


def parse_fit(args: Sequence[str]) -> Any:
    """Parse ``fit`` arguments with the CLI's own parser, instantiating nothing; the ``fit`` namespace.

    Raises:
        SweepError: the parser rejects them (its message, without the usage text).
    """
    import logging
    from unittest import mock

    from lightning.pytorch.cli import LightningCLI

    from lightning_align import cli

    def stop(self: LightningCLI) -> None:
        raise _Parsed(self.config)

    err = io.StringIO()
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with mock.patch.object(LightningCLI, "instantiate_classes", stop), contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", ["lightning-align"]):
            cli.build_cli(["fit", *args])
    except _Parsed as parsed:
        return parsed.args[0]["fit"]
    except SystemExit:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith("(all options")]
        start = next((i for i, ln in enumerate(lines) if "error:" in ln), max(0, len(lines) - 6))
        raise SweepError("\n".join(lines[start:]) or "the fit arguments do not parse") from None
    finally:
        seed_log.setLevel(level)
    raise SweepError("the fit arguments did not reach instantiation")  # pragma: no cover


def valid_keys(ns: Any) -> list[str]:
    """Every dotted key a grid may set: the parsed config's keys and branches, and the last callback's init args."""
    keys: set[str] = set()
    for k in ns.keys():  # noqa: SIM118  (a jsonargparse Namespace: dotted leaf keys)
        parts = k.split(".")
        keys.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    callbacks = ns.get("trainer.callbacks") or []
    if callbacks and hasattr(callbacks[-1], "get") and callbacks[-1].get("init_args") is not None:
        keys.update(f"trainer.callbacks.init_args.{k}" for k in vars(callbacks[-1].init_args))
    keys.discard("config")
    return sorted(keys)


def check_keys(keys: Sequence[str], valid: Sequence[str]) -> None:
    """Fail naming every key not in ``valid`` with its nearest valid keys.

    Example:
        >>> check_keys(["model.init_args.widht"], ["model.init_args.width", "model.init_args.depth"])
        Traceback (most recent call last):
        ...
        lightning_align.sweep.SweepError: --grid key 'model.init_args.widht' is not in the config's schema; nearest valid keys: model.init_args.width, model.init_args.depth
    """
    bad = []
    for key in keys:
        if key in valid:
            continue
        near = difflib.get_close_matches(key, valid, n=4, cutoff=0.6)
        if not near:  # match on the last part (widht -> model.init_args.width)
            last = {v.rsplit(".", 1)[-1]: v for v in reversed(valid)}
            near = [last[m] for m in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(last), n=4, cutoff=0.6)]
        hint = f"; nearest valid keys: {', '.join(near)}" if near else "; see `lightning-align fit --config CONFIG --print_config`"
        bad.append(f"--grid key {key!r} is not in the config's schema{hint}")
    if bad:
        raise SweepError("\n".join(bad))


def validate(config_args: list[str], grid: Sequence[tuple[str, list[str]]], passthrough: list[str]) -> Any:
    """Check keys (with suggestions), then parse one point per grid value; the base ``fit`` namespace."""
    base = parse_fit([*config_args, *passthrough])
    check_keys([k for k, _ in grid], valid_keys(base))
    first = {k: v[0] for k, v in grid}
    trials = [first] + [first | {k: v} for k, values in grid for v in values[1:]]
    for values in trials:
        try:
            parse_fit([*config_args, *passthrough, *(f"--{k}={v}" for k, v in values.items())])
        except SweepError as err:
            raise SweepError(f"grid point {values}: {err}") from None
    return base


# ---------------------------------------------------------------- finished points


def max_steps_of(directory: Path) -> int | None:
    """``trainer.max_steps`` from the point's saved ``config.yaml`` (``None`` if unknown or unlimited)."""
    import yaml

    cfg = directory / "config.yaml"
    if not cfg.is_file():
        return None
    try:
        steps = (yaml.safe_load(cfg.read_text()) or {}).get("trainer", {}).get("max_steps")
    except yaml.YAMLError:
        return None
    return int(steps) if isinstance(steps, int) and steps > 0 else None


def is_finished(point: Point) -> bool:
    """The marker is there, or the event files reach ``max_steps`` (a fit run by a launcher without the marker)."""
    if (point.directory / MARKER).is_file():
        return True
    steps = max_steps_of(point.directory)
    if steps is None or not any(point.directory.glob("events.out.tfevents.*")):
        return False
    from lightning_align.report.events import load_run

    return load_run(point.directory).last_step >= steps - 1


def check_same_args(point: Point) -> None:
    """A finished point must have been run with the same ``fit`` arguments (else its results mean something else)."""
    marker = point.directory / MARKER
    try:
        recorded = json.loads(marker.read_text()).get("fit_args") if marker.is_file() else None
    except (json.JSONDecodeError, AttributeError):
        recorded = None
    if recorded is not None and recorded != point.fit_args:
        raise SweepError(
            f"{point.directory} was finished with other arguments:\n  {shlex.join(recorded)}\nnow:\n  {shlex.join(point.fit_args)}\n"
            "use another --out, or delete that directory to rerun it"
        )


def write_marker(point: Point, seconds: float, diverged_at: int | None = None) -> None:
    """Mark a point finished, with the arguments it ran with (and the step its loss diverged at, if it did)."""
    diverged = {} if diverged_at is None else {"diverged_at": diverged_at}
    (point.directory / MARKER).write_text(json.dumps({"fit_args": point.fit_args, "seconds": round(seconds, 2), **diverged}) + "\n")


def diverged_at(directory: Path) -> int | None:
    """The first step at which the point's event files hold a non-finite loss (``None``: never, or no event file)."""
    if not any(directory.glob("events.out.tfevents.*")):
        return None
    from lightning_align.report.events import load_run

    return load_run(directory).diverged_at()


# ---------------------------------------------------------------- running


def _prepare(point: Point) -> Path:
    """Clear an unfinished point's directory (a partial run's files) and return its log path."""
    if point.directory.exists():
        shutil.rmtree(point.directory)
    point.directory.mkdir(parents=True)
    return point.directory / LOG_NAME


def _run_subprocess(point: Point, env: dict[str, str]) -> tuple[Point, int, float]:
    """Run one point as ``python -m lightning_align.cli fit ...`` (a fresh process); ``(point, rc, seconds)``."""
    log = _prepare(point)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, "-m", "lightning_align.cli", *point.command()], stdout=f, stderr=subprocess.STDOUT, env=env)
    return point, rc, time.perf_counter() - t0


def _init_worker(threads: int | None) -> None:
    """A reused worker process gets its share of the CPU threads."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _run_in_process(point: Point) -> tuple[Point, int, float]:
    """Run one point's ``fit`` inside this (worker) process, its output redirected to the point's log."""
    log = _prepare(point)
    t0 = time.perf_counter()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    argv, sys.argv = sys.argv, ["lightning-align"]  # LightningCLI warns when given args while sys.argv has some
    rc = 0
    with open(log, "w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            from lightning_align import cli

            cli.main(point.command())
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except Exception:  # noqa: BLE001  (the point fails, the sweep goes on)
            import traceback

            traceback.print_exc()
            rc = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            sys.argv = argv
    return point, rc, time.perf_counter() - t0


def _threads_per_job(jobs: int) -> int | None:
    return max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None


def _run_here(points: Sequence[Point]) -> Iterator[tuple[Point, int, float]]:
    """Run points one by one in this process; Ctrl-C stops the sweep (Lightning turns it into a failed fit)."""
    interrupted = False

    def on_sigint(signum: int, frame: Any) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, on_sigint)
    except ValueError:  # not the main thread: leave signals alone
        previous = None
    try:
        for p in points:
            result = _run_in_process(p)
            if interrupted:
                raise KeyboardInterrupt
            yield result
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _results(points: Sequence[Point], jobs: int, reuse_processes: bool) -> Iterator[tuple[Point, int, float] | BaseException]:
    """Each point's ``(point, exit code, seconds)`` as it finishes (or the error of a worker that died)."""
    if reuse_processes and (jobs == 1 or len(points) == 1):  # no worker to start: this process has imported everything
        yield from _run_here(points)
        return
    threads = _threads_per_job(jobs)
    env = dict(os.environ)
    if threads and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)
    executor: Executor
    if reuse_processes:
        import multiprocessing

        executor = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(threads,))
    else:
        executor = ThreadPoolExecutor(jobs)
    with executor:
        futures: list[Future] = [
            executor.submit(_run_in_process, p) if reuse_processes else executor.submit(_run_subprocess, p, env) for p in points
        ]
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except Exception as err:  # noqa: BLE001  (a worker process died: its points fail)
                    yield err
        except (KeyboardInterrupt, GeneratorExit):
            for fut in futures:
                fut.cancel()
            raise


def run_points(points: Sequence[Point], jobs: int = 1, reuse_processes: bool = False) -> list[Point]:
    """Run ``points`` (``jobs`` at a time) with a progress bar; mark the successful ones; return the unfinished ones."""
    from tqdm.auto import tqdm

    failed = 0
    with tqdm(total=len(points), desc="sweep", unit="point", file=sys.stderr, dynamic_ncols=True) as bar:
        for result in _results(points, jobs, reuse_processes):
            if isinstance(result, BaseException):
                failed += 1
                bar.write(f"sweep: a worker process failed: {result!r}")
            else:
                point, rc, seconds = result
                diverged = diverged_at(point.directory)
                if diverged is not None:  # an outcome, not a failure: the report counts its losses as infinite
                    bar.write(f"sweep: {point.name} diverged (a non-finite loss at step {diverged}"
                              f"{'' if rc == 0 else f', then the fit failed with exit {rc}'}); recorded as diverged")
                if rc == 0 or diverged is not None:
                    write_marker(point, seconds, diverged)
                else:
                    failed += 1
                    bar.write(f"sweep: {point.name} failed (exit {rc}); log: {point.directory / LOG_NAME}")
            if failed:
                bar.set_postfix_str(f"{failed} failed")
            bar.update()
    return [p for p in points if not (p.directory / MARKER).is_file()]


def print_commands(points: Sequence[Point], file: Any = None) -> None:
    """One shell line per point: its ``fit``, then the marker on success."""
    for p in points:
        cmd = shlex.join(["lightning-align", *p.command()])
        marker = shlex.quote(str(p.directory / MARKER))
        print(f"mkdir -p {shlex.quote(str(p.directory))} && {cmd} > {shlex.quote(str(p.directory / LOG_NAME))} 2>&1 && touch {marker}", file=file)


# ---------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The ``sweep`` options; every other argument goes to each point's ``fit``."""
    p = argparse.ArgumentParser(
        prog="lightning-align sweep",
        description="Run a config over a grid (one `lightning-align fit` per point, resumable), then report learning-rate transfer.",
        epilog="Other arguments (e.g. --trainer.max_steps=200) are passed to every point's fit. "
        "Example: lightning-align sweep --config configs/sweep_mup_mlp.yaml --grid trainer.callbacks.init_args.scheme=mup,sp "
        "--grid model.init_args.width=64,256,1024 --grid 'model.init_args.lr=logspace(2^-12,2^-4,9)' --jobs 2 --reuse-processes",
        allow_abbrev=False,
    )
    p.add_argument("-c", "--config", action="append", required=True, help="the fit config (repeatable, as for fit)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a dotted key and its values, or logspace(START,STOP,N); repeat for more axes")
    p.add_argument("--seeds", type=int, default=1, help="seeds per point: seed_everything = config seed + 0..N-1 (default 1)")
    p.add_argument("--jobs", type=int, default=1, help="points run at once, in separate processes (default 1)")
    p.add_argument("--reuse-processes", action="store_true",
                   help="each of the --jobs processes (with --jobs 1: this one) runs its points one after another, "
                   "importing once (saves several seconds per point on short fits; a crash fails the points in flight)")
    p.add_argument("--print-commands", action="store_true", help="print one shell line per unfinished point and exit")
    p.add_argument("--out", type=Path, default=Path("sweeps/sweep"), help="sweep directory (default sweeps/sweep)")
    p.add_argument("--criterion", default="mean", choices=("mean", "final", "best", "val_final", "val_best"),
                   help="loss that picks the optimum LR in the report (default mean: mean training loss over the run)")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    return p


def plan(opts: argparse.Namespace, passthrough: list[str]) -> list[Point]:
    """Parse the grid, validate it against the config's schema, and build the points (nothing runs)."""
    if opts.seeds < 1 or opts.jobs < 1:
        raise SweepError("--seeds and --jobs must be >= 1")
    if not opts.grid:
        raise SweepError("give at least one --grid KEY=V1,V2,...")
    grid = [parse_grid(g) for g in opts.grid]
    if len({k for k, _ in grid}) < len(grid):
        raise SweepError("a --grid key is given twice")
    config_args = [a for c in opts.config for a in ("--config", str(Path(c).resolve()))]
    base = validate(config_args, grid, passthrough)
    seed0 = base.get("seed_everything")
    seed0 = seed0 if isinstance(seed0, int) and not isinstance(seed0, bool) else 0
    out = opts.out.resolve()
    return make_points(grid, [seed0 + i for i in range(opts.seeds)], out, [*config_args, *passthrough])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``lightning-align sweep``; returns the exit status."""
    opts, passthrough = build_parser().parse_known_args(list(sys.argv[2:] if argv is None else argv))
    try:
        points = plan(opts, passthrough)
        for p in points:
            if p.directory.is_dir():
                check_same_args(p)
        todo = [p for p in points if not is_finished(p)]
    except SweepError as err:
        print(f"lightning-align sweep: {err}", file=sys.stderr)
        return 2
    if opts.print_commands:
        print(f"# {len(todo)} of {len(points)} points to run (out: {opts.out.resolve()})", file=sys.stderr)
        print_commands(todo)
        return 0
    opts.out.mkdir(parents=True, exist_ok=True)
    print(f"sweep: {len(points)} points, {len(points) - len(todo)} already finished, running {len(todo)} "
          f"({opts.jobs} at a time) in {opts.out.resolve()}", file=sys.stderr)
    try:
        failed = run_points(todo, opts.jobs, opts.reuse_processes) if todo else []
    except KeyboardInterrupt:
        left = sum(not (p.directory / MARKER).is_file() for p in points)
        print(f"\nsweep: interrupted; rerun the same command to run the {left} unfinished points", file=sys.stderr)
        return 130
    for p in failed:
        print(f"sweep: unfinished: {p.name} (log {p.directory / LOG_NAME})", file=sys.stderr)
    if not opts.no_report:
        from lightning_align.report import write_report

        finished = [p.directory for p in points if (p.directory / MARKER).is_file() or is_finished(p)]
        if not finished:
            print("sweep: no finished point to report on", file=sys.stderr)
            return 1
        page, verdicts = write_report(finished, opts.out / "report", criterion=opts.criterion,
                                      title=f"lightning_align sweep: {opts.out.resolve().name}")
        for line in verdicts:
            print(line)
        print(f"sweep: report {page}", file=sys.stderr)
    return 1 if failed else 0
