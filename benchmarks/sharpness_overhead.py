"""Overhead of the Sharpness callback on the quickstart run, measuring every 100 steps (steps 0, 100, 200).

The peer is the same training run without the callback: each configuration is timed in alternation
with it (same process, same data, same seed), and the ratio of wall times minus one is the overhead.
The quickstart is an MLP (width 128, depth 3, SGD lr 0.1 momentum 0.9) on the bundled digits,
batch 64, 10 epochs (230 optimizer steps, with validation each epoch).

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/sharpness_overhead.py [--epochs 10] [--repeats 3] [--device cpu|cuda]

``--device cuda`` trains on the GPU; the clocks are then read after ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch

from example_modules import MLP, DigitsDataModule
from lightning_align.callbacks.sharpness import Sharpness

DEVICE = {"name": "cpu"}  # set from --device


def sync() -> None:
    """Wait for the GPU's queued work before a clock is read (nothing on CPU)."""
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


class TimedSharpness(Sharpness):
    """Sharpness that records the wall time and products of each measurement."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[int, float, int]] = []

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        sync()
        start = time.perf_counter()
        super()._run(trainer, pl_module)
        sync()
        matvecs = int(trainer.callback_metrics["sharpness/matvecs"])
        self.records.append((trainer.global_step, time.perf_counter() - start, matvecs))


def timed_fit(make_callbacks: Callable[[], list[pl.Callback]], epochs: int) -> tuple[float, int, list[pl.Callback]]:
    pl.seed_everything(0, verbose=False)
    model = MLP(in_features=64, num_classes=10, width=128, depth=3, lr=0.1, momentum=0.9)
    callbacks = make_callbacks()
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="gpu" if DEVICE["name"] == "cuda" else "cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    sync()
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule(batch_size=64))
    sync()
    return time.perf_counter() - start, trainer.global_step, callbacks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    DEVICE["name"] = args.device
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    configs: dict[str, dict[str, object]] = {
        "probe 256, min_eig=True": {"min_eig": True},
        "defaults (probe 256, min_eig=False)": {},
        "probe 64 (= batch), min_eig=False": {"probe_size": 64},
        "probe 16 (= batch/4), min_eig=False": {"probe_size": 16},
        "probe 16 (= batch/4), min_eig=True": {"probe_size": 16, "min_eig": True},
    }
    timed_fit(lambda: [], 1)  # warm-up (imports, data set build)
    base: list[float] = []
    wall: dict[str, list[float]] = {name: [] for name in configs}
    inside: dict[str, list[list[tuple[int, float, int]]]] = {name: [] for name in configs}
    steps = 0
    for _ in range(args.repeats):
        for name, kwargs in configs.items():
            t0, steps, _ = timed_fit(lambda: [], args.epochs)
            t1, _, cbs = timed_fit(lambda: [TimedSharpness(every_n_steps=100, **kwargs)], args.epochs)
            base.append(t0)
            wall[name].append(t1)
            inside[name].append(cbs[0].records)
    t_base = min(base)
    step_time = t_base / steps
    print(f"quickstart MLP on digits: {steps} optimizer steps (batch 64), baseline {t_base:.3f} s "
          f"(min of {len(base)}; {1e3 * step_time:.2f} ms per step incl. validation), Sharpness every 100 steps, "
          f"torch {torch.__version__}, {torch.cuda.get_device_name() if args.device == 'cuda' else '1 thread'}")
    print(f"{'configuration':<38}{'wall overhead':>14}{'in-callback':>13}{'cold [steps]':>14}{'warm [steps]':>14}  HVPs per measurement")
    for name in configs:
        runs = inside[name]
        best = min(runs, key=lambda r: sum(t for _, t, _ in r))
        in_cb = sum(t for _, t, _ in best) / t_base
        cold = best[0][1] / step_time
        warm = statistics.mean(t for _, t, _ in best[1:]) / step_time if len(best) > 1 else float("nan")
        print(f"{name:<38}{100 * (min(wall[name]) / t_base - 1):>13.1f}%{100 * in_cb:>12.1f}%{cold:>14.1f}{warm:>14.1f}  "
              f"{[m for _, _, m in best]}")
    print("wall overhead: min-of-repeats wall time with the callback / without - 1 (noisy on a shared machine);")
    print("in-callback: time spent inside the measurements / baseline; [steps]: one measurement in training-step equivalents.")


if __name__ == "__main__":
    main()
