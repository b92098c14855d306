"""Sharpness callback: oracle values, bit-identical training, warm start, state, errors, NaN."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, tiny_loader
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.func import functional_call

from lightning_align.callbacks.sharpness import Sharpness
from lightning_align.measure.operators import FlatParams


def _probe_hessian(module: TinyClassifier, batch: Any) -> torch.Tensor:
    """Exact Hessian of the probe loss: BatchNorm on batch statistics, dropout off (float64 copy)."""
    model = copy.deepcopy(module).double()
    model.train()
    model.net[3].eval()  # dropout off
    x, y = batch[0].double(), batch[1]
    fp = FlatParams.of(model)

    def f(flat: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, fp.unflatten(flat), (x,)), y)

    return torch.autograd.functional.hessian(f, fp.flatten([p.detach() for p in fp.tensors]))


def _module(optimizer: str = "adam", seed: int = 0, cls: type = TinyClassifier, **kwargs: Any) -> TinyClassifier:
    torch.manual_seed(seed)
    return cls(optimizer=optimizer, **kwargs)


@pytest.mark.parametrize("method", ["auto", "forward"])
def test_training_is_bit_identical_with_sharpness(method: str) -> None:
    for optimizer in ("adam", "sgd"):
        cb = Sharpness(
            every_n_steps=2, k=2, trace=True, density=True, probe_size=32, trace_samples=2, trace_basis=2,
            density_steps=4, method=method, bn_mode="train" if method == "auto" else "eval",
        )
        if method == "forward":  # forward-over-reverse refuses affine norms: use a model without them
            module, reference = _module(optimizer), _module(optimizer)
            for m in (module, reference):
                m.net[1], m.net[5] = nn.BatchNorm1d(16, affine=False), nn.LayerNorm(16, elementwise_affine=False)
        else:
            module, reference = _module(optimizer), _module(optimizer)
        with_cb = fit([cb], module=module, max_steps=5)
        without = fit([], module=reference, max_steps=5)
        assert_same_training_state(with_cb, without)


@pytest.mark.parametrize("gradient_check", [False, True])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_logged_values_match_exact_hessian(optimizer: str, gradient_check: bool) -> None:
    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=3, k=3, min_eig=True, probe_size=48, tol=1e-4, max_matvecs=150, gradient_check=gradient_check)
    module, trainer = fit([cb], module=_module(optimizer), max_steps=6, logger=rec)
    h = _probe_hessian(module, cb.probe_batch)
    exact = torch.linalg.eigvalsh(h)
    scale = float(exact.abs().max())
    last = dict(rec.rows[-1][1])
    assert rec.rows[-1][0] == 6
    assert abs(last["sharpness/max_eig"] - float(exact[-1])) <= 1e-3 * scale
    assert abs(last["sharpness/eig_2"] - float(exact[-2])) <= 1e-3 * scale
    assert abs(last["sharpness/eig_3"] - float(exact[-3])) <= 1e-3 * scale
    assert abs(last["sharpness/min_eig"] - float(exact[0])) <= 1e-3 * scale
    opt = trainer.optimizers[0]
    lr = opt.param_groups[0]["lr"]
    if optimizer == "sgd":  # momentum 0.9
        assert last["sharpness/threshold"] == pytest.approx(2 * 1.9)
        assert last["sharpness/lr_x_max_eig"] == pytest.approx(lr * last["sharpness/max_eig"])
        assert "sharpness/preconditioned_max_eig" not in last
    else:
        beta1, beta2 = opt.param_groups[0]["betas"]
        eps = opt.param_groups[0]["eps"]
        assert last["sharpness/threshold"] == pytest.approx(2 * (1 + beta1) / (1 - beta1))
        params = list(module.parameters())
        v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params]).double()
        step = float(opt.state[params[0]]["step"])
        p_diag = (v / (1 - beta2**step)).sqrt() + eps
        dense = torch.linalg.eigvals(lr * torch.diag(1 / p_diag) @ h).real.max()
        assert last["sharpness/lr_x_max_eig"] == pytest.approx(float(dense), rel=2e-3)
        assert last["sharpness/preconditioned_max_eig"] == pytest.approx(float(dense) / lr, rel=2e-3)
        # no preconditioner before Adam's first step
        assert "sharpness/lr_x_max_eig" not in rec.rows[0][1]
    assert last["sharpness/eos_ratio"] == pytest.approx(last["sharpness/lr_x_max_eig"] / last["sharpness/threshold"])
    assert [s for s, _ in rec.series("sharpness/max_eig")] == [0, 3, 6]


def test_warm_start_uses_fewer_products_and_survives_state_dict() -> None:
    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=1, probe_size=32, min_eig=False, tol=1e-3)
    fit([cb], module=_module("sgd", lr=1e-3), max_steps=4, logger=rec)
    matvecs = [m for _, m in rec.series("sharpness/matvecs")]
    assert matvecs[0] > max(matvecs[1:]), matvecs
    state = cb.state_dict()
    assert state["vectors"].shape[1] == 1 and state["last_step"] == 4
    # a fresh callback loaded from the state starts warm
    cold_rec, warm_rec = MemoryLogger(), MemoryLogger()
    cold, warm = Sharpness(every_n_steps=1, probe_size=32, min_eig=False), Sharpness(every_n_steps=1, probe_size=32, min_eig=False)
    warm.load_state_dict({**state, "last_step": -1})
    fit([cold], module=_module("sgd", lr=1e-3), max_steps=1, logger=cold_rec)
    fit([warm], module=_module("sgd", lr=1e-3), max_steps=1, logger=warm_rec)
    assert warm_rec.series("sharpness/matvecs")[0][1] < cold_rec.series("sharpness/matvecs")[0][1]


def test_warm_estimate_of_an_unchanged_hessian_takes_at_most_two_products() -> None:
    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=1, probe_size=32)
    module, _ = fit([cb], module=_module("sgd", lr=0.0), max_steps=3, logger=rec)  # lr 0: the same Hessian each time
    matvecs = [m for _, m in rec.series("sharpness/matvecs")]
    values = [v for _, v in rec.series("sharpness/max_eig")]
    residuals = [r for _, r in rec.series("sharpness/max_eig_residual")]
    assert matvecs[0] > 2 and all(m <= 2 for m in matvecs[1:]), matvecs
    exact = float(torch.linalg.eigvalsh(_probe_hessian(module, cb.probe_batch))[-1])
    for value, residual in zip(values, residuals):
        assert residual <= 1e-2 * abs(value) * 1.0001
        assert abs(value - exact) <= residual + 1e-6 * exact  # the residual bounds the error


def test_gradient_check_costs_one_product_more_when_nothing_moved() -> None:
    plain, checked = MemoryLogger(), MemoryLogger()
    fit([Sharpness(every_n_steps=1, probe_size=32)], module=_module("sgd", lr=0.0), max_steps=2, logger=plain)
    fit([Sharpness(every_n_steps=1, probe_size=32, gradient_check=True)], module=_module("sgd", lr=0.0), max_steps=2, logger=checked)
    p, c = [m for _, m in plain.series("sharpness/matvecs")], [m for _, m in checked.series("sharpness/matvecs")]
    assert p[0] == c[0] and all(2 <= m <= 3 for m in c[1:]), (p, c)
    for (_, a), (_, b) in zip(plain.series("sharpness/max_eig"), checked.series("sharpness/max_eig")):
        assert abs(a - b) <= 2e-2 * abs(a)


def test_high_precision_reaches_float32_rounding() -> None:
    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=2, probe_size=48, tol=1e-5, max_matvecs=150, high_precision=True)
    module, _ = fit([cb], module=_module("sgd"), max_steps=2, logger=rec)
    exact = float(torch.linalg.eigvalsh(_probe_hessian(module, cb.probe_batch))[-1])  # float64 model
    last = rec.rows[-1][1]
    assert abs(last["sharpness/max_eig"] - exact) <= 1e-7 * abs(exact)
    assert cb.state_dict()["vectors"].dtype == torch.float32  # the warm start is kept in the model's dtype


def test_tensorboard_density_and_trace(tmp_path) -> None:
    cb = Sharpness(every_n_steps=2, probe_size=32, trace=True, density=True, density_steps=10, density_vectors=2)
    rec = MemoryLogger()
    fit([cb], max_steps=2, logger=[TensorBoardLogger(tmp_path), rec])
    last = rec.rows[-1][1]
    assert last["sharpness/trace_stderr"] > 0 and "sharpness/trace" in last
    dens = cb.last_density
    assert abs(float(torch.trapezoid(dens.density, dens.grid)) - 1) < 1e-3
    assert any(p.name.startswith("events") for p in tmp_path.rglob("*"))


class NaNProbe(TinyClassifier):
    def probe_loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y) * float("nan")


def test_nan_loss_is_logged_with_a_warning_and_training_goes_on() -> None:
    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=2, probe_size=32)
    with pytest.warns(UserWarning, match="sharpness/max_eig=nan"):
        _, trainer = fit([cb], module=_module(cls=NaNProbe), max_steps=4, logger=rec)
    assert trainer.global_step == 4
    values = [v for _, v in rec.series("sharpness/max_eig")]
    assert len(values) == 3 and all(v != v for v in values)


class Frozen(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.net.requires_grad_(False)
        self.dummy = nn.Parameter(torch.zeros(1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD([self.dummy], lr=0.1)


def test_no_trainable_parameters_is_a_clear_error() -> None:
    module = Frozen()
    module.dummy.requires_grad_(False)
    with pytest.raises(ValueError, match="Frozen has no trainable parameters"):
        fit([Sharpness(probe_size=16)], module=module, max_steps=1)


def test_k_larger_than_parameter_count() -> None:
    module = Frozen()  # one trainable parameter
    with pytest.raises(ValueError, match="only 1 trainable parameters"):
        fit([Sharpness(probe_size=16, k=1, min_eig=True)], module=module, max_steps=1)


class VectorLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


def test_non_scalar_loss_is_a_clear_error_before_training() -> None:
    module = VectorLoss()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="scalar"):
        fit([Sharpness(probe_size=16)], module=module, max_steps=1)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_preconditioned_needs_adam() -> None:
    with pytest.raises(ValueError, match="needs a single Adam or AdamW"):
        fit([Sharpness(probe_size=16, preconditioned=True)], module=_module("sgd"), max_steps=1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(max_matvecs=1, k=1, min_eig=True), r"Sharpness\(max_matvecs=1\): max_matvecs must be at least k \+ 1 = 2; got 1"),
        (dict(tol=-1.0), "tol"),
        (dict(method="fd"), "method"),
        (dict(preconditioned="yes"), "preconditioned"),
        (dict(bn_mode="batch"), "bn_mode"),
        (dict(every_n_steps=0), "every_n_steps"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        Sharpness(**kwargs)


def test_bn_eval_mode_differs_from_train_mode() -> None:
    rec_train, rec_eval = MemoryLogger(), MemoryLogger()
    fit([Sharpness(every_n_steps=3, probe_size=32, tol=1e-5, max_matvecs=100)], max_steps=3, logger=rec_train)
    fit([Sharpness(every_n_steps=3, probe_size=32, bn_mode="eval", tol=1e-5, max_matvecs=100)], max_steps=3, logger=rec_eval)
    a, b = rec_train.rows[-1][1]["sharpness/max_eig"], rec_eval.rows[-1][1]["sharpness/max_eig"]
    assert abs(a - b) > 1e-3 * abs(a)


def test_jsonargparse_can_build_it() -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(Sharpness, "sharpness")
    cfg = parser.parse_args(["--sharpness.k=2", "--sharpness.preconditioned=true", "--sharpness.method=double_backward"])
    cb = Sharpness(**cfg.sharpness.as_dict())
    assert cb.k == 2 and cb.preconditioned is True


def test_resume_from_checkpoint_stays_warm(tmp_path) -> None:
    cb = Sharpness(every_n_steps=1, probe_size=32, min_eig=False)
    _, trainer = fit([cb], module=_module("sgd", lr=1e-3), max_steps=3)
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    firsts = {}
    for warm in (True, False):
        rec = MemoryLogger()
        resumed = Sharpness(every_n_steps=1, probe_size=32, min_eig=False, warm_start=warm)
        pl.seed_everything(0, verbose=False)
        resumed_trainer = pl.Trainer(
            max_steps=4, accelerator="cpu", logger=rec, callbacks=[resumed], enable_progress_bar=False,
            enable_checkpointing=False, enable_model_summary=False,
        )
        resumed_trainer.fit(_module("sgd", lr=1e-3), tiny_loader(), ckpt_path=str(ckpt))
        steps = rec.series("sharpness/matvecs")
        assert [s for s, _ in steps] == [4]  # step 3 was measured before the checkpoint
        firsts[warm] = steps[0][1]
    assert firsts[True] < firsts[False]


def test_per_group_learning_rates_give_the_lr_weighted_sharpness() -> None:
    """With different lrs per param group (μP, per-layer control), lr_x_max_eig is λmax(P H), P = diag(lr)."""

    class TwoGroups(TinyClassifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            first, rest = list(self.net[0].parameters()), [p for m in self.net[1:] for p in m.parameters()]
            return torch.optim.SGD([{"params": first, "lr": 0.4}, {"params": rest, "lr": 0.05}], lr=0.05)

    rec = MemoryLogger()
    cb = Sharpness(every_n_steps=3, probe_size=48, tol=1e-5, max_matvecs=200, min_eig=False)
    module, trainer = fit([cb], module=lambda: _module("sgd", cls=TwoGroups), max_steps=3, logger=rec)
    h = _probe_hessian(module, cb.probe_batch)
    lrs = torch.cat([torch.full((p.numel(),), 0.4 if i < 2 else 0.05, dtype=torch.float64) for i, p in enumerate(module.parameters())])
    d = lrs.sqrt()
    expected = float(torch.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
    last = dict(rec.rows[-1][1])
    assert last["sharpness/lr_x_max_eig"] == pytest.approx(expected, rel=1e-3)
    assert last["sharpness/lr_x_max_eig"] != pytest.approx(0.4 * last["sharpness/max_eig"], rel=1e-2)
