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
"""

from __future__ import annotations

import argparse
import logging
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
from example_modules import MLP, DigitsDataModule
from lightning_align import AlignSummary, MeasurementCallback

NAMES = ("FeatureAlignment", "Sharpness", "NTKSpectrum", "EffectiveLR", "RankMonitor", "CoordCheck")
QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
STEPS_PER_EPOCH = 23


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
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(callback, method, wrapper)
    return callback


def fit_once(callbacks: list[pl.Callback], epochs: int) -> float:
    """Wall time of one fit, with a TensorBoard logger as in the quickstart (histograms and figures are written)."""
    pl.seed_everything(0, verbose=False)
    model = MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9)
    with tempfile.TemporaryDirectory() as logs:
        trainer = pl.Trainer(
            max_epochs=epochs, accelerator="cpu", logger=TensorBoardLogger(logs, default_hp_metric=False),
            enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
            callbacks=[*callbacks, AlignSummary(progress_bar=False, table=False)] if callbacks else [],
        )
        start = time.perf_counter()
        trainer.fit(model, DigitsDataModule(batch_size=64))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, nargs="+", default=[10, 100])
    parser.add_argument("--schedules", choices=["defaults", "quickstart"], default="defaults")
    parser.add_argument("--alone-up-to", type=int, default=100, help="time each callback alone up to this many epochs")
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    arguments = suite_arguments(args.schedules)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); schedules: {args.schedules}")
    for name in NAMES:
        print(f"  {name}({', '.join(f'{k}={v}' for k, v in arguments[name].items())})")
    fit_once([], 1)  # warm-up: imports, allocator
    for epochs in args.epochs:
        measure(epochs, args.repeats, arguments, alone=epochs <= args.alone_up_to)


if __name__ == "__main__":
    main()
