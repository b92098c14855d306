"""FeatureSpeedControl and ELRWarmup together: both scale the learning rates around each optimizer step, and the
scheduled learning rates must come back exactly after it, whatever the order of the callbacks.

torch runs an optimizer's own step hooks in registration order, and ELRWarmup scales inside the closure (where
the gradients exist) after FeatureSpeedControl's pre-hook has scaled, so FeatureSpeedControl's restore must run
last. It registers global optimizer hooks (torch runs those around every optimizer's own hooks); with
per-optimizer hooks registered before ELRWarmup's, its restore ran first and ELRWarmup then divided the
scheduled learning rate by its factor: the learning rate grew by ``1/factor`` at every warm-up step.
"""

from __future__ import annotations

import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
from helpers import fit
from test_controls_ddp import NormalizedMLP, controls, loader

from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.callbacks.summary import AlignSummary
from lightning_align.callbacks.warmup import ELRWarmup

GAMMA = 0.95  # NormalizedMLP's ExponentialLR


class LrSpy(pl.Callback):
    """Per step: the groups' learning rates outside the step, and those the step uses (put it last)."""

    def __init__(self) -> None:
        self.outside: list[list[tuple[float, float]]] = []
        self.used: list[list[float]] = []
        self.expected_used: list[list[float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.outside.append([(g["lr"], g["initial_lr"]) for g in trainer.optimizers[0].param_groups])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        fsc = next(c for c in trainer.callbacks if isinstance(c, FeatureSpeedControl))
        warm = next(c for c in trainer.callbacks if isinstance(c, ELRWarmup))
        factor = 1.0 if warm.done else warm.factor
        scheduled = self.outside[-1]
        layers = fsc._group_layer[id(optimizer)]
        self.used.append([g["lr"] for g in optimizer.param_groups])
        self.expected_used.append([lr * (1.0 if k is None else fsc.multipliers[k]) * factor for (lr, _), k in zip(scheduled, layers)])


@pytest.mark.parametrize("reverse", [False, True], ids=["fsc-first", "warmup-first"])
def test_scheduled_lrs_come_back_exactly_and_the_step_uses_both_factors(reverse: bool) -> None:
    param, fsc, warm = controls()
    spy = LrSpy()
    callbacks = [param, warm, fsc] if reverse else [param, fsc, warm]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*learning rate changed during the optimizer step.*")
        fit([*callbacks, AlignSummary(table=False), spy], module=NormalizedMLP, loader=loader(16), max_steps=5)
    assert warm.done, "the warm-up finished within the run"
    for step, groups in enumerate(spy.outside):
        for lr, initial in groups:
            assert lr == pytest.approx(initial * GAMMA**step, rel=1e-12), f"step {step}: the scheduled LR was not restored"
    assert any(u != e for u, e in zip(spy.used[0], [lr for lr, _ in spy.outside[0]])), "nothing was scaled"
    for step, (used, expected) in enumerate(zip(spy.used, spy.expected_used)):
        assert used == pytest.approx(expected, rel=1e-12), f"step {step}"
