"""NTKSpectrum: logged values match the measure functions, training is untouched, state survives a resume."""

from __future__ import annotations

import copy
import math
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, assert_same_training_state, fit, tiny_loader
from lightning.pytorch.loggers import TensorBoardLogger
from test_ntk import oracle_ntk

from lightning_align.callbacks.ntk import NTKSpectrum
from lightning_align.measure.ntk import flatten_kernel, kernel_target_alignment


class Recording(NTKSpectrum):
    """Keeps each step's metrics and an independent oracle kernel computed on a copy of the model."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[tuple[int, dict[str, float], torch.Tensor]] = []
        self.twins: list[torch.nn.Module] = []

    def measure(self, trainer: Any, pl_module: Any, batch: Any) -> Any:
        metrics = super().measure(trainer, pl_module, batch)
        twin = copy.deepcopy(pl_module).double().eval()
        kernel = oracle_ntk(twin, batch[0].double(), self.trace_outputs)
        self.records.append((trainer.global_step, dict(metrics), kernel))
        self.twins.append(twin)
        return metrics


def test_logged_values_match_oracle() -> None:
    cb = Recording(every_n_steps=2, k=5, probe_size=12)
    _, trainer = fit([cb], max_steps=4)
    assert [s for s, _, _ in cb.records] == [0, 2, 4]
    k0 = flatten_kernel(cb.records[0][2])
    prev = None
    for step, metrics, kernel in cb.records:
        flat = flatten_kernel(kernel)
        lam = torch.linalg.eigvalsh(flat).flip(0)
        assert metrics["ntk/max_eig"] == pytest.approx(float(lam[0]), rel=1e-4)
        assert metrics["ntk/trace"] == pytest.approx(float(flat.trace()), rel=1e-4)
        # float32 kernel: λ_min carries ~eps·λ_max, so cond carries a relative ~eps·cond (~5e-5 here)
        assert metrics["ntk/cond"] == pytest.approx(float(lam[0] / lam[-1]), rel=1e-3)
        y = torch.nn.functional.one_hot(cb.probe_batch[1], 3).double().reshape(-1)
        assert metrics["ntk/alignment"] == pytest.approx(kernel_target_alignment(flat, y), rel=1e-4)
        want = 1 - float((k0 * flat).sum() / (k0.norm() * flat.norm()))
        assert metrics["ntk/distance_from_init"] == pytest.approx(want, abs=1e-5)
        if prev is None:
            assert "ntk/velocity" not in metrics
        else:
            want = 1 - float((prev * flat).sum() / (prev.norm() * flat.norm()))
            assert metrics["ntk/velocity"] == pytest.approx(want, abs=1e-5)
        prev = flat
    assert cb.records[0][1]["ntk/distance_from_init"] == pytest.approx(0.0, abs=1e-6)
    assert cb.records[-1][1]["ntk/distance_from_init"] > 1e-4
    assert float(trainer.callback_metrics["ntk/max_eig"]) == pytest.approx(cb.records[-1][1]["ntk/max_eig"])


def test_traced_kernel_values() -> None:
    cb = Recording(every_n_steps=3, k=3, probe_size=10, trace_outputs=True)
    fit([cb], max_steps=3)
    for _, metrics, kernel in cb.records:
        lam = torch.linalg.eigvalsh(kernel).flip(0)
        assert metrics["ntk/max_eig"] == pytest.approx(float(lam[0]), rel=1e-4)
        y = torch.nn.functional.one_hot(cb.probe_batch[1]).double()
        assert metrics["ntk/alignment"] == pytest.approx(kernel_target_alignment(kernel, y), rel=1e-4)


@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_training_is_bit_identical(solver: str) -> None:
    base = fit(max_steps=5)
    with_cb = fit([NTKSpectrum(every_n_steps=2, k=3, probe_size=16, solver=solver)], max_steps=5)  # type: ignore[arg-type]
    assert_same_training_state(base, with_cb)


def test_matrix_free_path_logs_top_eig_and_trace() -> None:
    exact = Recording(every_n_steps=10, k=2, probe_size=20)
    fit([exact], max_steps=1)
    free = NTKSpectrum(every_n_steps=10, k=2, probe_size=20, max_exact_size=10)
    with pytest.warns(UserWarning, match="only ntk/max_eig, ntk/trace"):
        _, trainer = fit([free], max_steps=1)
    metrics = trainer.callback_metrics
    assert "ntk/cond" not in metrics and "ntk/alignment" not in metrics
    assert float(metrics["ntk/max_eig"]) == pytest.approx(exact.records[0][1]["ntk/max_eig"], rel=1e-3)
    assert 2 <= int(metrics["ntk/matvecs"]) <= free.max_matvecs
    # matrix-free, the trace is the Hutch++ estimate: unbiased, within a few standard errors of the exact one
    exact_trace, stderr = exact.records[0][1]["ntk/trace"], float(metrics["ntk/trace_stderr"])
    assert 0 < stderr < 0.05 * exact_trace
    assert abs(float(metrics["ntk/trace"]) - exact_trace) <= 4 * stderr


def test_reference_kernel_survives_resume(tmp_path: Any) -> None:
    first = Recording(every_n_steps=2, k=2, probe_size=8)
    module, trainer = fit([first], max_steps=2)
    ckpt = tmp_path / "a.ckpt"
    trainer.save_checkpoint(ckpt)
    k0 = first.state_dict()["k0"]
    assert k0.shape == (24, 24)
    second = Recording(every_n_steps=2, k=2, probe_size=8)
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        callbacks=[second], max_steps=4, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(TinyClassifier(), tiny_loader(), ckpt_path=str(ckpt))
    assert torch.equal(second._k0, k0)
    assert [s for s, _, _ in second.records] == [4]
    assert "ntk/velocity" in second.records[0][1]  # the step-2 kernel came back with the checkpoint
    assert 0 < second.records[0][1]["ntk/distance_from_init"] < 1


def test_weights_subset_and_tensorboard(tmp_path: Any) -> None:
    cb = Recording(every_n_steps=5, k=2, probe_size=6, weights=[r"net\.7\..*"], figure_every=1)
    fit([cb], max_steps=1, logger=TensorBoardLogger(str(tmp_path)))
    assert any(p.name.startswith("events") for p in tmp_path.rglob("*"))
    # Readout-only NTK: (h_i·h_j + 1) δ_ab, so its top eigenvalue is the top one of the feature Gram + 1.
    twin = cb.twins[0]
    feats = twin.net[:7](cb.probe_batch[0].double())
    gram = feats @ feats.T + 1
    assert cb.records[0][1]["ntk/max_eig"] == pytest.approx(float(torch.linalg.eigvalsh(gram)[-1]), rel=1e-4)
    assert cb.records[0][1]["ntk/trace"] == pytest.approx(3 * float(gram.trace()), rel=1e-4)


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="bn_mode='eval'"):
        NTKSpectrum(bn_mode="train")
    with pytest.raises(ValueError, match=r"NTKSpectrum\(k=0\): k must be an int >= 1; got 0"):
        NTKSpectrum(k=0)
    with pytest.raises(ValueError, match=r"'nope' matches no trainable parameter of TinyClassifier"):
        fit([NTKSpectrum(weights=["nope"])], max_steps=1)
    untouched = TinyClassifier()
    before = copy.deepcopy(untouched.state_dict())
    with pytest.raises(ValueError, match=r"probe_size=4, k=13.*1 <= k <= 12"):
        fit([NTKSpectrum(k=13, probe_size=4)], module=untouched, max_steps=1)
    assert all(torch.equal(before[k], v) for k, v in untouched.state_dict().items())  # before the first step
    x = torch.randn(16, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.randn(16, 5)), batch_size=8)
    with pytest.raises(ValueError, match="alignment=False"):
        fit([NTKSpectrum(probe_size=4, alignment=True)], loader=loader, max_steps=1)
    with pytest.raises(ValueError, match=r"NTKSpectrum\(max_memory_gb=0\): max_memory_gb must be a finite float > 0 or None"):
        NTKSpectrum(max_memory_gb=0)
    with pytest.raises(ValueError, match="trace_samples must be an int >= 2"):
        NTKSpectrum(trace_samples=1)
    # a measurement that cannot fit is refused before anything is built, naming the argument
    with pytest.raises(ValueError, match=r"NTKSpectrum \(probe_size=16, k=2\): .*matrix-free path needs about .*max_memory_gb=1e-06"):
        fit([NTKSpectrum(k=2, probe_size=16, max_memory_gb=1e-6)], max_steps=1)


def test_example_mlp_with_batchnorm() -> None:
    from example_modules import MLP

    module = MLP(in_features=8, num_classes=3, width=16, depth=2, norm="batch", dropout=0.1)
    cb = NTKSpectrum(every_n_steps=2, k=4, probe_size=8)
    _, trainer = fit([cb], module=module, loader=tiny_loader(), max_steps=2)
    for name in ("ntk/max_eig", "ntk/trace", "ntk/cond", "ntk/alignment", "ntk/distance_from_init"):
        assert math.isfinite(float(trainer.callback_metrics[name])) or name == "ntk/cond"


def test_configurable_from_yaml() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(NTKSpectrum, "ntk")
    cfg = parser.parse_string("ntk: {every_n_steps: 50, k: 4, solver: lanczos, weights: ['readout[.].*'], trace_outputs: true}")
    cb = NTKSpectrum(**cfg.ntk)
    assert (cb.every_n_steps, cb.k, cb.solver, cb.weights, cb.trace_outputs) == (50, 4, "lanczos", ["readout[.].*"], True)
