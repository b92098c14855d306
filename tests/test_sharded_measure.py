"""The pure pieces of sharded measurement: finite-difference Hessian-vector products against the autograd
Hessian, and Lanczos on vectors split over 2 processes (gloo) against the whole-vector run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from sharded_helpers import run_sharded
from torch import nn

from lightning_align.measure.alignment import finite_difference_feature_speed
from lightning_align.measure.lanczos import lanczos_eigs, lanczos_extremes
from lightning_align.measure.sharded import finite_difference_hessian


def _net(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.Tanh(), nn.Linear(12, 3)).to(dtype)
    return net, torch.randn(32, 6, dtype=dtype), torch.randint(0, 3, (32,))


def _dense_hessian(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in net.parameters()]).double()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        parts = dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
        return nn.functional.cross_entropy(torch.func.functional_call(net.double(), parts, (x.double(),)), y)

    return torch.autograd.functional.hessian(loss, theta)


@pytest.mark.parametrize("dtype, richardson, rel", [
    (torch.float32, False, 2e-4), (torch.float32, True, 1e-4), (torch.float64, False, 1e-8), (torch.float64, True, 1e-10),
])
def test_finite_difference_products_match_the_dense_hessian(dtype: torch.dtype, richardson: bool, rel: float) -> None:
    net, x, y = _net(dtype)
    h = _dense_hessian(net, x, y)
    net.to(dtype)
    params = list(net.parameters())
    before = [p.detach().clone() for p in params]
    grads = [torch.full_like(p, 7.0) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    with finite_difference_hessian(lambda: nn.functional.cross_entropy(net(x), y), params, None, richardson=richardson) as op:
        for seed in range(3):
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            hv = op(v.to(dtype)).double()
            assert float((hv - h @ v).norm() / (h @ v).norm()) < rel
    assert all(torch.equal(p, b) for p, b in zip(params, before)), "parameters not restored bit-exactly"
    assert all(p.grad is g for p, g in zip(params, grads)), ".grad not restored"


def _split_lanczos(folder: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    diag = torch.linspace(-2.0, 5.0, 41, dtype=torch.float64)  # whole operator: diag + a rank-one coupling
    u = torch.cos(torch.arange(41, dtype=torch.float64))
    cut = 20 if rank == 0 else 41  # uneven slices: 20 and 21 entries
    lo = 0 if rank == 0 else 20
    sl = slice(lo, cut)

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t

    def matvec(v_local: torch.Tensor) -> torch.Tensor:
        u_dot_v = all_reduce((u[sl] * v_local).sum())
        return diag[sl] * v_local + 0.3 * u[sl] * u_dot_v

    gen = torch.Generator().manual_seed(rank)
    res = lanczos_eigs(matvec, cut - lo, k=2, tol=1e-10, max_matvecs=41, generator=gen, dtype=torch.float64,
                       all_reduce=all_reduce, refine=True)
    top, bottom = lanczos_extremes(matvec, cut - lo, tol=1e-10, max_matvecs=41, generator=gen, dtype=torch.float64,
                                   all_reduce=all_reduce)
    norm = float(all_reduce(res.vectors[:, 0].square().sum()))
    Path(folder, f"{rank}.json").write_text(json.dumps(
        {"values": res.values.tolist(), "top": float(top.values[0]), "bottom": float(bottom.values[0]), "norm": norm}))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_lanczos_on_vectors_split_over_ranks_equals_the_whole_operator(tmp_path: Path) -> None:
    run_sharded(_split_lanczos, str(tmp_path), timeout=120)
    whole = torch.diag(torch.linspace(-2.0, 5.0, 41, dtype=torch.float64))
    u = torch.cos(torch.arange(41, dtype=torch.float64))
    exact = torch.linalg.eigvalsh(whole + 0.3 * torch.outer(u, u))
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["values"] == pytest.approx([float(exact[-1]), float(exact[-2])], rel=1e-9)
        assert got["top"] == pytest.approx(float(exact[-1]), rel=1e-9)
        assert got["bottom"] == pytest.approx(float(exact[0]), rel=1e-9)
        assert got["norm"] == pytest.approx(1.0, rel=1e-12)  # Ritz vectors normalised over both slices


def test_the_consistency_check_tells_a_smooth_loss_from_a_piecewise_linear_one() -> None:
    """Halving the step moves the top Rayleigh quotient by ~1e-5 on a tanh net, by far more on a ReLU net, where
    finite differences pick up units switching on and off between ``θ ± h v``."""
    results = {}
    for act in (nn.Tanh, nn.ReLU):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 64), act(), nn.Linear(64, 64), act(), nn.Linear(64, 3))
        x, y = torch.randn(128, 6), torch.randint(0, 3, (128,))
        params = list(net.parameters())
        with finite_difference_hessian(lambda: nn.functional.cross_entropy(net(x), y), params, None) as op:
            top = lanczos_eigs(op, op.dim, tol=1e-6, max_matvecs=100, init=op.gradient, generator=torch.Generator().manual_seed(0))
            results[act] = op.consistency(top.vectors[:, 0])
    assert results[nn.Tanh] < 1e-4
    assert results[nn.ReLU] > 1e-3


def test_feature_speeds_whose_difference_quotient_has_not_converged_are_nan_with_a_warning() -> None:
    """The sharded feature speed compares ``J·Δθ`` at the steps ``h`` and ``h/2``: at the default step on a smooth
    net no warning; at a step where float32 rounding swamps the difference, NaN and a warning naming the layers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))

    class Loss(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

    model = Loss()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        smooth = finite_difference_feature_speed(model, (x, y), ["net.0", "net.2"], None, lr=0.1)
    assert all(r.speed == r.speed for _, r in smooth.items())
    with pytest.warns(UserWarning, match=r"changes by more than 0\.01 relative .* at net\.0"):
        rough = finite_difference_feature_speed(model, (x, y), ["net.0", "net.2"], None, lr=0.1, step=1e-8)
    assert rough["net.0"].speed != rough["net.0"].speed  # NaN


class _LMLoss(nn.Module):
    """``batch -> loss`` of a causal LM on its own tokens."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=batch, labels=batch).loss


def _tiny_gpt2() -> tuple[nn.Module, torch.Tensor]:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    model.config._attn_implementation = "eager"
    return model, torch.randint(0, 40, (4, 12))


def test_finite_difference_products_on_a_tiny_hf_gpt2_match_double_backward() -> None:
    """A Hugging Face model (tied readout, GELU, attention): the sharded route's products against the exact
    double-backward products, and its consistency check passes there."""
    from lightning_align.measure.operators import hessian_operator, hvp

    model, ids = _tiny_gpt2()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_of() -> torch.Tensor:
        return model(input_ids=ids, labels=ids).loss

    with finite_difference_hessian(loss_of, params, None) as op:
        for seed in range(2):
            v = torch.randn(op.dim, generator=torch.Generator().manual_seed(seed))
            exact = hvp(_LMLoss(model), lambda loss, _: loss, (ids, None), v, method="double_backward")
            assert float((op(v) - exact).norm() / exact.norm()) < 2e-3
        top = lanczos_eigs(op, op.dim, tol=1e-6, max_matvecs=120, init=op.gradient, generator=torch.Generator().manual_seed(0))
        assert op.consistency(top.vectors[:, 0]) < 1e-3
    with hessian_operator(_LMLoss(model), lambda loss, _: loss, (ids, None), method="double_backward") as exact_op:
        exact_top = lanczos_eigs(exact_op, exact_op.dim, tol=1e-6, max_matvecs=120, generator=torch.Generator().manual_seed(0))
    assert float(top.values[0]) == pytest.approx(float(exact_top.values[0]), rel=2e-3)


def test_finite_difference_feature_speed_on_a_tiny_hf_gpt2_matches_the_exact_one() -> None:
    from lightning_align.measure.alignment import feature_speed

    model, ids = _tiny_gpt2()

    layers = ["model.transformer.h.0", "model.transformer.h.1"]
    exact = feature_speed(_LMLoss(model), None, ids, layers, lr=0.1)
    approx = finite_difference_feature_speed(_LMLoss(model), ids, layers, None, lr=0.1)
    for name in layers:
        assert approx[name].speed == pytest.approx(exact[name].speed, rel=1e-3)
        assert approx[name].cos_angle == pytest.approx(exact[name].cos_angle, abs=1e-3)
