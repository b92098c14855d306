"""Overhead of the measurement suite on the quickstart, side by side with plain training in one process.

The quickstart model and data (``configs/quickstart.yaml``: MLP width 128, depth 3, BatchNorm, SGD with
momentum, the bundled digits, batch 64: 23 optimizer steps per epoch; a TensorBoard logger, so the suite's
histograms and figures are written as in the quickstart) are trained with all six
measurement callbacks and without any callback, alternately (same process, same data, same seed); each
configuration's time is the minimum over ``--repeats`` runs. ``--schedules defaults`` (the default) builds
every callback with its constructor defaults; ``--schedules quickstart`` with the ``init_args`` of
``configs/quickstart.yaml`` (denser, for a demo). Each run length of ``--epochs`` is reported separately:
10 epochs is the quickstart itself (230 steps), where the one-off step-0 measurements dominate; longer
runs show the steady state.

Reported per run length: the whole-run wall ratio for the full suite and for each callback alone (alone
only up to ``--alone-up-to`` epochs), and each callback's share of the full-suite run spent inside its
measurements (from a timing wrapper around ``MeasurementCallback._run``, ``prepare`` and ``before_step``).
The rest of the wall difference is Lightning's per-callback hook dispatch and the suite's bookkeeping; the
line "no-op callbacks" (six ``pl.Callback()`` and the ``AlignSummary`` every suite run has) shows what
Lightning's dispatch of that many callbacks costs on these ~2 ms steps.

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--repeats 3] [--epochs 10 100] [--schedules defaults]
        [--alone-up-to 100]

``--implied`` (any ``--model``: ``quickstart``, ``resnet`` for the example ResNet of ``configs/resnet.yaml``,
``gpt`` for the example GPT at width 128, depth 4, 64 tokens, batch 32) answers the same question for models
whose runs at the default schedules would take too long to time whole: one fit of ``--steps`` steps in which
every callback, otherwise at its defaults, measures every ``--every`` steps (timed per measurement, the
step-0 one cold, the others warm), alternated with a plain fit of the same steps for the training step's
time (the median step, from a step clock). Each callback's share of a run of ``L`` steps at its default
schedule is then ``(cold + warm · floor(L / every_default)) / (L · step)``, printed for ``--lengths``; the
long-run limit is ``warm / (every_default · step)``. Warm costs measured ``--every`` steps apart stand in for
those at ``every_default`` apart: for Sharpness (more products when the top vector moved further) and the
NTK's matrix-free path this is optimistic; ``benchmarks/sharpness_warm.py`` measures Sharpness at 1000::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py --implied --model gpt [--steps 40] [--every 10] [--repeats 2]
        [--lengths 10000 100000]

The second table applies ``max_overhead="auto"`` (the default: 0.3% per callback left at its default schedule)
to the same measured costs: the whole suite is stepped through a run of ``L`` steps in training-step units,
each due measurement runs only when the callback's rule allows it (spent + last cost <= 0.3% of the time spent
on everything else; the step-0 measurement is left out of the account and out of these shares: it is the cold
one above, whatever the budget), and its shares are printed; "long run" is ``L`` = 10,000,000. The rule is deterministic given
the costs, so this is what the budget does with them (a real run's costs vary by a few percent).

``--device cuda`` trains on the GPU (``accelerator="gpu"``) in either mode; then the step clock and the timing
wrappers call ``torch.cuda.synchronize()`` before reading the clock, so that queued device work is counted
where it was launched (this adds one sync per training step, to plain and suite fits alike).
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import yaml
from lightning.pytorch.loggers import TensorBoardLogger

import lightning_align
from example_modules import GPT, MLP, CharTextDataModule, DigitsDataModule, ResNet
from lightning_align import AlignSummary, MeasurementCallback
from lightning_align import schedules
from lightning_align.schedules import DEFAULT_MAX_OVERHEAD, OverheadBudget

NAMES = ("FeatureAlignment", "Sharpness", "NTKSpectrum", "EffectiveLR", "RankMonitor", "CoordCheck")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
STEPS_PER_EPOCH = 23
DEVICE = {"name": "cpu"}  # set from --device


def accelerator() -> str:
    return "gpu" if DEVICE["name"] == "cuda" else "cpu"


def sync() -> None:
    """Wait for the GPU's queued work before a clock is read (nothing on CPU)."""
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def suite_arguments(schedules: str) -> dict[str, dict[str, Any]]:
    """Constructor arguments of each callback: none (its defaults) or those of the quickstart YAML."""
    if schedules == "defaults":
        return {name: {} for name in NAMES}
    config = yaml.safe_load(QUICKSTART.read_text())
    found = {c["class_path"].rsplit(".", 1)[-1]: c.get("init_args", {}) for c in config["trainer"]["callbacks"]}
    return {name: found[name] for name in NAMES}


def timed(callback: MeasurementCallback, spent: dict[str, float]) -> MeasurementCallback:
    """Wrap the callback's measurement entry points to add their wall time to ``spent[class name]``."""
    name = type(callback).__name__
    for method in ("_run", "prepare", "before_step"):
        original = getattr(callback, method)

        def wrapper(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                sync()
                spent[name] += time.perf_counter() - start

        setattr(callback, method, wrapper)
    return callback


def fit_once(callbacks: list[pl.Callback], epochs: int) -> float:
    """Wall time of one fit, with a TensorBoard logger as in the quickstart (histograms and figures are written)."""
    pl.seed_everything(0, verbose=False)
    model = MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator=accelerator(), devices=1, logger=TensorBoardLogger(logs, default_hp_metric=False),
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[*callbacks, AlignSummary(progress_bar=False, table=False)] if callbacks else [],
        )
        sync()
        start = time.perf_counter()
        trainer.fit(model, DigitsDataModule(batch_size=64))
        sync()
        return time.perf_counter() - start


def measure(epochs: int, repeats: int, arguments: dict[str, dict[str, Any]], alone: bool) -> None:
    """Print one table: wall ratios and in-measurement shares for this run length."""
    make = {name: (lambda name=name: getattr(lightning_align, name)(**arguments[name])) for name in NAMES}
    configs: dict[str, Callable[[dict[str, float]], list[pl.Callback]]] = {"plain": lambda spent: []}
    configs["full suite"] = lambda spent: [timed(build(), spent) for build in make.values()]
    configs["no-op callbacks"] = lambda spent: [pl.Callback() for _ in NAMES]
    for name, build in make.items():
        if alone:
            configs[name] = lambda spent, build=build: [timed(build(), spent)]
    best: dict[str, float] = {}
    shares: dict[str, float] = {}
    for _ in range(repeats):
        for name, build_callbacks in configs.items():
            spent: dict[str, float] = defaultdict(float)
            wall = fit_once(build_callbacks(spent), epochs)
            if wall < best.get(name, float("inf")):
                best[name] = wall
                if name == "full suite":
                    shares = dict(spent)
    plain = best["plain"]
    print(f"\n{epochs} epochs = {epochs * STEPS_PER_EPOCH} steps; plain training {plain:.3f} s (min of {repeats})")
    print(f"{'configuration':<18} {'wall / plain':>12} {'in measurements / plain':>24}")
    for name in ["full suite", *NAMES, "no-op callbacks"]:
        inside = sum(shares.values()) if name == "full suite" else shares.get(name, float("nan"))
        wall = f"{best[name] / plain:>12.3f}" if name in best else f"{'-':>12}"
        print(f"{name:<18} {wall} {inside / plain:>24.3f}")


def build(model: str) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    """The example models of the implied-overhead mode, as their configs train them."""
    if model == "quickstart":
        return MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9), DigitsDataModule(batch_size=64)
    if model == "resnet":
        return ResNet(width=16, depth=2, lr=0.05, momentum=0.9), DigitsDataModule(batch_size=64, as_images=True)
    if model == "gpt":
        return (GPT(width=128, depth=4, heads=4, block_size=64, lr=3e-3),
                CharTextDataModule(block_size=64, batch_size=32, max_bytes=500_000))
    raise KeyError(model)


def default_every(name: str) -> int:
    """A callback's default ``every_n_steps``."""
    import inspect

    return inspect.signature(getattr(lightning_align, name)).parameters["every_n_steps"].default


def implied(model: str, steps: int, every: int, repeats: int, lengths: list[int]) -> None:
    """Per-measurement costs (cold, warm) of each callback and the implied share at its default schedule."""
    per: dict[str, list[list[float]]] = {name: [] for name in NAMES}
    step_times: list[float] = []
    for _ in range(repeats):
        for configuration in ("plain", "suite"):
            pl.seed_everything(0, verbose=False)
            net, data = build(model)
            starts: list[float] = []
            records: dict[str, dict[int, float]] = {name: defaultdict(float) for name in NAMES}

            class Clock(pl.Callback):
                def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
                    sync()
                    starts.append(time.perf_counter())

            callbacks: list[pl.Callback] = [Clock()]
            if configuration == "suite":
                callbacks += [per_measurement(getattr(lightning_align, name)(every_n_steps=every), records[name]) for name in NAMES]
            trainer = pl.Trainer(
                max_steps=steps, accelerator=accelerator(), devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
            )
            trainer.fit(net, data)
            if configuration == "plain":
                step_times.append(statistics.median(b - a for a, b in zip(starts, starts[1:])))
            else:
                for name in NAMES:
                    per[name].append([records[name][s] for s in sorted(records[name])])
    step = min(step_times)
    print(f"\n{model}: one training step {step * 1e3:.1f} ms (median step, min of {repeats} plain fits); every callback "
          f"measuring every {every} steps for {steps} steps (min of {repeats} per measurement)")
    header = f"{'callback':<18}{'default every':>14}{'cold [steps]':>13}{'warm [steps]':>13}"
    header += "".join(f"{f'{n:,} steps':>14}" for n in lengths) + f"{'long run':>10}"
    print(header)
    totals = [0.0] * (len(lengths) + 1)
    measured: dict[str, tuple[float, float]] = {}
    for name in NAMES:
        runs = per[name]
        costs = [min(run[i] for run in runs) for i in range(min(len(run) for run in runs))]
        cold, warm = costs[0] / step, (statistics.median(costs[1:]) if len(costs) > 1 else costs[0]) / step
        measured[name] = (cold, warm)
        e = default_every(name)
        shares = [(cold + warm * (n // e)) / n for n in lengths] + [warm / e]
        totals = [t + x for t, x in zip(totals, shares)]
        print(f"{name:<18}{e:>14}{cold:>13.1f}{warm:>13.1f}" + "".join(f"{100 * x:>13.2f}%" for x in shares))
    print(f"{'whole suite':<18}{'':>14}{'':>13}{'':>13}" + "".join(f"{100 * x:>13.2f}%" for x in totals))
    print(f"\nwith max_overhead='auto' ({DEFAULT_MAX_OVERHEAD:.1%} per callback at its default schedule): shares and "
          "measurements made")
    print(f"{'callback':<18}" + "".join(f"{f'{n:,} steps':>22}" for n in [*lengths, LONG_RUN]))
    runs = {n: budgeted(measured, n) for n in [*lengths, LONG_RUN]}
    for name in [*NAMES, "whole suite"]:
        cells = [f"{100 * runs[n][name][0]:.2f}% ({runs[n][name][1]:,})" for n in runs]
        print(f"{name:<18}" + "".join(f"{c:>22}" for c in cells))
    cold = sum(c for c, _ in measured.values())
    print(f"{'+ step 0 (cold)':<18}" + "".join(f"{f'{100 * cold / n:.2f}%':>22}" for n in runs))
    in_all = [100 * (runs[n]["whole suite"][0] + cold / n) for n in runs]
    print(f"{'= in all':<18}" + "".join(f"{f'{x:.2f}%':>22}" for x in in_all))


LONG_RUN = 10_000_000


def budgeted(costs: dict[str, tuple[float, float]], length: int) -> dict[str, tuple[float, int]]:
    """Each callback's share of a ``length``-step run and its number of measurements under
    :class:`lightning_align.schedules.OverheadBudget` (the class itself, on a simulated clock), given
    ``{name: (cold, warm)}`` in training steps; the clock advances by one per step and by each measurement made,
    so each callback's "everything else" includes the others' measurements, as in a real run."""
    now = [0.0]
    real_clock, schedules.clock = schedules.clock, lambda: now[0]
    try:
        every = {name: default_every(name) for name in costs}
        budgets = {name: OverheadBudget(DEFAULT_MAX_OVERHEAD) for name in costs}
        counts = dict.fromkeys(costs, 1)
        for name, (cold, _) in costs.items():  # step 0: every callback measures cold, outside the account
            budgets[name].start()
            budgets[name].exclude(cold)
            now[0] += cold
        period = math.gcd(*every.values())
        for step in range(period, length + 1, period):
            now[0] += period
            for name, (_, warm) in costs.items():
                if step % every[name] == 0 and budgets[name].allows_next():
                    budgets[name].charge(warm)
                    now[0] += warm
                    counts[name] += 1
    finally:
        schedules.clock = real_clock
    shares = {name: (budgets[name].spent / length, counts[name]) for name in costs}
    shares["whole suite"] = (sum(s for s, _ in shares.values()), sum(c for _, c in shares.values()))
    return shares


def per_measurement(callback: MeasurementCallback, record: dict[int, float]) -> MeasurementCallback:
    """Wrap the callback's entry points to add their wall time to ``record[global step]``."""
    for method in ("_run", "prepare", "before_step"):
        original = getattr(callback, method)

        def wrapper(trainer: pl.Trainer, *args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            sync()
            start = time.perf_counter()
            try:
                return _original(trainer, *args, **kwargs)
            finally:
                sync()
                record[trainer.global_step] += time.perf_counter() - start

        setattr(callback, method, wrapper)
    return callback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--schedules", choices=["defaults", "quickstart"], default="defaults")
    parser.add_argument("--alone-up-to", type=int, default=100, help="time each callback alone up to this many epochs")
    parser.add_argument("--implied", action="store_true", help="per-measurement costs and implied shares (see above)")
    parser.add_argument("--model", choices=["quickstart", "resnet", "gpt"], default="quickstart")
    parser.add_argument("--steps", type=int, default=40, help="--implied: training steps per fit")
    parser.add_argument("--every", type=int, default=10, help="--implied: every_n_steps of every callback")
    parser.add_argument("--lengths", type=int, nargs="+", default=[10_000, 100_000], help="--implied: run lengths")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    DEVICE["name"] = args.device
    where = f"device {torch.cuda.get_device_name()}" if args.device == "cuda" else "device cpu"
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if args.implied:
        torch.set_num_threads(1)
        print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {where}; implied overhead at the default schedules")
        implied(args.model, args.steps, args.every, args.repeats, args.lengths)
        return
    arguments = suite_arguments(args.schedules)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {where}; schedules: {args.schedules}")
    for name in NAMES:
        print(f"  {name}({', '.join(f'{k}={v}' for k, v in arguments[name].items())})")
    fit_once([], 1)  # warm-up: imports, allocator
    for epochs in args.epochs:
        measure(epochs, args.repeats, arguments, alone=epochs <= args.alone_up_to)


if __name__ == "__main__":
    main()
