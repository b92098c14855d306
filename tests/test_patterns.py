"""Every Lightning pattern keeps the two promises: measuring never changes training, a value is right or refused.

Each class of use here broke on an earlier main (silently, or with an error naming neither callback nor fix):
manual optimization, state changed in ``forward``, frozen/unfrozen parameters, callback objects reused or
resumed with other settings, small data, NaN probes.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, measurement_suite, tiny_loader
from lightning.pytorch.callbacks import BackboneFinetuning, ModelCheckpoint
from torch import nn

from lightning_align import EffectiveLR, NTKSpectrum, RankMonitor, Sharpness


def _tags(logger: MemoryLogger) -> set[str]:
    return {t for _, m in logger.rows for t in m}


def _last(logger: MemoryLogger) -> dict[str, float]:
    out: dict[str, float] = {}
    for _, m in logger.rows:
        out.update(m)
    return out


# --------------------------------------------------------------------------------------------------
# Manual optimization
# --------------------------------------------------------------------------------------------------
class ManualModule(TinyClassifier):
    """Manual optimization with one optimizer; ``probe_loss`` only when asked."""

    def __init__(self, with_probe_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False
        if with_probe_loss:
            self.probe_loss = self._loss  # instance attribute: the protocol looks it up by name

    def _loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        loss = self._loss(batch)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def test_manual_optimization_with_probe_loss_is_bit_identical() -> None:
    plain = fit([], ManualModule)
    measured = fit(measurement_suite(), ManualModule)
    assert_same_training_state(plain, measured)


def test_manual_optimization_without_probe_loss_is_refused_at_fit_start() -> None:
    with pytest.raises(ValueError, match=r"Sharpness.*manual optimization.*probe_loss"):
        fit([Sharpness(every_n_steps=2, probe_size=16)], lambda: ManualModule(with_probe_loss=False))


def test_optimizer_step_inside_a_probe_is_refused_with_weights_restored() -> None:
    class StepInProbeLoss(ManualModule):
        def probe_loss(self, batch: Any) -> torch.Tensor:  # a user mistake: stepping inside the probe
            return self.training_step(batch, 0)

    module = StepInProbeLoss(with_probe_loss=False)
    pl.seed_everything(0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"Sharpness.*optimizer step.*probe"):
        fit([Sharpness(every_n_steps=2, probe_size=16)], module)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------------------------------
# State changed in forward
# --------------------------------------------------------------------------------------------------
class StatefulModule(TinyClassifier):
    """A forward that counts calls in a re-assigned buffer, in-place buffers and Python attributes."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("input_mean", torch.zeros(8))
        self.python_calls = 0
        self.history: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls = self.calls + 1
        self.seen += x.shape[0]
        with torch.no_grad():  # a running average of the inputs: an in-place update with a per-sample value
            self.input_mean.mul_(0.9).add_(0.1 * x.mean(0))
        self.python_calls += 1
        self.history.append(x.shape[0])
        return self.net(x)


def test_state_changed_in_forward_is_restored_after_every_probe() -> None:
    plain_module, plain_trainer = fit([], StatefulModule)
    measured_module, measured_trainer = fit(measurement_suite(), StatefulModule)
    assert_same_training_state((plain_module, plain_trainer), (measured_module, measured_trainer))
    assert measured_module.python_calls == plain_module.python_calls
    assert measured_module.history == plain_module.history


# --------------------------------------------------------------------------------------------------
# Frozen and unfrozen parameters
# --------------------------------------------------------------------------------------------------
class PartlyFrozen(TinyClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.net[0].requires_grad_(False)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def test_frozen_layer_is_measured_by_every_callback_and_training_unchanged() -> None:
    plain = fit([], PartlyFrozen)
    logger = MemoryLogger()
    measured = fit(measurement_suite(), PartlyFrozen, logger=logger)
    assert_same_training_state(plain, measured)
    tags = set(_tags(logger))
    assert "sharpness/max_eig" in tags and "ntk/max_eig" in tags
    assert any(t.startswith("align/cos/") for t in tags)
    assert all(math.isfinite(v) for t, v in _last(logger).items() if t.startswith("sharpness/"))


class Finetune(TinyClassifier):
    """A backbone (``net[0]``) frozen until epoch 2 by Lightning's ``BackboneFinetuning``."""

    @property
    def backbone(self) -> nn.Module:
        return self.net[0]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([p for n, p in self.named_parameters() if not n.startswith("net.0.")], lr=0.05)


def test_unfreezing_mid_run_restarts_warm_state() -> None:
    logger = MemoryLogger()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=2, lambda_func=lambda epoch: 1.0)
    sharp = Sharpness(every_n_steps=2, probe_size=16, k=2)
    fit([finetuning, sharp], Finetune, max_steps=24, logger=logger)
    values = logger.series("sharpness/max_eig")
    assert len(values) >= 6 and all(math.isfinite(v) for _, v in values)


# --------------------------------------------------------------------------------------------------
# Callback state
# --------------------------------------------------------------------------------------------------
def test_callbacks_reused_for_a_second_trainer_measure_again() -> None:
    suite = measurement_suite()
    fit(suite, max_steps=4)
    logger = MemoryLogger()
    fit(suite, max_steps=4, logger=logger)
    for family in ("sharpness/max_eig", "ntk/max_eig", "align/loss_decrease", "coord/"):
        steps = [s for t in _tags(logger) if t.startswith(family) for s, _ in logger.series(t)]
        assert 0 in steps, f"{family} was not measured at step 0 of the second fit"


def test_state_key_does_not_depend_on_schedule_and_name_separates_instances() -> None:
    assert Sharpness(every_n_steps=10).state_key == Sharpness(every_n_steps=20, probe_size=8).state_key
    assert Sharpness(name="a").state_key != Sharpness(name="b").state_key
    fit([Sharpness(every_n_steps=2, probe_size=16, name="top"), Sharpness(every_n_steps=3, probe_size=8, name="other")])


def test_resume_with_changed_schedule_keeps_state(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    fit([NTKSpectrum(every_n_steps=2, probe_size=8, k=2), ckpt], max_steps=4, enable_checkpointing=True)
    ntk = NTKSpectrum(every_n_steps=3, probe_size=8, k=2)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit([ntk], max_steps=8, ckpt_path=str(tmp_path / "last.ckpt"), logger=logger)
    assert not [w for w in caught if "no saved state" in str(w.message)]  # the state is found
    steps = [s for s, _ in logger.series("ntk/distance_from_init")]
    assert 4 not in steps  # the resume step was measured before the checkpoint: not again
    assert all(v > 0 for _, v in logger.series("ntk/distance_from_init"))  # not rebased to the resume point


def test_resume_without_state_warns_naming_the_callback(tmp_path) -> None:
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=4)
    fit([ckpt], max_steps=4, enable_checkpointing=True)
    with pytest.warns(UserWarning, match=r"NTKSpectrum.*no saved state"):
        fit([NTKSpectrum(every_n_steps=2, probe_size=8, k=2)], max_steps=6, ckpt_path=str(tmp_path / "last.ckpt"))


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------
def test_probe_size_above_the_data_is_capped_with_a_warning() -> None:
    loader = tiny_loader(n=24, batch_size=8)
    with pytest.warns(UserWarning, match=r"NTKSpectrum.*probe_size=500.*24"):
        fit([NTKSpectrum(every_n_steps=2, probe_size=500, k=2)], loader=loader, max_steps=2)


class OneShotStream(torch.utils.data.IterableDataset):
    """A stream that cannot be restarted: every sample is handed out once, across all iterators."""

    def __init__(self, n: int = 96) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)
        self.cursor = 0
        self.served: list[int] = []

    def __iter__(self):
        while self.cursor < len(self.x):
            i = self.cursor
            self.cursor += 1
            self.served.append(i)
            yield self.x[i], self.y[i]


class CountingModule(TinyClassifier):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.trained_on = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.trained_on += batch[0].shape[0]
        return super().training_step(batch, batch_idx)


def test_probe_never_takes_samples_from_a_non_restartable_stream() -> None:
    stream = OneShotStream()
    loader = torch.utils.data.DataLoader(stream, batch_size=16)
    module, _ = fit([Sharpness(every_n_steps=2, probe_size=16, k=2)], CountingModule, loader=loader, max_steps=6)
    assert module.trained_on == 96  # all of the stream reached training


# --------------------------------------------------------------------------------------------------
# NaN probes and RankMonitor's inputs
# --------------------------------------------------------------------------------------------------
def test_nan_probe_logs_nan_for_every_tag_with_one_warning() -> None:
    good = MemoryLogger()
    fit(measurement_suite(), logger=good, max_steps=2)
    x = torch.randn(32, 8)
    x[3, 2] = float("nan")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randint(0, 3, (32,))), batch_size=8)
    for cb in measurement_suite():
        bad = MemoryLogger()
        cb.set_probe_batch((x, torch.randint(0, 3, (32,))))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit([cb], logger=bad, max_steps=1, loader=loader)
        steps = sorted({s for s, m in bad.rows if any(t.startswith(cb.family + "/") for t in m)})
        for step in steps:
            expected = {t for t in good.at(step) if t.startswith(cb.family + "/")}
            if isinstance(cb, EffectiveLR):  # scale invariance cannot be tested on NaN outputs: said in its own warning
                expected -= {"elr/spread", "elr/log_spread_std", "elr/critical_lr", "elr/lr_over_critical"}
            missing = expected - set(bad.at(step))
            assert not missing, f"{type(cb).__name__} dropped {sorted(missing)[:5]} at step {step}"
        assert any(math.isnan(v) for step in steps for v in bad.at(step).values()), type(cb).__name__
        nan_warnings = [w for w in caught if str(w.message).startswith("lightning_align: non-finite")]
        assert len(nan_warnings) == 1, [str(w.message) for w in nan_warnings]


class TokenModel(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.out = nn.Linear(8, 10)
        self.unused = nn.Linear(8, 8)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(tokens)).mean(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _token_loader() -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randint(0, 10, (32, 5), generator=g), torch.randint(0, 10, (32,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8)


def test_rank_monitor_jacobian_on_token_inputs_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"RankMonitor\(jacobian_points=.*\).*integer"):
        fit([RankMonitor(every_n_steps=2, probe_size=8, jacobian_points=2)], TokenModel, loader=_token_loader(), max_steps=2)


def test_rank_monitor_unused_layer_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match=r"RankMonitor.*'unused'.*not called"):
        fit([RankMonitor(every_n_steps=2, probe_size=8, layers=["unused"])], TokenModel, loader=_token_loader(), max_steps=2)


class TupleOutput(TinyClassifier):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.net(x), {"aux": 1}

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0])[0], batch[1])


def test_rank_monitor_on_a_tuple_output_measures_the_prediction() -> None:
    logger = MemoryLogger()
    fit([RankMonitor(every_n_steps=2, probe_size=16, jacobian_points=2)], TupleOutput, max_steps=2, logger=logger)
    assert math.isfinite(logger.by_step("rank/jacobian_numerical")[0])


def test_rank_monitor_refuses_a_jacobian_too_large() -> None:
    class Wide(TinyClassifier):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x).repeat(1, 2**21)  # 3 * 2**21 outputs per sample, 8 inputs: 5e7 entries

    with pytest.raises(ValueError, match=r"RankMonitor\(jacobian_points=1\).*set jacobian_points=0"):
        fit([RankMonitor(every_n_steps=2, probe_size=4, jacobian_points=1, layers=["net.0"])], Wide, max_steps=1)
