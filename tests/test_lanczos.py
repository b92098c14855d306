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
    # a Ritz value with residual r is within r²/gap of its eigenvalue: r <= 1e-2 and gap >= 2 give 5e-5, plus
    # the float32 products' rounding (~1e-6 · ‖A‖)
    assert torch.allclose(res.values, torch.tensor([10.0, 7.0, 5.0], dtype=torch.float64), atol=1e-4, rtol=0)
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


# -- lazy basis, warm estimates, block starts, precision ------------------------------------------
def _gap_operator(n: int = 300, seed: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A symmetric matrix with a separated top eigenvalue 3: (matrix, eigenvalues ascending, eigenvectors)."""
    g = _gen(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.cat([torch.rand(n - 3, generator=g, dtype=torch.float64) * 2 - 1, torch.tensor([2.0, 2.5, 3.0], dtype=torch.float64)])
    return (q * lam) @ q.T, lam, q


def test_basis_grows_lazily_in_blocks() -> None:
    from lightning_align.measure.lanczos import _Basis

    basis = _Basis(1000, torch.float64, torch.device("cpu"))
    for m in range(1, 30):
        basis.append(torch.full((1000,), float(m), dtype=torch.float64))
        capacity = sum(b.shape[0] for b in basis.blocks)
        assert m <= capacity <= max(2, m + 7), (m, capacity)  # never max_matvecs rows up front
        assert basis.size == m and torch.equal(basis[m - 1], torch.full((1000,), float(m), dtype=torch.float64))
    assert [b.shape[0] for b in basis.blocks][:4] == [2, 2, 4, 8]


def test_warm_start_on_an_unmoved_vector_stops_after_one_product() -> None:
    a, lam, q = _gap_operator()
    top = q[:, -1] + 1e-4 * torch.randn(300, generator=_gen(1), dtype=torch.float64)
    res = lanczos_eigs(lambda v: a @ v, 300, tol=1e-2, init=top, init_noise=2.5e-3, generator=_gen(2), dtype=torch.float64, keep_basis=True)
    assert res.num_matvecs == 1 and res.basis is not None and res.basis.shape == (1, 300)
    y = res.vectors[:, 0]
    true_residual = float((a @ y - res.values[0] * y).norm())
    assert abs(true_residual - float(res.residuals[0])) < 1e-10  # the reported residual is the true one
    assert float(res.residuals[0]) <= 1e-2 * 3.0
    assert abs(float(res.values[0]) - 3.0) <= float(res.residuals[0])  # the residual bounds the error


def test_warm_start_on_a_moved_vector_goes_on_as_lanczos() -> None:
    a, lam, q = _gap_operator()
    moved = q[:, -1] + 0.5 * q[:, -2] + 0.3 * q[:, 10]  # the top vector has moved: residual far above tol
    res = lanczos_eigs(lambda v: a @ v, 300, tol=1e-8, init=moved, init_noise=2.5e-9, generator=_gen(3), dtype=torch.float64)
    assert 1 < res.num_matvecs < 100
    assert abs(float(res.values[0]) - 3.0) < 1e-8


def test_min_matvecs_and_krylov_trace() -> None:
    a, lam, q = _gap_operator()
    res = lanczos_eigs(lambda v: a @ v, 300, tol=1e-2, init=q[:, -1], init_noise=0.0, min_matvecs=4, generator=_gen(4),
                       dtype=torch.float64, keep_basis=True)
    assert res.num_matvecs >= 4
    basis = res.basis
    assert torch.allclose(basis @ basis.T, torch.eye(basis.shape[0], dtype=torch.float64), atol=1e-12)
    assert res.krylov_trace == pytest.approx(float(torch.trace(basis @ a @ basis.T)), rel=1e-12)


def test_refine_gives_rayleigh_quotients_and_true_residuals() -> None:
    a, lam, _ = _gap_operator()
    a32 = a.float()
    plain = lanczos_eigs(lambda v: a32 @ v, 300, tol=1e-4, generator=_gen(5))
    fine = lanczos_eigs(lambda v: a32 @ v.float(), 300, tol=1e-4, generator=_gen(5), dtype=torch.float64, refine=True)
    assert fine.num_matvecs == plain.num_matvecs + 1 or fine.num_matvecs <= plain.num_matvecs + 2
    y = fine.vectors[:, 0]
    w = (a32 @ y.float()).double()
    assert float(fine.values[0]) == pytest.approx(float(y @ w), rel=1e-12)
    assert float(fine.residuals[0]) == pytest.approx(float((w - fine.values[0] * y).norm()), rel=1e-6)
    # float64 Lanczos vectors on a float32 operator: the error is float32 rounding of the operator, ~1e-7
    exact_32 = float(torch.linalg.eigvalsh(a32.double())[-1])
    assert abs(float(fine.values[0]) - exact_32) <= 1e-7 * exact_32


@pytest.mark.parametrize("b", [2, 3, 5])
def test_block_start_matches_eigvalsh(b: int) -> None:
    a = _sym(120, 13)
    exact = torch.linalg.eigvalsh(a)
    init = torch.randn(120, b, generator=_gen(b), dtype=torch.float64)
    res = lanczos_eigs(lambda v: a @ v, 120, k=3, tol=1e-10, init=init, block=True, generator=_gen(0), dtype=torch.float64,
                       max_matvecs=120)
    scale = float(exact.abs().max())
    assert torch.allclose(res.values, exact.flip(0)[:3], atol=1e-8 * scale, rtol=0)
    for i in range(3):
        y = res.vectors[:, i]
        assert abs(float((a @ y - res.values[i] * y).norm()) - float(res.residuals[i])) < 1e-8 * scale
    from lightning_align.measure.lanczos import lanczos_extremes

    top, bottom = lanczos_extremes(lambda v: a @ v, 120, tol=1e-10, init=init, block=True, generator=_gen(0),
                                   dtype=torch.float64, max_matvecs=120)
    assert abs(float(top.values[0] - exact[-1])) < 1e-8 * scale and abs(float(bottom.values[0] - exact[0])) < 1e-8 * scale


def test_block_start_sees_a_new_top_along_its_second_column() -> None:
    a, lam, q = _gap_operator()
    # the previous top vector is now the eigenvector of 2.5 (converged: residual 0); a second start column
    # leaning towards the new top (as the loss gradient can) reveals 3.0 in the very first block step, when its
    # Rayleigh quotient exceeds the old value (here ~2.75 > 2.5)
    old_top = q[:, -2]
    lean = q[:, -1] + 0.3 * torch.randn(300, generator=_gen(6), dtype=torch.float64) / 300**0.5
    alone = lanczos_eigs(lambda v: a @ v, 300, tol=1e-2, init=old_top, init_noise=0.0, generator=_gen(7), dtype=torch.float64)
    assert alone.num_matvecs == 1 and abs(float(alone.values[0]) - 2.5) < 1e-12  # stops on the old eigenvalue
    both = lanczos_eigs(lambda v: a @ v, 300, tol=1e-2, init=torch.stack([old_top, lean], 1), init_noise=0.0, block=True,
                        generator=_gen(7), dtype=torch.float64)
    assert abs(float(both.values[0]) - 3.0) <= float(both.residuals[0]) + 1e-12 and float(both.values[0]) > 2.9


# ------------------------------------------------------------------------------------------------------------------
# Reading ahead (the CUDA path: the next product queued before the host reads a step), run on the CPU here


@pytest.fixture
def read_ahead(monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_align.measure.lanczos as lanczos_module

    monkeypatch.setattr(lanczos_module, "_AHEAD_DEVICES", ("cuda", "cpu"))


class _Counted:
    def __init__(self, a: torch.Tensor) -> None:
        self.a, self.calls = a, 0

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.a @ v


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_reading_ahead_runs_the_same_iteration(which: str, split: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import lightning_align.measure.lanczos as lanczos_module

    a = _sym(200, 1)
    kwargs = dict(k=2, which=which, tol=1e-6, max_matvecs=150, dtype=torch.float64,
                  all_reduce=(lambda t: t.clone()) if split else None)
    plain = lanczos_eigs(lambda v: a @ v, 200, generator=_gen(0), **kwargs)
    monkeypatch.setattr(lanczos_module, "_AHEAD_DEVICES", ("cuda", "cpu"))
    op = _Counted(a)
    ahead = lanczos_eigs(op, 200, generator=_gen(0), **kwargs)
    assert ahead.num_matvecs == plain.num_matvecs and op.calls <= ahead.num_matvecs + 1
    torch.testing.assert_close(ahead.values, plain.values, rtol=0, atol=1e-12)
    torch.testing.assert_close(ahead.residuals, plain.residuals, rtol=0, atol=1e-12)


def test_reading_ahead_warm_start_makes_one_product(read_ahead: None) -> None:
    a, lam, q = _gap_operator()
    op = _Counted(a)
    top = q[:, -1] + 1e-4 * torch.randn(300, generator=_gen(1), dtype=torch.float64)
    res = lanczos_eigs(op, 300, tol=1e-2, init=top, init_noise=2.5e-3, generator=_gen(2), dtype=torch.float64)
    assert res.num_matvecs == 1 and op.calls == 1  # the first test reads before queueing another product


def test_reading_ahead_drops_an_unused_product(read_ahead: None) -> None:
    # three distinct eigenvalues: the run ends at once at its third product, which the residual trend cannot foresee
    a = torch.diag(torch.tensor([3.0, 1.0, -1.0], dtype=torch.float64).repeat(10))
    op = _Counted(a)
    res = lanczos_eigs(op, 30, tol=1e-8, generator=_gen(0), dtype=torch.float64)
    assert res.num_matvecs == 3 and op.calls == 4  # the product made ahead is dropped, not counted
    assert torch.allclose(res.values, torch.tensor([3.0], dtype=torch.float64), atol=1e-10)


@pytest.mark.parametrize("split", [False, True])
def test_reading_ahead_breakdown_and_nan(read_ahead: None, split: bool) -> None:
    reduce = (lambda t: t.clone()) if split else None
    u = torch.ones(20, dtype=torch.float64) / 20**0.5
    op = _Counted(torch.eye(20, dtype=torch.float64) + 4 * torch.outer(u, u))
    res = lanczos_eigs(op, 20, k=3, tol=1e-8, generator=_gen(0), dtype=torch.float64, all_reduce=reduce)
    assert torch.allclose(res.values, torch.tensor([5.0, 1.0, 1.0], dtype=torch.float64), atol=1e-8)
    assert op.calls <= res.num_matvecs + 2  # one made ahead of the breakdown, one ahead of the stop at most
    nan = lanczos_eigs(lambda v: v * float("nan"), 10, k=2, generator=_gen(0), all_reduce=reduce)
    assert torch.isnan(nan.values).all() and nan.num_matvecs == 1
