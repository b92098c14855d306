"""ELRWarmup: the LR used at each step is min(target, η*), restored right after; composes with schedulers and groups."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same_training_state, fit
from lightning.pytorch.callbacks import Callback
from test_elr_callback import DeepBN, Recorder, full_batch_loader, geo_mean, spreads
from torch import nn

from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.callbacks.warmup import ELRWarmup
from lightning_align.measure.elr import critical_lr


class LrSpy(Callback):
    """Records, per step: the LR outside the step, the LR the step uses, and η* from the gradients (brute force)."""

    def __init__(self) -> None:
        self.outside: list[list[float]] = []
        self.used: list[list[float]] = []
        self.critical: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.outside.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.used.append([g["lr"] for g in optimizer.param_groups])
        with torch.no_grad():
            e = {
                n: float(m.weight.grad.norm() / m.weight.norm())
                for n, m in pl_module.named_modules()
                if isinstance(m, nn.Linear) and n != f"net.{len(pl_module.net) - 1}"
            }
        self.critical.append(critical_lr(e))


class ScheduledDeepBN(DeepBN):
    """DeepBN with two param groups (hidden layers at ``lr``, readout at ``lr/2``) and an ExponentialLR schedule."""

    def configure_optimizers(self) -> Any:
        readout = self.net[-1]
        hidden = [p for m in self.net[:-1] for p in m.parameters()]
        opt = torch.optim.SGD([{"params": hidden}, {"params": readout.parameters(), "lr": self.hparams.lr / 2}], lr=self.hparams.lr)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class PlainNet(DeepBN):
    """No normalization: no weight is scale-invariant."""

    def __init__(self) -> None:
        super().__init__(depth=2, width=8)
        self.net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def test_warmup_uses_min_of_target_and_critical_lr_and_restores_it() -> None:
    spy, rec = LrSpy(), Recorder()
    warm = ELRWarmup()
    fit([warm, spy, rec], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=8)
    factors = [r.get("elr/warmup_factor") for r in rec.rows]
    assert all(lr == [0.3] for lr in spy.outside)  # never visible outside the step
    assert spy.used[0][0] < 0.3 / 5  # η* at init is well below the target
    n_warm = next(i for i, f in enumerate(factors) if f == 1.0)
    assert n_warm >= 1
    for used, crit, f in zip(spy.used[:n_warm], spy.critical[:n_warm], factors[:n_warm]):
        assert used[0] == pytest.approx(crit, rel=1e-5)
        assert f == pytest.approx(crit / 0.3, rel=1e-5)
    assert spy.critical[n_warm] >= 0.3 and spy.used[n_warm] == [0.3]
    # handed over: 0.3 from then on, and the factor is no longer logged
    assert all(u == [0.3] for u in spy.used[n_warm:])
    assert all(f is None for f in factors[n_warm + 1:])
    assert warm.done and warm.state_dict()["done"]
    assert warm._hook is None  # the optimizer hook is removed at teardown


def test_an_interrupted_step_leaves_the_configured_lr() -> None:
    class Boom(Callback):
        def on_before_optimizer_step(self, trainer: pl.Trainer, *args: Any) -> None:
            self.seen = trainer.optimizers[0].param_groups[0]["lr"]
            self.optimizer = trainer.optimizers[0]
            raise RuntimeError("boom")

    boom, warm = Boom(), ELRWarmup()
    with pytest.raises(RuntimeError, match="boom"):
        fit([warm, boom], module=DeepBN(lr=0.3), loader=full_batch_loader())
    assert boom.seen < 0.3  # the warm-up had scaled it...
    assert boom.optimizer.param_groups[0]["lr"] == 0.3  # ...and put it back
    assert warm._hook is None


def test_warmup_composes_with_scheduler_and_per_group_lrs() -> None:
    spy_w, spy_0 = LrSpy(), LrSpy()
    fit([ELRWarmup(), spy_w], module=ScheduledDeepBN(lr=0.3), loader=full_batch_loader(), max_steps=6)
    fit([spy_0], module=ScheduledDeepBN(lr=0.3), loader=full_batch_loader(), max_steps=6)
    # the scheduler saw (and produced) exactly the same LRs as without the warm-up
    assert spy_w.outside == spy_0.outside
    assert spy_0.outside[1] == pytest.approx([0.27, 0.135])
    for used, outside in zip(spy_w.used, spy_w.outside):
        factor = used[0] / outside[0]
        assert 0 < factor <= 1
        assert used[1] == pytest.approx(factor * outside[1], rel=1e-12)  # one common factor for every group
    assert spy_w.used[0][0] < spy_w.outside[0][0]


def test_deep_bn_spread_shrinks_faster_with_warmup_than_at_constant_target_lr() -> None:
    warm_rec, const_rec = Recorder(), Recorder()
    fit([ELRWarmup(), EffectiveLR(every_n_steps=1), warm_rec], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=5)
    fit([EffectiveLR(every_n_steps=1), const_rec], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=5)
    warm, const = spreads(warm_rec.rows), spreads(const_rec.rows)
    # the first update's ELR ratios are those of the gradients (any LR): the same large spread in both runs
    assert warm[0] == pytest.approx(const[0], rel=1e-4) and warm[0] > 10
    assert geo_mean(warm[1:5]) < geo_mean(const[1:5]) / 2
    assert const_rec.rows[0]["elr/lr_over_critical"] > 5


def test_no_scale_invariant_weight_is_a_clear_error_before_training() -> None:
    module = PlainNet()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="ELRWarmup: PlainNet has no scale-invariant weights"):
        fit([ELRWarmup()], module=module, loader=full_batch_loader())
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_no_scaling_needed_means_bit_identical_training() -> None:
    warm = ELRWarmup()
    with_cb = fit([warm], module=DeepBN(lr=1e-4), loader=full_batch_loader(), max_steps=4)
    without = fit([], module=DeepBN(lr=1e-4), loader=full_batch_loader(), max_steps=4)
    assert warm.done
    assert_same_training_state(with_cb, without)


def test_finished_state_survives_a_resume() -> None:
    first = ELRWarmup()
    fit([first], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=8)
    assert first.done
    resumed = ELRWarmup()
    resumed.load_state_dict(first.state_dict())
    spy = LrSpy()
    fit([resumed, spy], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=2)
    assert spy.used == [[0.3], [0.3]]  # finished warm-ups do not start again
    fresh_spy = LrSpy()
    fit([ELRWarmup(), fresh_spy], module=DeepBN(lr=0.3), loader=full_batch_loader(), max_steps=2)
    assert fresh_spy.used[0][0] < 0.3
    assert math.isfinite(first.state_dict()["factor"])
