"""Overhead of the measurement suite on the quickstart, side by side with plain training in one process.

The quickstart (``configs/quickstart.yaml``: MLP width 128, depth 3, BatchNorm, SGD with momentum, the
bundled digits, 10 epochs = 230 optimizer steps) is trained with the suite's callbacks at the quickstart's
schedules and without any callback, alternately (same process, same data, same seed); each configuration's
time is the minimum over ``--repeats`` runs. Reported: the whole-run ratio for the full suite and for each
callback alone, and each callback's share of the full-suite run (time inside its measurements and its
once-per-fit preparation, from a timing wrapper around ``MeasurementCallback._run``/``prepare``).

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/overhead.py [--repeats 5] [--epochs 10]
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict
from collections.abc import Callable

import lightning.pytorch as pl
import torch

from example_modules import MLP, DigitsDataModule
from lightning_align import (
    AlignSummary,
    CoordCheck,
    EffectiveLR,
    FeatureAlignment,
    MeasurementCallback,
    NTKSpectrum,
    RankMonitor,
    Sharpness,
)

SUITE: dict[str, Callable[[], MeasurementCallback]] = {  # the schedules of configs/quickstart.yaml
    "FeatureAlignment": lambda: FeatureAlignment(every_n_steps=25, schedule="log", probe_size=128),
    "Sharpness": lambda: Sharpness(every_n_steps=50, schedule="log", probe_size=64, min_eig=False),
    "NTKSpectrum": lambda: NTKSpectrum(every_n_steps=50, schedule="log", probe_size=32, k=10, figures=True),
    "EffectiveLR": lambda: EffectiveLR(every_n_steps=5),
    "RankMonitor": lambda: RankMonitor(every_n_steps=50, schedule="log"),
    "CoordCheck": lambda: CoordCheck(every_n_steps=25),
}


def timed(callback: MeasurementCallback, spent: dict[str, float]) -> MeasurementCallback:
    """Wrap the callback's measurement entry points to add their wall time to ``spent[class name]``."""
    name = type(callback).__name__
    for method in ("_run", "prepare"):
        original = getattr(callback, method)

        def wrapper(*args, _original=original, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(callback, method, wrapper)
    return callback


def fit_once(callbacks: list[pl.Callback], epochs: int) -> float:
    pl.seed_everything(0, verbose=False)
    model = MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks, AlignSummary(progress_bar=False, table=False)] if callbacks else [],
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule(batch_size=64))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    configs: dict[str, Callable[[dict[str, float]], list[pl.Callback]]] = {"plain": lambda spent: []}
    configs["full suite"] = lambda spent: [timed(make(), spent) for make in SUITE.values()]
    for name, make in SUITE.items():
        configs[name] = lambda spent, make=make: [timed(make(), spent)]

    fit_once([], 1)  # warm-up: imports, allocator
    best: dict[str, float] = {}
    shares: dict[str, float] = {}
    for _ in range(args.repeats):
        for name, build in configs.items():
            spent: dict[str, float] = defaultdict(float)
            wall = fit_once(build(spent), args.epochs)
            if wall < best.get(name, float("inf")):
                best[name] = wall
                if name == "full suite":
                    shares = dict(spent)
    plain = best["plain"]
    print(f"quickstart: {args.epochs} epochs ({args.epochs * 23} steps), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); plain training {plain:.3f} s (min of {args.repeats})")
    print(f"{'configuration':<18} {'wall / plain':>12} {'in measurements / plain':>24}")
    for name in ["full suite", *SUITE]:
        inside = sum(shares.values()) if name == "full suite" else shares.get(name, float("nan"))
        print(f"{name:<18} {best[name] / plain:>12.3f} {inside / plain:>24.3f}")


if __name__ == "__main__":
    main()
