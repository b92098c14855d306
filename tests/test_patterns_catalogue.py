"""Pattern catalogue: training_steps of every shape keep the two promises (training unchanged, values right or refused).

Each class here broke on an earlier main: a torchmetrics metric counted the probe's samples (and moved
EarlyStopping), a lazy module was created by the first probe under another random state, several optimizers
under manual optimization gave values of one optimizer's update with no word, a ``training_step`` returning
``None`` was measured as an update (or crashed), and complex parameters failed with raw torch errors.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, measurement_suite, tiny_loader
from lightning.pytorch.callbacks import EarlyStopping
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_align import ELRWarmup, FeatureAlignment, FeatureSpeedControl, Sharpness


def _accuracy() -> MulticlassAccuracy:
    return MulticlassAccuracy(num_classes=3, average="micro")


def _counters(metric: Any) -> dict[str, Any]:
    """What a torchmetrics metric has counted: its states and number of updates."""
    return {"_update_count": metric._update_count, **{k: v.clone() if torch.is_tensor(v) else list(v) for k, v in metric.metric_state.items()}}


def _assert_same_counters(a: Any, b: Any) -> None:
    ca, cb = _counters(a), _counters(b)
    assert ca.keys() == cb.keys()
    for key in ca:
        assert torch.equal(torch.as_tensor(ca[key]), torch.as_tensor(cb[key])), f"{type(a).__name__}.{key}: {ca[key]} != {cb[key]}"


# --------------------------------------------------------------------------------------------------
# torchmetrics wherever they live, self.log
# --------------------------------------------------------------------------------------------------
class MetricData(pl.LightningDataModule):
    """The training data, and a metric kept on the datamodule (updated by the module's training_step)."""

    def __init__(self) -> None:
        super().__init__()
        self.acc = _accuracy()

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return tiny_loader()


class MetricModule(TinyClassifier):
    """A training_step that updates torchmetrics metrics held where users put them, and logs."""

    def __init__(self, where: str = "attribute", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.where = where
        if where == "attribute":
            self.acc = _accuracy()
        elif where == "collection":  # a MetricCollection (compute groups) inside an nn.ModuleDict
            self.metrics = nn.ModuleDict({"fit": MetricCollection([_accuracy(), MulticlassF1Score(num_classes=3)])})
        elif where == "dict":  # a plain dict: not registered (a common mistake)
            self.plain = {"acc": _accuracy()}
        elif where == "list":
            self.plain_list = [_accuracy()]

    def metrics_updated(self) -> list[Any]:
        if self.where == "attribute":
            return [self.acc]
        if self.where == "collection":
            return list(self.metrics["fit"].values())
        if self.where == "dict":
            return [self.plain["acc"]]
        if self.where == "list":
            return [self.plain_list[0]]
        return [self.trainer.datamodule.acc]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        if self.where == "collection":
            self.metrics["fit"](logits, y)  # forward: batch value and accumulation
        else:
            for metric in self.metrics_updated():
                metric.update(logits, y)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("train_loss", loss)
        return loss


@pytest.mark.parametrize("where", ["attribute", "collection", "dict", "list", "datamodule"])
def test_metric_counts_only_training_samples_wherever_it_lives(where: str) -> None:
    def run(callbacks: list[Any]) -> tuple[pl.LightningModule, pl.Trainer]:
        loader = MetricData() if where == "datamodule" else None
        return fit(callbacks, lambda: MetricModule(where), loader=loader, max_steps=3)

    plain, measured = run([]), run(measurement_suite())
    assert_same_training_state(plain, measured)
    pairs = list(zip(plain[0].metrics_updated(), measured[0].metrics_updated()))
    for a, b in pairs:
        _assert_same_counters(a, b)
    assert pairs[0][1]._update_count == 3


class ManualMetricModule(MetricModule):
    """Manual optimization whose probe_loss updates the metric and logs, as its training_step does."""

    def __init__(self) -> None:
        super().__init__("attribute")
        self.automatic_optimization = False

    def probe_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.acc.update(logits, y)
        loss = nn.functional.cross_entropy(logits, y)
        self.log("probe_path_loss", loss)
        self.log_dict({"probe_path_dict": loss})
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_probe_loss_path_leaves_metrics_and_logged_results_as_they_were() -> None:
    plain, measured = fit([], ManualMetricModule, max_steps=3), fit(measurement_suite(), ManualMetricModule, max_steps=3)
    assert_same_training_state(plain, measured)
    _assert_same_counters(plain[0].acc, measured[0].acc)
    user = {k: v for k, v in measured[1].callback_metrics.items() if "/" not in k}  # the suite's tags have a family
    assert user.keys() == plain[1].callback_metrics.keys() == {"train_loss"}
    assert torch.equal(user["train_loss"], plain[1].callback_metrics["train_loss"])


class EpochAccuracy(TinyClassifier):
    """Logs the epoch's training accuracy (a torchmetrics metric through self.log), the quantity EarlyStopping watches."""

    def __init__(self) -> None:
        super().__init__(lr=0.05)
        self.acc = _accuracy()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        self.acc(logits, y)
        self.log("train_acc", self.acc, on_step=False, on_epoch=True)
        return nn.functional.cross_entropy(logits, y)


def test_early_stopping_on_a_metric_stops_at_the_same_epoch() -> None:
    def run(callbacks: list[Any]) -> tuple[EarlyStopping, pl.Trainer]:
        stop = EarlyStopping(monitor="train_acc", mode="max", patience=1, check_on_train_epoch_end=True)
        _, trainer = fit([*callbacks, stop], EpochAccuracy, max_steps=-1, max_epochs=12)
        return stop, trainer

    (plain_stop, plain), (measured_stop, measured) = run([]), run(measurement_suite(every_n_steps=4))
    assert 0 < plain_stop.stopped_epoch < 11  # it did stop early
    assert measured_stop.stopped_epoch == plain_stop.stopped_epoch
    assert torch.equal(measured_stop.best_score, plain_stop.best_score)
    assert measured.global_step == plain.global_step


class TensorState(TinyClassifier):
    """Tensors kept as plain attributes: updated in place by training_step, re-assigned and created lazily by forward."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.samples = torch.zeros(())  # not a buffer
        self.last_mean = torch.zeros(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.last_mean = x.mean(0).detach()
        if not hasattr(self, "first_batch"):
            self.first_batch = x.detach().clone()
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.samples += batch[0].shape[0]
        return super().training_step(batch, batch_idx)


def test_tensor_attributes_and_attributes_created_by_a_probe_are_restored() -> None:
    plain, measured = fit([], TensorState, max_steps=4), fit(measurement_suite(), TensorState, max_steps=4)
    assert_same_training_state(plain, measured)
    for name in ("samples", "last_mean", "first_batch"):
        assert torch.equal(getattr(plain[0], name), getattr(measured[0], name)), name


# --------------------------------------------------------------------------------------------------
# Lazy modules
# --------------------------------------------------------------------------------------------------
class LazyModel(TinyClassifier):
    def __init__(self, dummy_forward: bool = False) -> None:
        super().__init__()
        self.net[0] = nn.LazyLinear(16)
        self.dummy_forward = dummy_forward

    def setup(self, stage: str) -> None:
        if self.dummy_forward:  # the remedy the refusal names
            self(torch.zeros(2, 8))


@pytest.mark.parametrize("index", range(6))
def test_lazy_module_is_refused_at_fit_start_naming_it_and_the_remedy(index: int) -> None:
    cb = measurement_suite()[index]
    owner = type(cb).__name__
    with pytest.raises(ValueError, match=rf"^{owner}: LazyModel has lazy modules .*\(net\.0\).*dummy batch.*setup\(\)"):
        fit([cb], LazyModel, max_steps=2)


def test_lazy_module_materialised_in_setup_is_measured_with_training_unchanged() -> None:
    plain = fit([], lambda: LazyModel(dummy_forward=True), max_steps=4)
    measured = fit(measurement_suite(), lambda: LazyModel(dummy_forward=True), max_steps=4)
    assert_same_training_state(plain, measured)


# --------------------------------------------------------------------------------------------------
# Several optimizers under manual optimization
# --------------------------------------------------------------------------------------------------
class GAN(pl.LightningModule):
    """A discriminator step then a generator step per batch, two Adam optimizers; probe_loss is their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8))
        self.disc = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.disc(self.gen(x))

    def losses(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bce = nn.functional.binary_cross_entropy_with_logits
        fake = self.gen(x)
        real_out, fake_out = self.disc(x), self.disc(fake.detach())
        d_loss = bce(real_out, torch.ones_like(real_out)) + bce(fake_out, torch.zeros_like(fake_out))
        g_out = self.disc(fake)
        return d_loss, bce(g_out, torch.ones_like(g_out))

    def probe_loss(self, batch: Any) -> torch.Tensor:
        return sum(self.losses(batch[0]))

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt_d, opt_g = self.optimizers()
        d_loss, _ = self.losses(batch[0])
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        _, g_loss = self.losses(batch[0])
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()

    def configure_optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return torch.optim.Adam(self.disc.parameters(), lr=1e-3), torch.optim.Adam(self.gen.parameters(), lr=1e-3)


@pytest.mark.parametrize("make", [
    lambda: FeatureAlignment(every_n_steps=2, probe_size=16),
    lambda: FeatureSpeedControl(target_speed=0.01, every_n_steps=2, probe_size=16),
    lambda: measurement_suite()[3],  # EffectiveLR
], ids=["FeatureAlignment", "FeatureSpeedControl", "EffectiveLR"])
def test_update_measuring_callbacks_refuse_several_optimizers(make: Any) -> None:
    cb = make()
    owner = type(cb).__name__
    with pytest.raises(ValueError, match=rf"^{owner}: GAN steps 2 optimizers .*update of one optimizer step.*one optimizer"):
        fit([cb], GAN, max_steps=2)


def test_several_optimizers_probe_measurements_run_with_training_unchanged_and_say_what_steps_count(caplog) -> None:
    suite = [cb for cb in measurement_suite() if type(cb).__name__ not in ("FeatureAlignment", "EffectiveLR")]
    logger = MemoryLogger()
    plain = fit([], GAN, max_steps=8)
    with caplog.at_level("INFO"):
        measured = fit(suite, GAN, max_steps=8, logger=logger)
    assert_same_training_state(plain, measured)
    tags = {t for _, m in logger.rows for t in m}
    assert "sharpness/max_eig" in tags and "ntk/max_eig" in tags and any(t.startswith("coord/") for t in tags)
    assert not tags & {"sharpness/lr_x_max_eig", "sharpness/threshold", "sharpness/eos_ratio", "sharpness/preconditioned_max_eig"}
    assert all(math.isfinite(v) for _, v in logger.series("sharpness/max_eig"))
    infos = [r.getMessage() for r in caplog.records]
    assert sum("Sharpness: GAN has 2 optimizers" in m for m in infos) == 1
    assert sum("global_step" in m and "2 steps per training_step" in m for m in infos) == 1


# --------------------------------------------------------------------------------------------------
# training_step returning None
# --------------------------------------------------------------------------------------------------
class SkipSome(TinyClassifier):
    """Returns None on every fourth batch from the second (Lightning runs no backward; the step changes nothing)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch_idx % 4 == 1:
            return None
        return super().training_step(batch, batch_idx)


def test_steps_where_training_step_returned_none_are_skipped_by_update_measurements() -> None:
    plain = fit([], SkipSome, max_steps=8)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = fit(measurement_suite(), SkipSome, max_steps=8, logger=logger)
    assert_same_training_state(plain, measured)
    skipped = {2, 6}  # batches 1 and 5: global steps 2 and 6
    for family in ("align/", "elr/"):
        steps = {s for s, m in logger.rows if any(t.startswith(family) and not t.startswith("elr/si/") for t in m)}
        assert steps and not steps & skipped, (family, sorted(steps))
    assert {s for s, m in logger.rows if "sharpness/max_eig" in m} >= {0, 4, 8}
    assert not [w for w in caught if "non-finite" in str(w.message) or "no copy of the weights" in str(w.message)]


class WarmedUp(SkipSome):
    def __init__(self) -> None:
        super().__init__(optimizer="sgd", lr=20.0)


def test_elr_warmup_is_not_ended_by_a_step_without_gradients() -> None:
    warmup = ELRWarmup(every_n_steps=1, probe_size=32)
    logger = MemoryLogger()
    fit([warmup], WarmedUp, max_steps=4, logger=logger)
    factors = dict(logger.series("elr/warmup_factor"))
    assert 2 not in factors  # the step without a gradient: nothing applied, nothing logged
    assert not warmup.done and all(f < 1 for f in factors.values()), factors


class NoneOnFirstBatch(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return None if batch_idx == 0 else super().training_step(batch, batch_idx)


def test_probe_whose_training_step_returns_none_names_the_callback_and_probe_loss() -> None:
    with pytest.raises(TypeError, match=r"^Sharpness: NoneOnFirstBatch\.training_step returned None .*probe_loss\(self, batch\)"):
        fit([Sharpness(every_n_steps=2, probe_size=16, k=1)], NoneOnFirstBatch, max_steps=2)


# --------------------------------------------------------------------------------------------------
# Complex parameters
# --------------------------------------------------------------------------------------------------
class ComplexPhase(TinyClassifier):
    def __init__(self, trainable: bool = True) -> None:
        super().__init__()
        self.phase = nn.Parameter(torch.randn(8, dtype=torch.cfloat), requires_grad=trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x * self.phase).real)


@pytest.mark.parametrize("index", range(6))
def test_complex_trainable_parameters_are_refused_at_fit_start(index: int) -> None:
    cb = measurement_suite()[index]
    owner = type(cb).__name__
    with pytest.raises(ValueError, match=rf"^{owner}: ComplexPhase has complex trainable parameters \(phase\).*two real parameters"):
        fit([cb], ComplexPhase, max_steps=2)


def test_frozen_complex_parameter_is_measured_with_training_unchanged() -> None:
    plain = fit([], lambda: ComplexPhase(trainable=False), max_steps=4)
    measured = fit(measurement_suite(), lambda: ComplexPhase(trainable=False), max_steps=4)
    assert_same_training_state(plain, measured)
