"""The pattern catalogue: Trainer features and Lightning callbacks that users combine with the suite.

Each pattern is a fit (or a tuner run, or a fit and a resume) done twice, without and with every measurement callback
(small probes, measuring every 2 steps); training must end bit-identical: weights, buffers, optimizer state, the step
count, and what the pattern itself decided (the learning rate found, the batch size chosen, the epoch it stopped at).
The shapes of ``training_step`` (metrics, lazy modules, several optimizers, ``None`` steps) are in
tests/test_patterns_catalogue.py; models of other libraries in tests/test_zoo.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, assert_same_training_state, fit, measurement_suite, tiny_loader
from lightning.pytorch.callbacks import (
    EarlyStopping,
    GradientAccumulationScheduler,
    LearningRateMonitor,
    ModelCheckpoint,
    StochasticWeightAveraging,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.tuner import Tuner
from lightning.pytorch.utilities import CombinedLoader
from torch import nn

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*the training data set has only.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*self.log.*:UserWarning"),
]


class Validated(TinyClassifier):
    """Logs a validation loss (for EarlyStopping, checkpoints and the validation loop)."""

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return tiny_loader(n=32, seed=5)


class OneCycle(TinyClassifier):
    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TwoLoaders(TinyClassifier):
    """A dict of training loaders (``CombinedLoader``): the batch is ``{"a": (x, y), "b": (x, y)}``."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return sum(super(TwoLoaders, self).training_step(part, batch_idx) for part in batch.values())

    def probe_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class BatchSized(TinyClassifier):
    """Owns its loader, with the ``batch_size`` attribute the batch-size finder scales."""

    def __init__(self) -> None:
        super().__init__()
        self.batch_size = 4

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return tiny_loader(n=64, batch_size=self.batch_size)


def _twice(run: Callable[[list[pl.Callback]], tuple[pl.LightningModule, pl.Trainer]]) -> None:
    plain, measured = run([]), run(measurement_suite())
    assert_same_training_state(plain, measured)


def test_stochastic_weight_averaging() -> None:
    _twice(lambda cbs: fit([*cbs, StochasticWeightAveraging(swa_lrs=1e-2, swa_epoch_start=1)], max_epochs=3, max_steps=-1))


def test_early_stopping_stops_at_the_same_epoch() -> None:
    def run(cbs: list[pl.Callback]) -> tuple[pl.LightningModule, pl.Trainer]:
        stop = EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0)  # stops after the second validation
        return fit([*cbs, stop], Validated, max_epochs=10, max_steps=-1, val_check_interval=1.0,
                   num_sanity_val_steps=0, limit_val_batches=2)

    plain, measured = run([]), run(measurement_suite())
    assert plain[1].current_epoch == measured[1].current_epoch < 10
    assert_same_training_state(plain, measured)


def test_validation_loop_inside_epochs() -> None:
    _twice(lambda cbs: fit(cbs, Validated, max_steps=8, val_check_interval=2, limit_val_batches=1))


def test_checkpoint_and_resume(tmp_path) -> None:
    def run(cbs_factory: Callable[[], list[pl.Callback]], folder: str) -> tuple[pl.LightningModule, pl.Trainer]:
        ckpt = ModelCheckpoint(dirpath=tmp_path / folder, every_n_train_steps=4, save_top_k=-1)
        fit([*cbs_factory(), ckpt], max_steps=4, enable_checkpointing=True)
        return fit(cbs_factory(), max_steps=8, ckpt_path=str(tmp_path / folder / "epoch=0-step=4.ckpt"))

    assert_same_training_state(run(list, "plain"), run(measurement_suite, "measured"))


def test_csv_logger_and_learning_rate_monitor(tmp_path) -> None:
    _twice(lambda cbs: fit([*cbs, LearningRateMonitor()], OneCycle, logger=CSVLogger(tmp_path), max_steps=6, log_every_n_steps=1))


def test_gradient_clipping_and_a_per_step_scheduler() -> None:
    _twice(lambda cbs: fit(cbs, OneCycle, max_steps=8, gradient_clip_val=0.5))


def test_gradient_accumulation_scheduler() -> None:
    _twice(lambda cbs: fit([*cbs, GradientAccumulationScheduler({0: 1, 1: 2})], max_epochs=2, max_steps=-1))


def test_a_dict_of_training_loaders() -> None:
    def loaders() -> CombinedLoader:
        return CombinedLoader({"a": tiny_loader(seed=0), "b": tiny_loader(seed=1)}, mode="max_size_cycle")

    _twice(lambda cbs: fit(cbs, TwoLoaders, loader=loaders(), max_steps=6))


def test_learning_rate_finder_finds_the_same_rate() -> None:
    def run(cbs: list[pl.Callback]) -> tuple[pl.LightningModule, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        module = TinyClassifier()
        trainer = pl.Trainer(callbacks=cbs, max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False)
        found = Tuner(trainer).lr_find(module, train_dataloaders=tiny_loader(), num_training=8, update_attr=False)
        module.found_lr = found.suggestion()
        trainer.fit(module, tiny_loader())
        return module, trainer

    plain, measured = run([]), run(measurement_suite())
    assert plain[0].found_lr == measured[0].found_lr
    assert_same_training_state(plain, measured)


def test_batch_size_finder_chooses_the_same_size() -> None:
    def run(cbs: list[pl.Callback]) -> tuple[pl.LightningModule, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        module = BatchSized()
        trainer = pl.Trainer(callbacks=cbs, max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False)
        Tuner(trainer).scale_batch_size(module, mode="power", steps_per_trial=2, max_trials=3)
        trainer.fit(module)
        return module, trainer

    plain, measured = run([]), run(measurement_suite())
    assert plain[0].batch_size == measured[0].batch_size > 4
    assert_same_training_state(plain, measured)


def test_overfit_batches_and_limited_epochs() -> None:
    _twice(lambda cbs: fit(cbs, max_epochs=3, max_steps=-1, overfit_batches=2))
    _twice(lambda cbs: fit(cbs, max_epochs=2, max_steps=-1, limit_train_batches=0.5, reload_dataloaders_every_n_epochs=1))


def test_deterministic_anomaly_detection_and_no_inference_mode() -> None:
    _twice(lambda cbs: fit(cbs, max_steps=4, deterministic=True, detect_anomaly=True, inference_mode=False))


def test_validate_before_fit() -> None:
    def run(cbs: list[pl.Callback]) -> tuple[pl.LightningModule, pl.Trainer]:
        pl.seed_everything(0, verbose=False)
        module = Validated()
        trainer = pl.Trainer(callbacks=cbs, max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_checkpointing=False, enable_model_summary=False)
        trainer.validate(module, tiny_loader())
        trainer.fit(module, tiny_loader())
        return module, trainer

    _twice(run)


def test_an_exception_inside_a_probe_leaves_the_model_as_it_was() -> None:
    """An interrupt (here a KeyboardInterrupt raised inside the probe's loss) ends the fit as Lightning ends it;
    the model's flags, buffers and gradients are those of the moment before the probe."""

    class InterruptedOnce(TinyClassifier):
        probes = 0

        def probe_loss(self, batch: Any) -> torch.Tensor:
            InterruptedOnce.probes += 1
            if InterruptedOnce.probes == 3:
                raise KeyboardInterrupt
            return super().training_step(batch, 0)

    pl.seed_everything(0, verbose=False)
    module = InterruptedOnce()
    snapshot: dict[str, Any] = {}

    class Snapshot(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
            snapshot.update(state={k: v.clone() for k, v in pl_module.state_dict().items()},
                            training=[m.training for m in pl_module.modules()])

    from lightning_align import Sharpness

    # Snapshot runs after Sharpness's on_train_batch_end of the same step only if listed first: list it first.
    trainer = pl.Trainer(callbacks=[Snapshot(), Sharpness(every_n_steps=1, probe_size=16)], max_steps=6, accelerator="cpu",
                         logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    with pytest.raises(SystemExit):  # Lightning catches the interrupt, shuts down gracefully, then exits with 1
        trainer.fit(module, tiny_loader())
    assert trainer.interrupted and InterruptedOnce.probes == 3
    assert [m.training for m in module.modules()] == snapshot["training"]
    for key, value in module.state_dict().items():
        assert torch.equal(value, snapshot["state"][key]), key
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in module.parameters())
