"""Hessian eigenvalues, trace and density against the exact autograd Hessian on tiny models (float64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_align.measure.hessian import (
    adam_preconditioner,
    hessian_density,
    hessian_eigs,
    hessian_extremes,
    hessian_trace_estimate,
)
from lightning_align.measure.operators import FlatParams

F = nn.functional


class Skip(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.branch, self.out = nn.Linear(4, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + torch.tanh(self.branch(h))
        return self.out(h)


class Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 2, 3), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


def _case(name: str, seed: int = 0):
    torch.manual_seed(seed)
    n = 12
    y_cls = torch.randint(0, 3, (n,))
    if name == "tanh":
        model, x, y, loss = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(n, 4), y_cls, F.cross_entropy
    elif name == "layernorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.GELU(), nn.Linear(5, 2))
        x, y, loss = torch.randn(n, 4), torch.randn(n, 2), F.mse_loss
    elif name == "skip":
        model, x, y, loss = Skip(), torch.randn(n, 4), y_cls, F.cross_entropy
    elif name == "conv":
        model, x, y, loss = Conv(), torch.randn(n, 1, 5, 5), y_cls, F.cross_entropy
    elif name == "batchnorm":
        model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
        x, y, loss = torch.randn(n, 4), y_cls, F.cross_entropy
    else:
        raise KeyError(name)
    model = model.double().train()
    return model, loss, (x.double(), y if y.dtype == torch.long else y.double())


def exact_hessian(model: nn.Module, loss_fn, batch) -> torch.Tensor:
    """Dense Hessian by torch.autograd.functional.hessian on a copy (train-mode BN updates the copy)."""
    clone = copy.deepcopy(model)
    fp = FlatParams.of(clone)
    x, y = batch

    def f(flat: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_call(clone, fp.unflatten(flat), (x,)), y)

    flat = fp.flatten([p.detach() for p in fp.tensors])
    return torch.autograd.functional.hessian(f, flat)


CASES = ["tanh", "layernorm", "skip", "conv", "batchnorm"]


@pytest.mark.parametrize("method", ["forward", "double_backward"])
@pytest.mark.parametrize("name", CASES)
def test_top3_and_bottom_match_eigvalsh(name: str, method: str) -> None:
    model, loss_fn, batch = _case(name)
    if method == "forward" and name in ("layernorm", "batchnorm"):
        # forward-over-reverse is wrong through a trainable LayerNorm / batch-statistics BatchNorm weight in
        # torch 2.14 (tests/test_operators.py): refused with a clear error
        with pytest.raises(ValueError, match="affine normalisation layer '1'"):
            hessian_eigs(model, loss_fn, batch, method=method)
        return
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))
    scale = float(exact.abs().max())
    top = hessian_eigs(model, loss_fn, batch, k=3, which="LA", method=method)
    bottom = hessian_eigs(model, loss_fn, batch, k=1, which="SA", method=method)
    assert torch.allclose(top.values, exact.flip(0)[:3], atol=1e-3 * scale, rtol=0), (top.values, exact.flip(0)[:3])
    assert abs(float(bottom.values[0] - exact[0])) <= 1e-3 * scale
    # one shared run gives both ends at once
    t, b = hessian_extremes(model, loss_fn, batch, k_top=3, k_bottom=1, method=method)
    assert torch.allclose(t.values, exact.flip(0)[:3], atol=1e-3 * scale, rtol=0)
    assert abs(float(b.values[0] - exact[0])) <= 1e-3 * scale


def test_ritz_vectors_are_hessian_eigenvectors() -> None:
    model, loss_fn, batch = _case("tanh")
    h = exact_hessian(model, loss_fn, batch)
    res = hessian_eigs(model, loss_fn, batch, k=2, tol=1e-8, max_matvecs=200)
    for i in range(2):
        y = res.vectors[:, i]
        assert float((h @ y - res.values[i] * y).norm()) <= 1e-6 * float(res.values[0])


def test_bn_eval_mode_uses_running_statistics() -> None:
    model, loss_fn, batch = _case("batchnorm")
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))
    res = hessian_eigs(model, loss_fn, batch, k=1, tol=1e-6)
    assert abs(float(res.values[0] - exact[-1])) <= 1e-5 * float(exact.abs().max())
    model.train()
    train = hessian_eigs(model, loss_fn, batch, k=1, tol=1e-6)
    assert abs(float(train.values[0] - res.values[0])) > 1e-3  # the two objectives differ


def test_no_side_effects() -> None:
    model, loss_fn, batch = _case("batchnorm")
    model.append(nn.Dropout(0.3))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = copy.deepcopy(model.state_dict())
    grads = [p.grad for p in model.parameters()]
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    hessian_eigs(model, loss_fn, batch, k=2, generator=torch.Generator().manual_seed(3))
    hessian_trace_estimate(model, loss_fn, batch)
    model[1].weight.requires_grad_(False)  # the forward operator's path (train-mode BN without buffer updates)
    hessian_eigs(model, loss_fn, batch, k=2, method="forward")
    model[1].weight.requires_grad_(True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert flags == [m.training for m in model.modules()]
    assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert torch.equal(torch.get_rng_state(), rng)


def test_reduce_is_applied_to_every_product() -> None:
    model, loss_fn, batch = _case("tanh")
    calls = []

    def double(v: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return 2 * v

    plain = hessian_eigs(model, loss_fn, batch, tol=1e-8, max_matvecs=200)
    doubled = hessian_eigs(model, loss_fn, batch, tol=1e-8, max_matvecs=200, reduce=double)
    assert len(calls) == doubled.num_matvecs + 1, "every product, and the gradient (a rank-independent cold start)"
    assert abs(float(doubled.values[0] - 2 * plain.values[0])) < 1e-8 * float(plain.values[0])


def test_warm_start_converges_faster() -> None:
    model, loss_fn, batch = _case("skip")
    cold = hessian_eigs(model, loss_fn, batch, tol=1e-4)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    warm = hessian_eigs(model, loss_fn, batch, tol=1e-4, init=cold.vectors)
    again = hessian_eigs(model, loss_fn, batch, tol=1e-4)
    assert abs(float(warm.values[0] - again.values[0])) < 1e-3 * float(again.values[0])
    assert warm.num_matvecs < again.num_matvecs


def test_trace_within_sampling_error() -> None:
    model, loss_fn, batch = _case("conv")
    exact = float(torch.trace(exact_hessian(model, loss_fn, batch)))
    est = hessian_trace_estimate(model, loss_fn, batch, num_samples=30, basis_steps=6)
    assert est.num_matvecs == 36
    assert est.stderr > 0
    assert abs(est.value - exact) <= 4 * est.stderr
    # the estimator is unbiased: over seeds, the mean z-score is small
    zs = []
    for s in range(8):
        e = hessian_trace_estimate(model, loss_fn, batch, num_samples=10, basis_steps=4, generator=torch.Generator().manual_seed(s))
        zs.append((e.value - exact) / e.stderr)
    assert abs(sum(zs) / len(zs)) < 3 / math.sqrt(len(zs)) * 1.5


def test_trace_exact_when_basis_spans_everything() -> None:
    model, loss_fn, batch = _case("tanh")
    exact = float(torch.trace(exact_hessian(model, loss_fn, batch)))
    dim = FlatParams.of(model).dim
    est = hessian_trace_estimate(model, loss_fn, batch, num_samples=0, basis_steps=dim)
    assert abs(est.value - exact) < 1e-8 * abs(exact) + 1e-10


def test_density_integrates_to_one_and_matches_spectrum() -> None:
    model, loss_fn, batch = _case("layernorm")
    exact = torch.linalg.eigvalsh(exact_hessian(model, loss_fn, batch))
    dens = hessian_density(model, loss_fn, batch, num_steps=20, num_vectors=3)
    integral = float(torch.trapezoid(dens.density, dens.grid))
    assert abs(integral - 1) < 1e-3
    assert torch.allclose(dens.weights.sum(1), torch.ones(3, dtype=torch.float64), atol=1e-10)
    assert dens.num_matvecs == 60
    # quadrature reproduces the mean of the spectrum and the extreme nodes approach the ends: each run's first
    # moment is exactly the Rayleigh quotient of its (uniformly random) unit start vector, an unbiased estimate of
    # mean(λ) with variance 2·var(λ)/(n+2); the mean over the runs is within 4 standard deviations
    mean_est = float((dens.weights * dens.nodes).sum(1).mean())
    n, runs = exact.numel(), dens.nodes.shape[0]
    sd = math.sqrt(2 * float(exact.var(unbiased=False)) / ((n + 2) * runs))
    assert abs(mean_est - float(exact.mean())) < 4 * sd
    assert float(dens.nodes.max()) <= float(exact[-1]) + 1e-8
    assert abs(float(dens.nodes.max()) - float(exact[-1])) < 1e-3 * float(exact.abs().max())


def test_adam_preconditioned_sharpness_matches_dense() -> None:
    model, loss_fn, batch = _case("tanh")
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    params = list(model.parameters())
    assert adam_preconditioner(opt, params) is None  # no state before the first step
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    d = adam_preconditioner(opt, params)
    # dense oracle: lr * P^-1 H with P = sqrt(v / (1 - beta2^t)) + eps
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    p_diag = (v / (1 - 0.99**3)).sqrt() + 1e-6
    h = exact_hessian(model, loss_fn, batch)
    dense = torch.linalg.eigvals(0.01 * torch.diag(1 / p_diag) @ h).real.max()
    res = hessian_eigs(model, loss_fn, batch, k=1, tol=1e-6, preconditioner=d)
    assert abs(float(res.values[0] - dense)) < 1e-5 * float(dense)


def test_adam_preconditioner_rejects_sgd() -> None:
    model = nn.Linear(2, 1)
    with pytest.raises(TypeError, match="Adam or AdamW"):
        adam_preconditioner(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters())


def test_clear_errors() -> None:
    model, loss_fn, batch = _case("tanh")
    with pytest.raises(ValueError, match="scalar"):
        hessian_eigs(model, lambda out, y: F.cross_entropy(out, y, reduction="none"), batch)
    with pytest.raises(ValueError, match="only 51 trainable parameters"):
        hessian_eigs(model, loss_fn, batch, k=52)
    frozen = copy.deepcopy(model).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_eigs(frozen, loss_fn, batch)


def test_nan_loss_gives_nan_values() -> None:
    model, loss_fn, batch = _case("tanh")
    x = batch[0].clone()
    x[0, 0] = float("nan")
    res = hessian_eigs(model, loss_fn, (x, batch[1]))
    assert torch.isnan(res.values).all()


def test_unused_and_frozen_parameters() -> None:
    net, loss_fn, batch = _case("tanh")
    net[0].bias.requires_grad_(False)

    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net, self.extra = net, nn.Linear(2, 2).double()  # extra: never used, zero Hessian rows

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = WithUnused()
    for method in ("forward", "double_backward"):
        res = hessian_eigs(model, loss_fn, batch, k=1, which="LA", method=method, tol=1e-6)
        ref = hessian_eigs(net, loss_fn, batch, k=1, which="LA", method=method, tol=1e-6)
        assert abs(float(res.values[0] - ref.values[0])) < 1e-5 * float(ref.values[0])


def test_float64_rayleigh_ritz_matches_the_exact_hessian() -> None:
    from lightning_align.measure.hessian import float64_rayleigh_ritz

    model, loss_fn, batch = _case("batchnorm")  # train-mode BatchNorm: batch statistics, buffers untouched
    h = exact_hessian(model, loss_fn, batch)
    model32 = copy.deepcopy(model).float()
    batch32 = (batch[0].float(), batch[1])
    vectors = torch.randn(h.shape[0], 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = copy.deepcopy(model32.state_dict())
    values, residuals = float64_rayleigh_ritz(model32, loss_fn, batch32, vectors.float())
    for i in range(2):
        y = vectors[:, i].float().double()
        theta = float(y @ h @ y / (y @ y))
        assert float(values[i]) == pytest.approx(theta, rel=1e-6)  # only the float32 rounding of the weights
        assert float(residuals[i]) == pytest.approx(float((h @ y - theta * y).norm() / y.norm()), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model32.state_dict().items())
