"""Lanczos against torch.linalg.eigvalsh on random symmetric matrices."""

from __future__ import annotations

import pytest
import torch

from lightning_align.measure.lanczos import lanczos_eigs, lanczos_tridiagonal


def _sym(n: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=dtype)
    return (a + a.T) / 2


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_eigvalsh(which: str, seed: int) -> None:
    a = _sym(60, seed)
    exact = torch.linalg.eigvalsh(a)
    res = lanczos_eigs(lambda v: a @ v, 60, k=3, which=which, tol=1e-8, max_matvecs=60, generator=_gen(seed), dtype=torch.float64)
    if which == "LA":
        want = exact.flip(0)[:3]
    elif which == "SA":
        want = exact[:3]
    else:
        want = exact[exact.abs().argsort(descending=True)][:3]
    scale = exact.abs().max()
    assert torch.allclose(res.values, want, atol=1e-6 * float(scale), rtol=0)
    # Ritz vectors are eigenvectors with the reported residuals
    for i in range(3):
        y = res.vectors[:, i]
        r = (a @ y - res.values[i] * y).norm()
        assert abs(float(r) - float(res.residuals[i])) < 1e-6 * float(scale)
        assert abs(float(y.norm()) - 1) < 1e-10


def test_float32_tolerance_and_stopping() -> None:
    # spectrum with a clear gap at the top: converges long before dim products
    g = _gen(3)
    q, _ = torch.linalg.qr(torch.randn(400, 400, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.tensor([10.0, 7.0, 5.0]), torch.rand(397, generator=g, dtype=torch.float64) * 2 - 1])
    a = (q * lam) @ q.T
    a32 = a.float()
    res = lanczos_eigs(lambda v: a32 @ v, 400, k=3, tol=1e-3, max_matvecs=100, generator=_gen(0))
    assert res.num_matvecs < 60
    assert torch.allclose(res.values, torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), atol=1e-2)
    assert (res.residuals <= 1e-3 * 10.0 * 1.0001).all()


def test_warm_start_needs_fewer_products() -> None:
    g = _gen(4)
    q, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    lam = torch.linspace(-1, 1, 300, dtype=torch.float64)
    lam[-1] = 1.3
    a = (q * lam) @ q.T
    cold = lanczos_eigs(lambda v: a @ v, 300, tol=1e-4, generator=_gen(1), dtype=torch.float64)
    # perturbed operator, started from the previous vector
    b = a + 1e-3 * _sym(300, 5)
    warm = lanczos_eigs(lambda v: b @ v, 300, tol=1e-3, init=cold.vectors, generator=_gen(2), dtype=torch.float64)
    cold_b = lanczos_eigs(lambda v: b @ v, 300, tol=1e-3, generator=_gen(2), dtype=torch.float64)
    exact = torch.linalg.eigvalsh(b)[-1]
    assert abs(float(warm.values[0] - exact)) < 1e-3 * 1.3
    assert warm.num_matvecs < cold_b.num_matvecs / 2


def test_exact_eigenvector_start_does_not_hide_the_top() -> None:
    a = torch.diag(torch.arange(1.0, 51.0, dtype=torch.float64))
    second = torch.zeros(50, dtype=torch.float64)
    second[48] = 1.0  # eigenvector of 49, not of the top 50
    res = lanczos_eigs(lambda v: a @ v, 50, tol=1e-6, init=second, generator=_gen(0), dtype=torch.float64)
    assert abs(float(res.values[0]) - 50.0) < 1e-4


def test_breakdown_continues_in_complement() -> None:
    # identity-plus-rank-one: the Krylov space of most starts has dimension 2
    u = torch.ones(20, dtype=torch.float64) / 20**0.5
    a = torch.eye(20, dtype=torch.float64) + 4 * torch.outer(u, u)
    res = lanczos_eigs(lambda v: a @ v, 20, k=3, tol=1e-8, generator=_gen(0), dtype=torch.float64)
    assert torch.allclose(res.values, torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64), atol=1e-8)


def test_small_dim_is_exact() -> None:
    a = _sym(5, 7)
    res = lanczos_eigs(lambda v: a @ v, 5, k=5, which="SA", tol=0.0, generator=_gen(0), dtype=torch.float64)
    assert torch.allclose(res.values, torch.linalg.eigvalsh(a), atol=1e-10)
    assert res.num_matvecs == 5


def test_nan_operator_gives_nan() -> None:
    res = lanczos_eigs(lambda v: v * float("nan"), 10, k=2, generator=_gen(0))
    assert torch.isnan(res.values).all() and res.num_matvecs == 1 and not res.converged


def test_seeded_runs_are_identical_and_leave_global_rng() -> None:
    a = _sym(30, 8)
    state = torch.get_rng_state()
    r1 = lanczos_eigs(lambda v: a @ v, 30, tol=1e-6, generator=_gen(9), dtype=torch.float64)
    r2 = lanczos_eigs(lambda v: a @ v, 30, tol=1e-6, generator=_gen(9), dtype=torch.float64)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(r1.values, r2.values) and r1.num_matvecs == r2.num_matvecs


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=0), "k must be"),
        (dict(k=11), "k=11"),
        (dict(which="XX"), "which"),
        (dict(max_matvecs=1, k=2), "max_matvecs"),
        (dict(tol=-1.0), "tol"),
        (dict(init=torch.zeros(3)), "init must have shape"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lanczos_eigs(lambda v: v, 10, **kwargs)


def test_tridiagonal_quadrature_weights() -> None:
    a = _sym(40, 10)
    v = torch.randn(40, generator=_gen(0), dtype=torch.float64)
    theta, w, basis = lanczos_tridiagonal(lambda x: a @ x, v, steps=40)
    assert abs(float(w.sum()) - 1) < 1e-10
    # a full run reproduces the spectrum and v^T f(A) v / |v|^2 for f = x^2
    assert torch.allclose(theta, torch.linalg.eigvalsh(a), atol=1e-8)
    vn = v / v.norm()
    assert abs(float((w * theta**2).sum()) - float(vn @ a @ a @ vn)) < 1e-8
    assert torch.allclose(basis @ basis.T, torch.eye(40, dtype=torch.float64), atol=1e-10)


def test_extremes_one_run() -> None:
    from lightning_align.measure.lanczos import lanczos_extremes

    a = _sym(80, 11)
    exact = torch.linalg.eigvalsh(a)
    top, bottom = lanczos_extremes(lambda v: a @ v, 80, k_top=2, k_bottom=1, tol=1e-8, generator=_gen(0), dtype=torch.float64)
    assert torch.allclose(top.values, exact.flip(0)[:2], atol=1e-6)
    assert torch.allclose(bottom.values, exact[:1], atol=1e-6)
    assert top.num_matvecs == bottom.num_matvecs <= 80
    assert abs(float(top.vectors[:, 0] @ bottom.vectors[:, 0])) < 1e-6
