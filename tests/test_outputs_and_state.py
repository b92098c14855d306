"""Measurements never kill training, and checkpoint state is checked when it is loaded.

- A diverging learning rate (the quickstart MLP on digits at lr=1000, a point every LR sweep has) finishes and logs
  NaN/inf, and ``lightning-align sweep`` records such a point as diverged, not failed.
- A TensorBoard writer that fails (a full disk) costs one warning per callback and kind of write; training is
  bit-identical to the run without the suite.
- Settings changed since the checkpoint re-reference the measurement at the resume step with an info line; values a
  callback cannot have saved are refused at load, naming the callback and the key.
"""

from __future__ import annotations

import json
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call, jacrev

from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, measurement_suite, tiny_loader
from lightning_align import (
    AlignSummary,
    CoordCheck,
    EffectiveLR,
    ELRWarmup,
    FeatureAlignment,
    FeatureSpeedControl,
    NTKSpectrum,
    RankMonitor,
    Sharpness,
    sweep,
)
from lightning_align.callbacks import summary as summary_callback
from lightning_align.measure.ntk import kernel_distance


# ------------------------------------------------------------------------------------------- diverging fits


def test_a_diverging_quickstart_fit_finishes_and_logs_non_finite_values(tmp_path: Path) -> None:
    """lr=1000 on the quickstart MLP: NTK eigenvalues beyond TensorBoard's histogram buckets (1e20), then NaN
    weights; the fit used to die in ``add_histogram`` ("The histogram is empty")."""
    from example_modules import MLP, DigitsDataModule

    data = DigitsDataModule(batch_size=64)
    data.setup("fit")
    rec = MemoryLogger()
    callbacks = [
        NTKSpectrum(every_n_steps=1, probe_size=16, k=4, figure_every=1),
        Sharpness(every_n_steps=2, probe_size=32, max_matvecs=10),
        RankMonitor(every_n_steps=2, probe_size=32, jacobian_points=0),
        EffectiveLR(every_n_steps=1, probe_size=32, figure_every=1),
    ]
    module = MLP(width=32, depth=3, norm="batch", lr=1000.0, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, trainer = fit(callbacks, module=module, loader=data.train_dataloader(), max_steps=6,
                         logger=[TensorBoardLogger(tmp_path, default_hp_metric=False), rec])
    assert trainer.global_step == 6
    logged = [v for _, values in rec.rows for v in values.values()]
    assert any(math.isfinite(v) and v > 1e20 for v in rec.values("ntk/max_eig")), rec.values("ntk/max_eig")
    assert any(not math.isfinite(v) for v in logged)


def _write_events(directory: Path, losses: list[float]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(directory)) as writer:
        for step, loss in enumerate(losses):
            writer.add_scalar("train/loss", loss, step)


def test_sweep_records_a_diverged_point_as_diverged_and_a_failed_one_as_failed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A point whose loss went non-finite is an outcome (the report's loss is inf there), even when its fit then
    failed; a point that failed with finite losses stays unfinished."""
    points = [sweep.Point({"lr": lr}, 0, f"lr={lr}", tmp_path / f"lr={lr}", ["--lr", lr]) for lr in ("1000", "1", "0.1")]
    runs = {"1000": ([2.3, float("nan"), float("nan")], 1), "1": ([2.3, 1e30, float("inf")], 0), "0.1": ([2.3, 2.0], 1)}

    def results(todo: list[sweep.Point], jobs: int, reuse: bool) -> Any:
        for p in todo:
            p.directory.mkdir(parents=True)
            losses, rc = runs[p.values["lr"]]
            _write_events(p.directory, losses)
            yield p, rc, 1.0

    monkeypatch.setattr(sweep, "_results", results)
    unfinished = sweep.run_points(points)
    assert [p.name for p in unfinished] == ["lr=0.1"]
    markers = {p.values["lr"]: json.loads((p.directory / sweep.MARKER).read_text()) for p in points[:2]}
    assert markers["1000"]["diverged_at"] == 1 and markers["1"]["diverged_at"] == 2


# ------------------------------------------------------------------------------------------- failing writers


class FullDisk:
    """A SummaryWriter whose every write fails as on a full disk."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("add_"):
            def fail(*args: Any, **kwargs: Any) -> None:
                raise OSError(28, "No space left on device")

            return fail
        if name == "_get_file_writer":
            return lambda: self
        if name in ("flush", "close"):
            return lambda: None
        raise AttributeError(name)


class FullDiskLogger(TensorBoardLogger):
    @property
    def experiment(self) -> Any:
        self.__dict__.setdefault("_full_disk", FullDisk())
        return self.__dict__["_full_disk"]


class Quiet(TinyClassifier):
    """No ``self.log``: without the suite, nothing is written to the (failing) writer."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


def test_a_failing_writer_warns_once_per_callback_and_kind_and_training_is_bit_identical(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_terminal(*args: Any, **kwargs: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(summary_callback, "print_summary", no_terminal)
    suite = measurement_suite(every_n_steps=2)
    for cb in suite:
        cb.figure_every = 1  # every figure of the suite: NTK spectrum, alignment and ELR profiles
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with_suite = fit([*suite, AlignSummary()], module=Quiet, logger=FullDiskLogger(tmp_path, default_hp_metric=False))
    plain = fit([], module=Quiet, logger=FullDiskLogger(tmp_path, default_hp_metric=False))
    assert_same_training_state(with_suite, plain)
    failures = [re.match(r"(\w+): writing the (.+?) '.*' to .* failed \((\w+): ", str(w.message)) for w in caught]
    pairs = [(m.group(1), m.group(2)) for m in failures if m]
    assert all(m.group(3) == "OSError" for m in failures if m)
    assert len(pairs) == len(set(pairs)), pairs  # once per callback and kind
    assert set(pairs) == {
        ("FeatureAlignment", "dashboard"),  # the custom-scalars layout and the HParams summary, written once per run
        *((type(cb).__name__, "scalar") for cb in suite),
        *((name, "figure") for name in ("FeatureAlignment", "NTKSpectrum", "EffectiveLR", "CoordCheck", "RankMonitor")),
        ("NTKSpectrum", "histogram"), ("RankMonitor", "histogram"),
        ("EffectiveLR", "text"),
        ("AlignSummary", "summary table"),
    }


# ------------------------------------------------------------------------------------------- resume


def _checkpoint(tmp_path: Path, callbacks: list[Callback], steps: int = 4) -> Path:
    fit([*callbacks, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=steps, save_top_k=-1)], max_steps=steps,
        enable_checkpointing=True)
    (path,) = tmp_path.glob("*.ckpt")
    return path


def _oracle_kernel(module: pl.LightningModule, batch: Any) -> torch.Tensor:
    """The NTK by explicit Jacobians (float64, eval mode: running BatchNorm statistics, no dropout)."""
    model = TinyClassifier()
    model.load_state_dict(module.state_dict())
    model = model.double().eval()
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = batch[0].double()
    jac = jacrev(lambda p: functional_call(model, p, (x,)))(params)
    rows = torch.cat([j.reshape(x.shape[0] * 3, -1) for j in jac.values()], dim=1)
    return rows @ rows.T


@pytest.mark.parametrize("changed", [{"probe_seed": 3}, {"probe_size": 6}])
def test_changed_probe_on_resume_re_references_at_the_resume_step(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, changed: dict[str, int]
) -> None:
    path = _checkpoint(tmp_path, [NTKSpectrum(every_n_steps=2, probe_size=8, k=4)])
    at_resume = TinyClassifier()
    at_resume.load_state_dict(torch.load(path, weights_only=False)["state_dict"])
    rec, ntk = MemoryLogger(), NTKSpectrum(every_n_steps=2, k=4, **{"probe_size": 8, **changed})
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    module, _ = fit([ntk], loader=tiny_loader(), max_steps=8, logger=rec, ckpt_path=str(path))
    name, new = next(iter(changed.items()))
    old = {"probe_seed": 0, "probe_size": 8}[name]
    assert (f"NTKSpectrum: {name} changed since the checkpoint ({old} -> {new}): distance_from_init and velocity are "
            "measured from the resume point.") in caplog.text
    distances = dict(rec.series("ntk/distance_from_init"))
    assert list(distances) == [4, 6, 8] and distances[4] == pytest.approx(0.0, abs=1e-6)
    expected = kernel_distance(_oracle_kernel(at_resume, ntk.probe_batch), _oracle_kernel(module, ntk.probe_batch))
    assert distances[8] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    # A checkpoint saved without settings (an older version) is taken to have today's: its reference is kept.
    caplog.clear()
    state = {k: v for k, v in ntk.state_dict().items() if k != "settings"}
    old_style = NTKSpectrum(every_n_steps=2, k=4, probe_size=8, probe_seed=5)
    old_style.load_state_dict(state)
    assert torch.equal(old_style._k0, ntk._k0) and "changed since the checkpoint" not in caplog.text


@pytest.mark.parametrize(
    ("make", "state", "key"),
    [
        (lambda: NTKSpectrum(probe_size=8), {"last_step": "4"}, "last_step = '4'"),
        (lambda: NTKSpectrum(probe_size=8), {"last_step": 4, "k0": torch.full((8, 8), math.nan)}, "k0 = a torch.float32"),
        (lambda: NTKSpectrum(probe_size=8), {"last_step": 4, "k0": torch.ones(8, 6)}, "k0 = a torch.float32 tensor of shape (8, 6)"),
        (lambda: NTKSpectrum(probe_size=8), {"num_measurements": -2}, "num_measurements = -2"),
        (lambda: CoordCheck(), {"h0": {"net.0": torch.tensor([1.0, math.inf])}}, "h0['net.0']"),
        (lambda: Sharpness(), {"vectors": torch.ones(5)}, "vectors = a torch.float32 tensor of shape (5,)"),
        (lambda: Sharpness(), {"overhead_budget": {"spent": -1.0}}, "overhead_budget.spent = -1.0"),
        (lambda: ELRWarmup(), {"done": "yes"}, "done = 'yes'"),
        (lambda: ELRWarmup(), {"factor": 5.0}, "factor = 5.0"),
        (lambda: FeatureAlignment(), {"num_measurements": 2.5}, "num_measurements = 2.5"),
        (lambda: FeatureSpeedControl(0.05), {"plan": [["net.0.weight"]], "multipliers": [1e8]}, "multipliers[0] = 100000000.0"),
    ],
)
def test_values_a_callback_cannot_have_saved_are_refused_at_load(make: Any, state: dict[str, Any], key: str) -> None:
    cb = make()
    name = type(cb).__name__
    with pytest.raises(ValueError, match=rf"^{name}: the checkpoint's state for this callback has {re.escape(key)}"):
        cb.load_state_dict(state)


def test_multipliers_are_clipped_when_max_multiplier_changed_since_the_checkpoint(caplog: pytest.LogCaptureFixture) -> None:
    saved = FeatureSpeedControl(0.05, max_multiplier=100.0).state_dict()
    state = {**saved, "plan": [["net.0.weight"], ["net.4.weight"]], "multipliers": [50.0, 2.0]}
    cb = FeatureSpeedControl(0.05, max_multiplier=10.0)
    caplog.set_level(logging.INFO, logger="lightning.pytorch")
    cb.load_state_dict(state)
    assert cb.multipliers == [10.0, 2.0]
    assert "FeatureSpeedControl: max_multiplier changed since the checkpoint (100.0 -> 10.0)" in caplog.text
    with pytest.raises(ValueError, match=r"FeatureSpeedControl: layers changed since the checkpoint"):
        FeatureSpeedControl(0.05, layers=["net.0"]).load_state_dict(state)


class StepSpy(Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_before_optimizer_step(self, *args: Any) -> None:
        self.steps += 1


def test_a_step_after_the_checkpoint_is_refused_before_the_first_optimizer_step(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path, [CoordCheck(every_n_steps=2, probe_size=16)])
    checkpoint = torch.load(path, weights_only=False)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("CoordCheck")]
    checkpoint["callbacks"][key]["last_step"] = 10**9
    torch.save(checkpoint, path)
    spy = StepSpy()
    with pytest.raises(ValueError, match=r"CoordCheck: the checkpoint's state for this callback has last_step = 1000000000; "
                                         r"expected a step <= 4"):
        fit([CoordCheck(every_n_steps=2, probe_size=16), spy], max_steps=6, ckpt_path=str(path))
    assert spy.steps == 0
