"""Hessian- and Gauss-Newton-vector products against dense autograd oracles (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_hessian import _case, exact_hessian
from torch import nn
from torch.func import functional_call, jacrev

from lightning_align.measure import operators as hvp_module
from lightning_align.measure.operators import FlatOperator, FlatParams, ggn_operator, hessian_operator, hvp


def test_flat_params_round_trip() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    fp = FlatParams.of(net)
    assert fp.dim == 3 * 4 + 4 + 4 * 2 + 2
    v = torch.arange(fp.dim, dtype=torch.float32)
    parts = fp.unflatten(v)
    assert parts["0.weight"].shape == (4, 3)
    assert torch.equal(fp.flatten(parts), v)
    with pytest.raises(ValueError, match="flat vector"):
        fp.unflatten(torch.zeros(3))


@pytest.mark.parametrize("name", ["tanh", "skip", "conv"])
def test_forward_and_double_backward_match_dense_hessian(name: str) -> None:
    model, loss_fn, batch = _case(name)
    h = exact_hessian(model, loss_fn, batch)
    v = torch.randn(h.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for method in ("forward", "double_backward", "auto"):
        assert torch.allclose(hvp(model, loss_fn, batch, v, method=method), h @ v, atol=1e-10)


@pytest.mark.parametrize("name", ["layernorm", "batchnorm"])
def test_default_is_exact_through_affine_norms(name: str) -> None:
    model, loss_fn, batch = _case(name)
    h = exact_hessian(model, loss_fn, batch)
    with hessian_operator(model, loss_fn, batch) as op:
        dense = torch.stack([op(e) for e in torch.eye(op.dim, dtype=torch.float64)], 1)
    assert torch.allclose(dense, h, atol=1e-10)
    assert torch.allclose(dense, dense.T, atol=1e-12)


def test_auto_falls_back_to_forward_when_double_backward_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    model, loss_fn, batch = _case("tanh")
    real = hvp_module._double_backward_operator

    def broken(*args):
        op = real(*args)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the derivative for 'fancy_op' is not implemented")

        return FlatOperator(matvec=matvec, params=op.params, loss=op.loss, method="double_backward")

    monkeypatch.setattr(hvp_module, "_double_backward_operator", broken)
    v = torch.ones(FlatParams.of(model).dim, dtype=torch.float64)
    with pytest.warns(UserWarning, match="forward-over-reverse"):
        out = hvp(model, loss_fn, batch, v)
    assert torch.allclose(out, exact_hessian(model, loss_fn, batch) @ v, atol=1e-10)


def test_ggn_matches_explicit_jacobians() -> None:
    for name in ("tanh", "layernorm"):
        model, loss_fn, batch = _case(name)
        x, y = batch
        fp = FlatParams.of(model)
        flat = fp.flatten([p.detach() for p in fp.tensors])
        out_fn = lambda f: functional_call(model, fp.unflatten(f), (x,))  # noqa: E731
        jac = jacrev(out_fn)(flat).reshape(-1, fp.dim)  # (n*c, P)
        out = out_fn(flat).detach()
        h_out = torch.autograd.functional.hessian(lambda o: loss_fn(o.view_as(out), y), out.reshape(-1))
        ggn = jac.T @ h_out @ jac
        v = torch.randn(fp.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        with ggn_operator(model, loss_fn, batch) as op:
            assert torch.allclose(op(v), ggn @ v, atol=1e-10)
            assert float(op.loss) == pytest.approx(float(loss_fn(out, y)))


def test_ggn_equals_hessian_for_linear_model_and_mse() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64))
    v = torch.randn(10, dtype=torch.float64)
    with ggn_operator(model, nn.functional.mse_loss, batch) as op:
        gv = op(v)
    assert torch.allclose(gv, hvp(model, nn.functional.mse_loss, batch, v), atol=1e-12)


def test_operators_leave_the_model_alone() -> None:
    model, loss_fn, batch = _case("batchnorm")
    before = copy.deepcopy(model.state_dict())
    v = torch.ones(FlatParams.of(model).dim, dtype=torch.float64)
    for method in ("double_backward", "auto"):
        hvp(model, loss_fn, batch, v, method=method)
    with ggn_operator(model, loss_fn, batch) as op:
        op(v)
    assert all(torch.equal(before[k], model.state_dict()[k]) for k in before)
    assert all(p.grad is None for p in model.parameters())


def test_errors() -> None:
    model, loss_fn, batch = _case("tanh")
    v = torch.ones(FlatParams.of(model).dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="method must be"):
        hvp(model, loss_fn, batch, v, method="magic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"pair \(inputs, targets\)"):
        hvp(model, loss_fn, batch[0], v)
    with pytest.raises(ValueError, match="scalar"):
        hvp(model, lambda o, y: o.sum(1), batch, v)


def test_linear_loss_warns_zero_hessian() -> None:
    model = nn.Linear(3, 1).double()
    batch = (torch.randn(4, 3, dtype=torch.float64), None)
    with pytest.warns(UserWarning, match="does not depend on the parameters"):
        out = hvp(model, lambda o, _: o.mean(), batch, torch.ones(4, dtype=torch.float64))
    assert torch.equal(out, torch.zeros(4, dtype=torch.float64))


def test_operator_carries_the_loss_gradient_for_a_cold_start() -> None:
    model, loss_fn, batch = _case("tanh")
    x, y = batch
    expected = torch.autograd.grad(loss_fn(model(x), y), [p for p in model.parameters() if p.requires_grad])
    with hessian_operator(model, loss_fn, batch) as op:
        assert op.gradient is not None
        assert torch.allclose(op.gradient, torch.cat([g.reshape(-1) for g in expected]), atol=1e-12)
    with hessian_operator(model, loss_fn, batch, method="forward") as op:
        assert op.gradient is None
