"""``max_overhead``: scheduled measurements postponed to keep their cost under a share of the fit's time.

A fake clock (``lightning_align.schedules.clock`` replaced) makes the decisions exact: every training step costs
1 unit, every measurement 10, so the rule ("spent + last cost <= share x time spent on everything else") gives
the measured steps by hand. Nothing is timed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from helpers import assert_same_training_state, fit

from lightning_align import (
    CoordCheck, EffectiveLR, ELRWarmup, FeatureAlignment, FeatureSpeedControl, NTKSpectrum, RankMonitor, Sharpness,
)
from lightning_align import schedules
from lightning_align.callbacks.base import MeasurementCallback


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(schedules, "clock", fake)
    return fake


class Costly(MeasurementCallback):
    """A measurement that takes 10 units of the fake clock and records its steps."""

    family = "test"

    def __init__(self, clock: FakeClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.steps = clock, []

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        self.clock.now += 10.0
        self.steps.append(trainer.global_step)
        return {"test/value": 1.0}


class Ticks(pl.Callback):
    """Each training step takes 1 unit of the fake clock (counted before the step's budget decision)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_start(self, *args: Any) -> None:
        self.clock.now += 1.0


def test_measurements_are_postponed_until_training_has_paid_for_them(clock: FakeClock) -> None:
    """Share 0.5, every step due. Step 0 runs and is left out of the account; step 1 runs (nothing spent yet:
    spent 10, last cost 10); then step t runs when spent + 10 <= 0.5 x (t units of training): 20 <= t/2 at
    t = 40, 30 <= t/2 at 60, 40 <= t/2 at 80."""
    costly = Costly(clock, every_n_steps=1, max_overhead=0.5)
    fit([Ticks(clock), costly], max_steps=80)
    assert costly.steps == [0, 1, 40, 60, 80]
    assert costly.budget.postponed == 76
    assert costly.budget.excluded == 10 and costly.budget.spent == 40
    assert costly.budget.spent <= 0.5 * (clock.now - costly.budget.excluded - costly.budget.spent)


def test_the_early_steps_of_a_log_schedule_are_always_measured(clock: FakeClock) -> None:
    """``schedule="log"`` asks for steps 1, 2, 4 below ``every_n_steps=8``: one-off, like step 0, so they run and
    stay out of the account; the first multiple (8) runs as the first measurement after them, later ones wait."""
    costly = Costly(clock, every_n_steps=8, schedule="log", max_overhead=0.01)
    fit([Ticks(clock), costly], max_steps=40)
    assert costly.steps == [0, 1, 2, 4, 8]
    assert costly.budget.excluded == 40 and costly.budget.spent == 10


def test_without_a_budget_every_scheduled_step_is_measured(clock: FakeClock) -> None:
    costly = Costly(clock, every_n_steps=10, max_overhead=None)
    fit([Ticks(clock), costly], max_steps=40)
    assert costly.steps == [0, 10, 20, 30, 40]


def test_the_budget_survives_a_resume(clock: FakeClock, tmp_path: Path) -> None:
    """Stopped at step 50 and resumed to 80: the same steps as the run above (seconds spent and elapsed are in
    the checkpoint)."""
    first = Costly(clock, every_n_steps=1, max_overhead=0.5)
    _, trainer = fit([Ticks(clock), first], max_steps=50)
    trainer.save_checkpoint(tmp_path / "at50.ckpt")
    clock.now += 1000.0  # time between the two runs is not training time
    resumed = Costly(clock, every_n_steps=1, max_overhead=0.5)
    fit([Ticks(clock), resumed], max_steps=80, ckpt_path=str(tmp_path / "at50.ckpt"))
    assert first.steps == [0, 1, 40] and resumed.steps == [60, 80]


class AlignValues(pl.Callback):
    """FeatureAlignment's logged values at each step it measured (put after it)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("align/")}
        if values:
            self.steps[trainer.global_step] = values
        trainer.callback_metrics.clear()


def test_a_postponed_schedule_measures_what_the_full_schedule_measures_and_leaves_training_alone(clock: FakeClock) -> None:
    """FeatureAlignment copies the weights just before a due step (``before_step``) and measures after it: after
    postponements its values at the steps it does measure equal those of a run measuring every step (the copy
    belongs to the step measured), and training (dropout, BatchNorm) is bit-identical with, without and under a
    budget."""

    def costly_alignment(**kwargs: Any) -> FeatureAlignment:
        cb = FeatureAlignment(every_n_steps=1, probe_size=32, **kwargs)
        measure = cb.measure

        def measure_for_10_units(*args: Any) -> Any:
            clock.now += 10.0
            return measure(*args)

        cb.measure = measure_for_10_units
        return cb

    budgeted, every = AlignValues(), AlignValues()
    run_budgeted = fit([Ticks(clock), costly_alignment(max_overhead=0.5), budgeted], max_steps=60)
    run_every = fit([Ticks(clock), costly_alignment(max_overhead=None), every], max_steps=60)
    plain = fit([], max_steps=60)
    assert sorted(budgeted.steps) == [1, 40, 60]  # (step 0's values are logged before training: not seen here)
    assert len(every.steps) == 60
    for step, values in budgeted.steps.items():
        assert values == every.steps[step], step
    assert_same_training_state(run_budgeted, plain)
    assert_same_training_state(run_every, plain)


def test_auto_limits_the_default_schedules_only() -> None:
    """``"auto"``: 0.3% at the callback's default ``every_n_steps``; a schedule the user sets is measured as set."""
    for cls in (Sharpness, NTKSpectrum, FeatureAlignment, RankMonitor, EffectiveLR, CoordCheck):
        assert cls().overhead_share == schedules.DEFAULT_MAX_OVERHEAD, cls.__name__
        assert cls(every_n_steps=7).overhead_share is None, cls.__name__
        assert cls(every_n_steps=7, max_overhead=0.02).overhead_share == 0.02, cls.__name__
        assert cls(max_overhead=None).overhead_share is None, cls.__name__
    assert FeatureSpeedControl(target_speed=0.1).overhead_share is None  # a control acts on its schedule
    assert ELRWarmup().overhead_share is None


def test_bad_budgets_are_refused_with_the_callback_named() -> None:
    for bad in (0, 1.5, -0.1, "fast", True):
        with pytest.raises(ValueError, match=r"Sharpness\(max_overhead=.*\): max_overhead must be a finite float in \(0, 1\] \(a share of training time"):
            Sharpness(max_overhead=bad)

    class Control(MeasurementCallback):
        acts_on_training = True

        def measure(self, *args: Any) -> dict[str, float]:
            return {}

    with pytest.raises(ValueError, match=r"Control\(max_overhead=0.01\): .* would make its control decisions depend"):
        Control(max_overhead=0.01)
