"""Overhead of EffectiveLR and ELRWarmup on training, measured side by side with the same run without them.

There is no public implementation of the paper's measurements to compare with, so the peer is the
plain training loop: each configuration is timed in alternation with it (same process, same data),
and the ratio of wall times is reported. Also the one-off cost of the scale-invariance test relative
to one training step.

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/elr.py [--steps 60] [--repeats 3]
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
from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.callbacks.probe import ProbeOutputs
from lightning_align.callbacks.warmup import ELRWarmup
from lightning_align.measure.elr import detect_scale_invariance


def timed_fit(make_callbacks: Callable[[], list[pl.Callback]], steps: int, width: int, depth: int) -> float:
    pl.seed_everything(0, verbose=False)
    model = MLP(width=width, depth=depth, norm="batch", lr=0.5)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=make_callbacks(),
    )
    start = time.perf_counter()
    trainer.fit(model, DigitsDataModule(batch_size=128))
    return time.perf_counter() - start


def _timed(cls: type) -> type:
    """A subclass of a callback that adds up the wall time of its hooks and of its invariance test."""

    class Timed(cls):  # type: ignore[misc, valid-type]
        spent = 0.0
        detect = 0.0

        def _clock(self, fn: Callable, *args: object) -> object:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.spent += time.perf_counter() - start

        def on_train_start(self, *args: object) -> None:
            start = time.perf_counter()
            self._clock(super().on_train_start, *args)
            self.detect += time.perf_counter() - start

        def on_before_optimizer_step(self, *args: object) -> None:
            self._clock(super().on_before_optimizer_step, *args)

        def on_train_batch_end(self, *args: object) -> None:
            self._clock(super().on_train_batch_end, *args)

    return Timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=20)
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(1)

    configs: dict[str, Callable[[], list[pl.Callback]]] = {
        "EffectiveLR(every_n_steps=1)": lambda: [EffectiveLR(every_n_steps=1, figure_every=0)],
        "EffectiveLR(every_n_steps=10)": lambda: [EffectiveLR(every_n_steps=10, figure_every=0)],
        "ELRWarmup()": lambda: [ELRWarmup()],
        "ELRWarmup() + EffectiveLR(1)": lambda: [ELRWarmup(), EffectiveLR(every_n_steps=1, figure_every=0)],
    }
    print(f"MLP(width={args.width}, depth={args.depth}, norm='batch'), digits, batch 128, {args.steps} steps, 1 thread")
    timed_fit(list, 5, args.width, args.depth)  # warm-up (imports, data)
    # Interleaved runs; the minimum over repeats is the least disturbed by other load on the machine.
    bases: list[float] = []
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        bases.append(timed_fit(list, args.steps, args.width, args.depth))
        for name, make in configs.items():
            times[name].append(timed_fit(make, args.steps, args.width, args.depth))
    print(f"  plain training: min {min(bases):.2f} s over {args.repeats} runs")
    for name, ts in times.items():
        print(f"  {name:32s} min time / min plain time: {min(ts) / min(bases):.3f}"
              f"  (median ratio {statistics.median(ts) / statistics.median(bases):.3f})")

    # Within-run share: time spent inside the callbacks' hooks / whole fit (robust to machine load).
    for cls, kwargs in ((EffectiveLR, {"every_n_steps": 1, "figure_every": 0}), (ELRWarmup, {})):
        timed_cb = _timed(cls)(**kwargs)
        total = timed_fit(lambda: [timed_cb], args.steps, args.width, args.depth)
        print(f"  {cls.__name__:32s} time in its hooks / whole fit: {timed_cb.spent / total:.3f} "
              f"(of which the one-off scale-invariance test: {timed_cb.detect / total:.3f})")

    model = MLP(width=args.width, depth=args.depth, norm="batch")
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step_times, detect_times = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(10):
            opt.zero_grad()
            model.loss(model(x), y).backward()
            opt.step()
        step_times.append((time.perf_counter() - t0) / 10)
        t0 = time.perf_counter()
        detect_scale_invariance(ProbeOutputs(model), (x, y))
        detect_times.append(time.perf_counter() - t0)
    print(f"  scale-invariance test (once, probe 256) / one training step (batch 256): "
          f"{statistics.median(detect_times) / statistics.median(step_times):.1f}")


if __name__ == "__main__":
    main()
