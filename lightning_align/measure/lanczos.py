"""Lanczos eigensolver for symmetric linear operators given only as matrix-vector products.

Used for Hessian spectra (:mod:`lightning_align.measure.hessian`) and matrix-free NTK eigenvalues.
Why Lanczos and not power iteration (PyHessian, Cockpit): it needs ``O(log n / sqrt(eps))`` products
instead of ``O(log n / eps)``, it finds the largest *algebraic* (not largest magnitude) eigenvalue,
and it gives both ends of the spectrum from one Krylov space.

The implementation keeps the whole Krylov basis, so no ghost eigenvalues appear: each new vector goes
through the three-term recurrence, then one classical Gram-Schmidt pass against the whole basis, and a
second pass only when the first removed most of its norm ("twice is enough", Parlett/Kahan). It stops
on the Ritz residual ``‖A y - θ y‖ = β_m |s_m|``: an eigenvalue of ``A`` lies within that distance of
every Ritz value ``θ``, so the stopping rule ``residual <= tol · max|θ|`` bounds the eigenvalue error
by ``tol`` relative to the spectral scale (and in practice by far less: the error is
``O(residual²/gap)``).

Host reads: on the CPU, one per product (``α``, ``β`` and the finiteness test together, for the stopping test).
On a CUDA device ``α``, ``β`` and the next vector stay on the device (the second Gram-Schmidt pass chosen with
``torch.where``), and the product of step ``j + 1`` is queued before the host reads step ``j``'s scalars through a
pinned buffer, so the device does not wait for the stopping test; only the steps that may stop (the first test,
and the last few by the residuals' trend) read before queueing: about 3 synchronising reads per run whatever its
length. A product made ahead and not used (the run stopped) is dropped and not counted: at most one per run,
plus one per breakdown. ``lanczos_tridiagonal`` and block Lanczos still read once per step.

Memory: the basis grows with the products actually made, in blocks of at most 8 vectors (a warm start
that stops after 2 products holds 2 vectors, not ``max_matvecs``), on the device of the vectors.

A warm start (``init``: previous eigenvector estimates) cuts the number of products from a random
start's ``log n`` term to a few, which is what makes measuring sharpness during training cheap: the
first product on the previous top vector gives its Rayleigh quotient and residual, and when that
residual is already within ``tol`` the run stops there; when the top vector has moved, the same run
simply goes on as an ordinary Lanczos run (nothing is thrown away).

Precision: ``dtype=torch.float64`` keeps the basis, the recurrence and the Ritz vectors in float64 while
the operator may compute in float32 (it receives float64 vectors and its output is cast back); with
``refine=True`` the result is finished by one more product on the Ritz vector, whose Rayleigh quotient
and *true* residual ``‖A y - θ y‖`` (not the recurrence's estimate) are reported. Together they take
float32 Hessians to ~1e-7 relative error (``benchmarks/sharpness.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Which = Literal["LA", "SA", "LM"]
Reduce = Callable[[Tensor], Tensor]
#: A stopping test ``stop(theta, residuals, m) -> ratio`` (stop at ``ratio <= 1``): see :func:`lanczos_eigs`.
Stop = Callable[[np.ndarray, np.ndarray, int], float]

#: Relative norm of the random perturbation mixed into a warm start, so that a start vector that is
#: (almost) an exact eigenvector cannot end the Krylov space at once and hide a larger eigenvalue.
WARM_START_NOISE = 0.01


@dataclass
class LanczosResult:
    """Eigenpairs from :func:`lanczos_eigs`.

    Attributes:
        values: ``(k,)`` Ritz values, ordered as asked (``"LA"``: largest first, ``"SA"``: smallest
            first, ``"LM"``: largest magnitude first). NaN when the operator returned a non-finite vector.
        vectors: ``(n, k)`` unit Ritz vectors, column ``i`` belongs to ``values[i]``.
        num_matvecs: number of operator products used (on a CUDA device one more may have been made ahead and
            dropped: see the module docstring).
        residuals: ``(k,)`` Ritz residual norms ``‖A y_i - θ_i y_i‖`` (each bounds the distance from
            ``values[i]`` to the nearest eigenvalue of ``A``).
        krylov_trace: ``tr(Qᵀ A Q)`` over the Krylov basis ``Q`` (the sum of the recurrence's ``α``),
            the exact part of a Hutch++ trace estimate.
        basis: the ``(m, n)`` orthonormal Krylov basis when asked (``keep_basis=True``), else ``None``.
        certified: ``None`` from plain Lanczos; from a certified solve (:mod:`lightning_align.measure.certified`)
            whether the values are the extreme ones to ``tol`` (they are NaN when not).

    Example:
        >>> a = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
        >>> res = lanczos_eigs(lambda v: a @ v, 10, k=2, dtype=torch.float64)
        >>> [round(v, 6) for v in res.values.tolist()]
        [10.0, 9.0]
    """

    values: Tensor
    vectors: Tensor
    num_matvecs: int
    residuals: Tensor
    krylov_trace: float = math.nan
    basis: Tensor | None = None
    certified: bool | None = None

    @property
    def converged(self) -> bool:
        """Whether every value is finite (the residual test itself is applied while iterating)."""
        return bool(torch.isfinite(self.values).all())


def lanczos_eigs(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k: int = 1,
    which: Which = "LA",
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    init_noise: float = WARM_START_NOISE,
    min_matvecs: int = 1,
    refine: bool = False,
    keep_basis: bool = False,
    block: bool = False,
    all_reduce: Reduce | None = None,
    deflate: Tensor | None = None,
    stop: Stop | None = None,
) -> LanczosResult:
    """``k`` extreme eigenpairs of a symmetric operator by Lanczos with full re-orthogonalisation.

    Args:
        matvec: ``v -> A v`` on flat ``(dim,)`` vectors of ``dtype`` on ``device``; ``A`` must be symmetric.
        dim: size of the vectors.
        k: number of eigenpairs.
        which: ``"LA"`` largest algebraic, ``"SA"`` smallest algebraic, ``"LM"`` largest magnitude.
        tol: stop when every wanted Ritz residual is ``<= tol · max|θ|`` (``0`` runs ``max_matvecs``
            products, or ``dim`` if smaller, where the result is exact).
        max_matvecs: most operator products (``refine`` adds one).
        init: warm start: a ``(dim,)`` vector or ``(dim, j)`` columns (e.g. the previous ``vectors``);
            the start vector is their normalised sum plus a random perturbation of relative norm ``init_noise``.
        generator: random stream of the start vector / perturbation (the global stream is not used
            when given; pass the same seed on every DDP rank so all ranks run the same iteration).
        dtype: dtype of the Krylov basis and of the vectors given to ``matvec`` (``torch.float64`` with a
            float32 operator: see the module docstring).
        device: device of the vectors (default: that of ``init``, else CPU).
        init_noise: relative norm of the random perturbation mixed into a warm start (default 0.01), so
            that a start vector that is (almost) an exact eigenvector does not end the run at once on a
            small problem. Its own residual is about ``init_noise · max|λ|``: keep it below ``tol`` (e.g.
            ``tol / 4``) for warm starts that stop after one or two products.
        min_matvecs: do at least this many products before the residual test may stop the run.
        refine: finish with one more product on each returned Ritz vector: the values become their
            Rayleigh quotients and the residuals their true residuals ``‖A y - θ y‖`` (accumulated in
            float64). For accuracy below float32 rounding, with ``dtype=torch.float64``.
        keep_basis: return the Krylov basis in :attr:`LanczosResult.basis`.
        block: with ``init`` of ``j >= 2`` columns, block Lanczos from all of them (``j`` products per step,
            the first step a Rayleigh-Ritz on their span) instead of one start vector (their sum). Right for
            a warm start from several previous eigenvectors, or from the previous top vector and the current
            gradient: the first block step stops when the residual allows, and a larger eigenvalue that has
            appeared along any start column shows at once.
        all_reduce: for vectors split over processes (sharded parameters: each rank holds its own slice of
            every vector and ``dim`` is the local slice's size): sums a tensor of partial inner products over
            the ranks (in place or not; the result is used). Every rank must call with the same arguments.
            ``None``: the vectors are whole. Not with ``block``.
        deflate: ``(dim, j)`` orthonormal columns ``Y``: Lanczos on ``(I - Y Yᵀ) A (I - Y Yᵀ)`` in the orthogonal
            complement of ``Y`` (every new vector, start and restarts included, is orthogonalised against ``Y``
            too): what is left of the spectrum once ``Y``'s eigenpairs are found. Not with ``block``.
        stop: replaces the residual test: ``stop(theta, residuals, m)`` with the ascending Ritz values, their
            residuals ``β |s_m|`` (numpy arrays) and the products so far; the run stops when it returns a number
            ``<= 1`` (its value, like the residual over its tolerance, tells the device path when a stop is near).

    Returns:
        A :class:`LanczosResult`.

    Raises:
        ValueError: on ``k < 1``, ``k > dim``, ``max_matvecs < k``, an unknown ``which``, a negative
            ``tol`` or an ``init`` of the wrong shape.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 11.0))
        >>> res = lanczos_eigs(lambda v: a @ v, dim=10, k=2, tol=1e-6)
        >>> [round(x, 4) for x in res.values.tolist()]
        [10.0, 9.0]
    """
    _check_args(dim, k, which, tol, max_matvecs, all_reduce is not None)
    if device is None:
        device = init.device if init is not None else torch.device("cpu")
    device = torch.device(device)
    steps = max_matvecs if all_reduce is not None else min(max_matvecs, dim)  # a local slice may be smaller than k
    space = _Space(all_reduce, deflate, dtype, device)
    results = _run(matvec, dim, init, [(k, which)], tol, steps, generator, dtype, device, init_noise, min_matvecs, keep_basis, block, space,
                   stop)
    return _refined(matvec, results, dtype, space)[0] if refine else results[0]


def lanczos_extremes(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    k_top: int = 1,
    k_bottom: int = 1,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    *,
    init_noise: float = WARM_START_NOISE,
    min_matvecs: int = 1,
    refine: bool = False,
    block: bool = False,
    all_reduce: Reduce | None = None,
    deflate: Tensor | None = None,
    stop: Stop | None = None,
) -> tuple[LanczosResult, LanczosResult]:
    """The ``k_top`` largest and ``k_bottom`` smallest eigenpairs from one Krylov space.

    Both ends converge in the same run, so this costs the products of the slower end only (instead of
    the sum of two :func:`lanczos_eigs` runs). Arguments as in :func:`lanczos_eigs`; ``init`` may hold
    the previous top and bottom vectors side by side.

    Returns:
        ``(top, bottom)``: top values largest first, bottom values smallest first. Both report the
        shared ``num_matvecs``.

    Example:
        >>> a = torch.diag(torch.arange(-3.0, 7.0))
        >>> top, bottom = lanczos_extremes(lambda v: a @ v, dim=10, tol=1e-6)
        >>> round(float(top.values[0]), 4), round(float(bottom.values[0]), 4)
        (6.0, -3.0)
    """
    _check_args(dim, max(k_top, k_bottom), "LA", tol, max_matvecs, all_reduce is not None)
    if k_top + k_bottom > dim and all_reduce is None:
        raise ValueError(f"lanczos_extremes: k_top + k_bottom = {k_top + k_bottom} exceeds the dimension {dim}")
    if device is None:
        device = init.device if init is not None else torch.device("cpu")
    device = torch.device(device)
    steps = max(max_matvecs, k_top + k_bottom)
    steps = steps if all_reduce is not None else min(steps, dim)
    wants = [(k_top, "LA"), (k_bottom, "SA")]
    space = _Space(all_reduce, deflate, dtype, device)
    results = _run(matvec, dim, init, wants, tol, steps, generator, dtype, device, init_noise, min_matvecs, False, block, space, stop)
    top, bottom = _refined(matvec, results, dtype, space) if refine else results
    return top, bottom


def _run(
    matvec: Callable[[Tensor], Tensor],
    dim: int,
    init: Tensor | None,
    wants: list[tuple[int, str]],
    tol: float,
    steps: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    init_noise: float,
    min_matvecs: int,
    keep_basis: bool,
    block: bool,
    space: _Space,
    stop: Stop | None = None,
) -> list[LanczosResult]:
    min_steps = min(max(min_matvecs, 1), steps)
    if block and (space.split or space.locked is not None):
        raise ValueError("lanczos_eigs: block=True is not available with deflate or for vectors split over processes (all_reduce)")
    if block and init is not None:
        rows = _start_block(dim, init, generator, dtype, device, init_noise)
        if rows is not None and rows.shape[0] <= steps:
            return _block_lanczos(matvec, rows, wants, tol, steps, generator, min_steps, keep_basis, stop)
    start = _start_vector(dim, init, generator, dtype, device, init_noise, space)
    if space.locked is not None:
        start = space.deflated(start)
    return _lanczos(matvec, start, wants, tol, steps, generator, min_steps, keep_basis, space, stop)


def _check_args(dim: int, k: int, which: str, tol: float, max_matvecs: int, split: bool = False) -> None:
    if which not in ("LA", "SA", "LM"):
        raise ValueError(f"lanczos_eigs: which must be 'LA', 'SA' or 'LM', got {which!r}")
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"lanczos_eigs: k must be a positive int, got {k!r}")
    if k > dim and not split:  # a split vector's dim is the local slice's
        raise ValueError(f"lanczos_eigs: k={k} eigenpairs asked of an operator of dimension {dim}; use k <= {dim}")
    if max_matvecs < k:
        raise ValueError(f"lanczos_eigs: max_matvecs={max_matvecs} is less than k={k}; allow at least k products")
    if not tol >= 0:
        raise ValueError(f"lanczos_eigs: tol must be >= 0, got {tol!r}")


def _randn(dim: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(dim, generator=generator, dtype=dtype, device=gen_device).to(device)


def _start_vector(
    dim: int,
    init: Tensor | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    init_noise: float = WARM_START_NOISE,
    space: _Space | None = None,
) -> Tensor:
    space = space or _Space(None)
    noise = _randn(dim, generator, dtype, device)
    noise = noise / space.norm(noise)
    if init is None:
        return noise
    cols = init.detach().to(device=device, dtype=dtype)
    cols = cols.unsqueeze(1) if cols.ndim == 1 else cols
    if cols.ndim != 2 or cols.shape[0] != dim:
        raise ValueError(f"lanczos_eigs: init must have shape ({dim},) or ({dim}, j), got {tuple(init.shape)}")
    norms = space.sum(cols.square().sum(dim=0)).sqrt()
    usable = torch.isfinite(norms) & (norms > 0)
    if not bool(usable.any()):
        return noise
    start = (cols[:, usable] / norms[usable]).sum(dim=1)
    start_norm = space.norm(start)
    if not start_norm > 0:
        return noise
    return start / start_norm + init_noise * noise


def _wanted(theta: Tensor, k: int, which: str) -> Tensor:
    """Indices of the ``k`` wanted Ritz values among ``theta`` (ascending), in output order."""
    if which == "LA":
        return torch.arange(len(theta) - 1, len(theta) - 1 - k, -1)
    if which == "SA":
        return torch.arange(k)
    return torch.argsort(theta.abs(), descending=True, stable=True)[:k]


class _Space:
    """Inner products of vectors that are whole (``all_reduce=None``) or split over processes (each rank holds a
    slice; partial sums are added over the ranks by ``all_reduce``), in the orthogonal complement of the
    orthonormal columns ``deflate`` when given (kept as rows, :attr:`locked`)."""

    def __init__(
        self, all_reduce: Reduce | None, deflate: Tensor | None = None, dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.all_reduce = all_reduce
        self.locked = None if deflate is None else deflate.detach().to(device=device, dtype=dtype).reshape(deflate.shape[0], -1).T.contiguous()

    def deflated(self, v: Tensor) -> Tensor:
        """``v`` with its components along :attr:`locked` removed (twice: twice is enough)."""
        for _ in range(2):
            v = v - self.locked.T @ self.sum(self.locked @ v)
        return v

    @property
    def split(self) -> bool:
        return self.all_reduce is not None

    def sum(self, partial: Tensor) -> Tensor:
        """``partial`` summed over the ranks (itself for whole vectors)."""
        return partial if self.all_reduce is None else self.all_reduce(partial)

    def norm(self, v: Tensor) -> Tensor:
        return v.norm() if self.all_reduce is None else self.sum(v.square().sum()).sqrt()

    def norm_before_sum(self, v: Tensor) -> Tensor:
        """``‖v‖`` for whole vectors, the local ``‖v‖²`` for split ones (summed in :meth:`read`)."""
        return v.norm() if self.all_reduce is None else v.square().sum()

    def read(self, alpha: Tensor, norm_a: Tensor, norm_b: Tensor, w: Tensor) -> tuple[float, float, float, bool]:
        """``α``, two norms (from :meth:`norm_before_sum`) and whether ``w`` is finite, in one host read
        (and one all-reduce for split vectors; ``α`` is already summed)."""
        if self.all_reduce is None:
            a, na, nb, finite = torch.stack([alpha, norm_a, norm_b, torch.isfinite(w).all().to(alpha.dtype)]).tolist()
            return a, na, nb, bool(finite)
        sums = self.sum(torch.stack([norm_a, norm_b, (~torch.isfinite(w)).sum().to(w.dtype)]))
        a, sq_a, sq_b, infinite = torch.cat([alpha.reshape(1), sums]).tolist()
        finite = not infinite and math.isfinite(sq_a) and math.isfinite(sq_b)
        return a, math.sqrt(max(sq_a, 0.0)), math.sqrt(max(sq_b, 0.0)), finite


class _Basis:
    """An orthonormal basis ``(m, n)`` that grows as vectors are appended, in blocks (2, 2, 4, 8, 8, ...).

    Nothing is allocated for products that are never made, and no block is ever copied.
    """

    def __init__(self, dim: int, dtype: torch.dtype, device: torch.device, space: _Space | None = None) -> None:
        self.dim, self.dtype, self.device = dim, dtype, device
        self.space = space or _Space(None)
        self.blocks: list[Tensor] = []
        self.size = 0
        self._free = 0

    def append(self, v: Tensor) -> None:
        if self._free == 0:
            rows = min(8, max(2, self.size))
            self.blocks.append(torch.empty(rows, self.dim, dtype=self.dtype, device=self.device))
            self._free = rows
        block = self.blocks[-1]
        block[block.shape[0] - self._free] = v
        self._free -= 1
        self.size += 1

    def filled(self) -> list[Tensor]:
        """Views of the filled rows, block by block."""
        if not self.blocks:
            return []
        last = self.blocks[-1]
        return [*self.blocks[:-1], last[: last.shape[0] - self._free]]

    def __getitem__(self, j: int) -> Tensor:
        for block in self.filled():
            if j < block.shape[0]:
                return block[j]
            j -= block.shape[0]
        raise IndexError(j)

    def project_out(self, w: Tensor) -> Tensor:
        """One classical Gram-Schmidt pass: ``w - Q Qᵀ w`` (block by block), the space's locked rows included."""
        blocks = self.filled() if self.space.locked is None else [self.space.locked, *self.filled()]
        coeffs = [q @ w for q in blocks]  # all coefficients from the same w: classical GS
        if self.space.split and blocks:  # one all-reduce for the whole pass
            coeffs = list(self.space.sum(torch.cat(coeffs)).split([q.shape[0] for q in blocks]))
        for q, c in zip(blocks, coeffs):
            w = w - q.T @ c
        return w

    def combine(self, coeffs: Tensor) -> Tensor:
        """``Qᵀ coeffs``: ``(m, k)`` coefficients to ``(n, k)`` vectors."""
        out = torch.zeros(self.dim, coeffs.shape[1], dtype=self.dtype, device=self.device)
        row = 0
        for q in self.filled():
            out += q.T @ coeffs[row : row + q.shape[0]]
            row += q.shape[0]
        return out

    def stacked(self) -> Tensor:
        return torch.cat(self.filled()) if self.blocks else torch.empty(0, self.dim, dtype=self.dtype, device=self.device)


#: Device types on which :func:`_lanczos` reads each step's scalars only after queueing the next product
#: (:func:`_lanczos_ahead`). Not on the CPU, where nothing runs asynchronously and a product made ahead would be
#: real extra work; tests add ``"cpu"`` to run that path here.
_AHEAD_DEVICES: tuple[str, ...] = ("cuda",)


def _lanczos(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    wants: list[tuple[int, str]],
    tol: float,
    max_steps: int,
    generator: torch.Generator | None,
    min_steps: int = 1,
    keep_basis: bool = False,
    space: _Space | None = None,
    stop: Stop | None = None,
) -> list[LanczosResult]:
    """Run Lanczos until every ``(k, which)`` in ``wants`` has converged Ritz pairs (or ``stop`` says so); one result each.

    One host read per product (``α``, ``β`` and the finiteness test together); a second
    Gram-Schmidt pass, with one more read, only when the first removed most of the vector. Split
    vectors: one all-reduce per Gram-Schmidt pass and one for ``α``, ``β`` and the finiteness test.
    On a CUDA device: :func:`_lanczos_ahead` (same iteration, no read between a product and the next).
    """
    space = space or _Space(None)
    if start.device.type in _AHEAD_DEVICES:
        return _lanczos_ahead(matvec, start, wants, tol, max_steps, generator, min_steps, keep_basis, space, stop)
    dim, dtype, device = start.numel(), start.dtype, start.device
    need = sum(k for k, _ in wants)  # both ends wanted: as many distinct Ritz values as asked in all
    tiny = 10 * torch.finfo(dtype).eps
    basis = _Basis(dim, dtype, device, space)
    q = start / space.norm(start)
    q_prev: Tensor | None = None
    basis.append(q)
    alphas: list[float] = []
    betas: list[float] = []  # betas[j] couples basis j and j+1
    for j in range(max_steps):
        w = _product(matvec, q, dim, dtype)
        alpha_t = space.sum(torch.dot(w, q))
        w = w - alpha_t * q
        if q_prev is not None and betas[-1] != 0.0:
            w = w - betas[-1] * q_prev
        recurrence_norm = space.norm_before_sum(w)
        w = basis.project_out(w)
        alpha, norm_before, beta, finite = space.read(alpha_t, recurrence_norm, space.norm_before_sum(w), w)
        if not finite or not math.isfinite(alpha):
            return [_nan_result(k, dim, j + 1, dtype, device) for k, _ in wants]
        if beta < 0.5 * norm_before:  # the pass removed most of w: once more (twice is enough)
            w = basis.project_out(w)
            beta = float(space.norm(w))
        alphas.append(alpha)
        m = j + 1
        theta_np, s_np, scale, picks_np, _ = _ritz_test(alphas, betas, beta, wants, tol, m, need, min_steps, max_steps, stop)
        if picks_np is not None:
            return _finish(basis, theta_np, s_np, picks_np, beta, m, alphas, keep_basis)
        if beta <= tiny * scale * math.sqrt(m):
            # invariant subspace found: continue in its orthogonal complement
            w = _randn(dim, generator, dtype, device)
            w = basis.project_out(basis.project_out(w))
            beta_next, w = 0.0, w / space.norm(w)
        else:
            beta_next, w = beta, w / beta
        betas.append(beta_next)
        q_prev, q = q, w
        basis.append(q)
    raise AssertionError("unreachable")  # pragma: no cover


def _lanczos_ahead(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    wants: list[tuple[int, str]],
    tol: float,
    max_steps: int,
    generator: torch.Generator | None,
    min_steps: int,
    keep_basis: bool,
    space: _Space,
    stop: Stop | None = None,
) -> list[LanczosResult]:
    """:func:`_lanczos` for vectors on an asynchronous device: the product of step ``j + 1`` is queued before the
    host reads step ``j``'s scalars, so the device never waits for the host's stopping test.

    ``α``, ``β`` and the next vector stay on the device: the second Gram-Schmidt pass is always computed and
    kept by ``torch.where`` where the first removed most of the vector (the same choice as :func:`_lanczos`),
    and ``q = w / β`` is taken there. The host reads ``[α, β, finite]`` of step ``j`` through a pinned buffer
    and an event once the product of step ``j + 1`` is queued, then runs the stopping test, the finiteness test
    and the breakdown test on them; a stop, a non-finite step or a breakdown drops the product made ahead (it is
    not counted in ``num_matvecs``). Steps whose test may stop (:func:`_may_stop`: the first that can, and those
    where the residuals' trend reaches ``tol`` within a factor of 4) read first instead (a synchronising read),
    so that a warm start that stops after one product makes one, and a run makes at most one product more than
    it reports in the usual case (plus one per breakdown). Split vectors: five all-reduces per product (``α``,
    each Gram-Schmidt pass, the norms with the finiteness count, ``β`` after the second pass), none read on the host.
    """
    dim, dtype, device = start.numel(), start.dtype, start.device
    need = sum(k for k, _ in wants)
    tiny = 10 * torch.finfo(dtype).eps
    basis = _Basis(dim, dtype, device, space)
    q = start / space.norm(start)
    basis.append(q)
    q_prev: Tensor | None = None
    beta_prev = torch.zeros((), dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    progress: list[float] = []  # per step: the largest wanted residual over tol · max|θ| (stop at <= 1)
    cuda = device.type == "cuda"
    host = torch.empty(3, dtype=torch.float64, pin_memory=cuda)
    ready = torch.cuda.Event() if cuda else None
    w = _product(matvec, q, dim, dtype)
    for j in range(max_steps):
        m = j + 1
        alpha_t = space.sum(torch.dot(w, q))
        w = w - alpha_t * q
        if q_prev is not None:
            w = w - beta_prev * q_prev  # β = 0 after a breakdown: subtracts nothing
        w, beta_t, finite_t = _orthogonalised(w, basis, space)
        scalars = torch.stack([alpha_t, beta_t, finite_t.to(dtype)]).to(torch.float64)
        q_next = w / torch.where(beta_t > 0, beta_t, torch.ones_like(beta_t))
        w_next: Tensor | None = None
        if m < max_steps and not _may_stop(progress, m, need, min_steps):
            if ready is not None:
                host.copy_(scalars, non_blocking=True)
                ready.record(torch.cuda.current_stream(device))
            w_next = _product(matvec, q_next, dim, dtype)  # queued behind step j; dropped if step j ends the run
            if ready is not None:
                ready.synchronize()  # step j's scalars, while the device runs the product just queued
                alpha, beta, finite = host.tolist()
            else:
                alpha, beta, finite = scalars.tolist()
        else:
            alpha, beta, finite = scalars.tolist()
        if not finite or not math.isfinite(alpha):
            return [_nan_result(k, dim, m, dtype, device) for k, _ in wants]
        alphas.append(alpha)
        theta_np, s_np, scale, picks_np, ratio = _ritz_test(alphas, betas, beta, wants, tol, m, need, min_steps, max_steps, stop)
        if picks_np is not None:
            return _finish(basis, theta_np, s_np, picks_np, beta, m, alphas, keep_basis)
        if m >= need:
            progress.append(ratio)
        if beta <= tiny * scale * math.sqrt(m):  # invariant subspace: on in its orthogonal complement
            fresh = _randn(dim, generator, dtype, device)
            fresh = basis.project_out(basis.project_out(fresh))
            q_next, w_next = fresh / space.norm(fresh), None
            beta, beta_t = 0.0, torch.zeros((), dtype=dtype, device=device)
        betas.append(beta)
        q_prev, q, beta_prev = q, q_next, beta_t
        basis.append(q)
        w = w_next if w_next is not None else _product(matvec, q, dim, dtype)
    raise AssertionError("unreachable")  # pragma: no cover


def _product(matvec: Callable[[Tensor], Tensor], q: Tensor, dim: int, dtype: torch.dtype) -> Tensor:
    w = matvec(q)
    if w.shape != (dim,):
        raise ValueError(f"lanczos_eigs: matvec returned shape {tuple(w.shape)}, expected ({dim},)")
    return w.to(dtype)


def _orthogonalised(w: Tensor, basis: _Basis, space: _Space) -> tuple[Tensor, Tensor, Tensor]:
    """``w`` after one Gram-Schmidt pass, or two where the first removed most of it, chosen on the device; its
    norm ``β`` and whether the step is finite, all as device tensors (no host read)."""
    before = space.norm_before_sum(w)
    once = basis.project_out(w)
    after = space.norm_before_sum(once)
    if space.split:
        bad = (~torch.isfinite(once)).sum().to(once.dtype)
        before, after, bad = space.sum(torch.stack([before, after, bad])).unbind(0)
        before, after = before.clamp_min(0).sqrt(), after.clamp_min(0).sqrt()
        finite = (bad == 0) & torch.isfinite(before) & torch.isfinite(after)
    else:
        finite = torch.isfinite(once).all()
    twice = basis.project_out(once)
    again = after < 0.5 * before  # the first pass removed most of w: keep the second (twice is enough)
    return torch.where(again, twice, once), torch.where(again, space.norm(twice), after), finite


def _may_stop(progress: list[float], m: int, need: int, min_steps: int) -> bool:
    """Whether step ``m``'s stopping test may end the run, judged before reading it: never before ``need`` and
    ``min_steps``; always at the first test (a warm start); then when the last residual ratio, carried on by its
    last rate of decrease (0.1 when only one is known), comes within 4 of ``tol``."""
    if m < need or m < min_steps:
        return False
    if not progress:
        return True
    if not math.isfinite(progress[-1]):  # tol = 0: only the last step stops
        return False
    rate = 0.1 if len(progress) < 2 or not progress[-2] > 0 else min(1.0, progress[-1] / progress[-2])
    return progress[-1] * rate <= 4.0


def _ritz_test(
    alphas: list[float], betas: list[float], beta: float, wants: list[tuple[int, str]], tol: float, m: int, need: int,
    min_steps: int, max_steps: int, stop: Stop | None = None,
) -> tuple[np.ndarray, np.ndarray, float, list[np.ndarray] | None, float]:
    """Ritz values and vectors of the tridiagonal matrix (ascending), the spectral scale, the wanted indices
    when the run stops here (``None`` otherwise) and the largest wanted residual over ``tol · scale`` (or what
    ``stop`` returns)."""
    theta_np, s_np = _tridiagonal_eigh_np(alphas, betas)  # numpy: ~10x less overhead than torch at this size
    scale = max(float(np.abs(theta_np).max()), 1e-30)
    if m < need:
        return theta_np, s_np, scale, None, math.inf
    last = np.abs(s_np[-1])
    picks_np = [_wanted_np(theta_np, k, which) for k, which in wants]
    if stop is not None:
        ratio = float(stop(theta_np, beta * last, m))
        done = ratio <= 1.0
    else:
        worst = max(float((beta * last[idx]).max()) for idx in picks_np)
        ratio = worst / (tol * scale) if tol > 0 else math.inf
        done = all(bool((beta * last[idx] <= tol * scale).all()) for idx in picks_np)
    if m >= min_steps and (done or m == max_steps):
        return theta_np, s_np, scale, picks_np, ratio
    return theta_np, s_np, scale, None, ratio


def _finish(
    basis: _Basis, theta_np: np.ndarray, s_np: np.ndarray, picks_np: list[np.ndarray], beta: float, m: int,
    alphas: list[float], keep_basis: bool,
) -> list[LanczosResult]:
    theta, s = torch.from_numpy(theta_np), torch.from_numpy(s_np)
    picks = [torch.from_numpy(idx) for idx in picks_np]
    residuals = [beta * s[-1, idx].abs() for idx in picks]
    trace = float(sum(alphas))
    kept = basis.stacked() if keep_basis else None
    return [_result(basis, theta, s, idx, r, m, trace, kept) for idx, r in zip(picks, residuals)]


def _start_block(
    dim: int, init: Tensor, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device, init_noise: float
) -> Tensor | None:
    """The usable columns of ``init``, each normalised and perturbed, as orthonormal rows ``(b, n)``; ``None``
    when fewer than two are usable (then the single-vector start applies)."""
    cols = init.detach().to(device=device, dtype=dtype)
    cols = cols.unsqueeze(1) if cols.ndim == 1 else cols
    if cols.ndim != 2 or cols.shape[0] != dim:
        raise ValueError(f"lanczos_eigs: init must have shape ({dim},) or ({dim}, j), got {tuple(init.shape)}")
    norms = cols.norm(dim=0)
    usable = torch.isfinite(cols).all(dim=0) & (norms > 0)
    if int(usable.sum()) < 2:
        return None
    cols = cols[:, usable] / norms[usable]
    noise = torch.stack([_randn(dim, generator, dtype, device) for _ in range(cols.shape[1])], 1)
    cols = cols + init_noise * noise / noise.norm(dim=0)
    q, r = torch.linalg.qr(cols)
    keep = r.diagonal().abs() > 1e-6 * r.diagonal().abs().max()  # drop (nearly) dependent columns
    return q[:, keep].T.contiguous()


def _block_lanczos(
    matvec: Callable[[Tensor], Tensor],
    block: Tensor,
    wants: list[tuple[int, str]],
    tol: float,
    max_steps: int,
    generator: torch.Generator | None,
    min_steps: int = 1,
    keep_basis: bool = False,
    stop: Stop | None = None,
) -> list[LanczosResult]:
    """Block Lanczos from the orthonormal rows ``block`` ``(b, n)``: ``b`` products per block step.

    ``A Qⱼ = Qⱼ₋₁ Bⱼ₋₁ᵀ + Qⱼ Aⱼ + Qⱼ₊₁ Bⱼ`` with full re-orthogonalisation; the projected matrix is block
    tridiagonal and the residual of a Ritz vector ``Q s`` is ``‖Bⱼ s_last‖`` (its last block's coefficients).
    """
    b, dim = block.shape
    dtype, device = block.dtype, block.device
    need = sum(k for k, _ in wants)
    tiny = 10 * torch.finfo(dtype).eps
    basis = _Basis(dim, dtype, device)
    q_block, prev_block, prev_b = block, None, None
    diag: list[Tensor] = []
    sub: list[Tensor] = []  # sub[j] = B_j couples block j+1 to block j
    m = 0
    while True:
        for row in q_block:
            basis.append(row)
        products = []
        for q in q_block:
            w = matvec(q)
            if w.shape != (dim,):
                raise ValueError(f"lanczos_eigs: matvec returned shape {tuple(w.shape)}, expected ({dim},)")
            products.append(w.to(dtype))
        w_block = torch.stack(products)
        m += q_block.shape[0]
        a = q_block @ w_block.T
        a = (a + a.T) / 2
        rem = w_block - a @ q_block
        if prev_block is not None:
            rem = rem - prev_b @ prev_block
        before = rem.norm(dim=1)
        rem = torch.stack([basis.project_out(r) for r in rem])
        after = rem.norm(dim=1)
        finite = torch.isfinite(w_block).all() & torch.isfinite(a).all()
        host = torch.cat([finite.reshape(1).to(dtype), a.reshape(-1), before, after]).double().cpu()
        if not bool(host[0]):
            return [_nan_result(k, dim, m, dtype, device) for k, _ in wants]
        if bool((host[1 + a.numel() + rem.shape[0]:] < 0.5 * host[1 + a.numel(): 1 + a.numel() + rem.shape[0]]).any()):
            rem = torch.stack([basis.project_out(r) for r in rem])
        diag.append(host[1 : 1 + a.numel()].reshape(a.shape))
        nxt, b_j = _next_block(rem, basis, generator, tiny * max(float(diag[-1].abs().max()), 1e-30))
        theta, s = _block_tridiagonal_eigh(diag, sub)
        scale = max(float(theta.abs().max()), 1e-30)
        last = s[m - q_block.shape[0] : m]
        done = m + nxt.shape[0] > max_steps or nxt.shape[0] == 0
        if (m >= need and m >= min_steps) or done:
            picks = [_wanted(theta, min(k, m), which) for k, which in wants]
            residuals = [(b_j @ last[:, idx]).norm(dim=0) for idx in picks]
            if stop is not None:
                converged = stop(theta.numpy(), (b_j @ last).norm(dim=0).numpy(), m) <= 1.0
            else:
                converged = all(bool((r <= tol * scale).all()) for r in residuals)
            if done or converged:
                trace = float(sum(float(d.diagonal().sum()) for d in diag))
                kept = basis.stacked() if keep_basis else None
                return [_result(basis, theta, s, idx, r, m, trace, kept) for idx, r in zip(picks, residuals)]
        sub.append(b_j)
        prev_block, prev_b, q_block = q_block, b_j.to(device=device, dtype=dtype), nxt


def _next_block(rem: Tensor, basis: _Basis, generator: torch.Generator | None, tiny: float) -> tuple[Tensor, Tensor]:
    """The next orthonormal block and ``B`` (float64, on the host) with ``rem = Bᵀ rows``, from an SVD of the remainder
    rows (``B = diag(σ) Vᵀ``); directions that vanished (an invariant subspace: ``σ`` ~ 0) are replaced by random ones
    orthogonal to everything so far, with zero coupling. Not a QR: when a column of the remainder vanishes, R's
    row for it still couples the later columns to an arbitrary direction, and zeroing it would break the recurrence."""
    u, sigma, vh = torch.linalg.svd(rem.T, full_matrices=False)
    r64 = (sigma[:, None] * vh).double().cpu()
    rows = u.T.contiguous()
    dead = (sigma.double().cpu() <= tiny * max(1.0, rem.shape[0] ** 0.5)).tolist()
    if any(dead):
        fresh = []
        for i, row in enumerate(rows):
            if dead[i]:
                row = _randn(rem.shape[1], generator, rem.dtype, rem.device)
                for _ in range(2):
                    row = basis.project_out(row)
                    for other in fresh:
                        row = row - (other @ row) * other
                    for j, other in enumerate(rows):
                        if not dead[j]:
                            row = row - (other @ row) * other
                row = row / row.norm()
                r64[i] = 0.0
            fresh.append(row)
        rows = torch.stack(fresh)
    return rows, r64


def _block_tridiagonal_eigh(diag: list[Tensor], sub: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition (float64, ascending) of the block tridiagonal projected matrix."""
    sizes = [d.shape[0] for d in diag]
    m = sum(sizes)
    t = torch.zeros(m, m, dtype=torch.float64)
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    for j, d in enumerate(diag):
        t[offsets[j] : offsets[j + 1], offsets[j] : offsets[j + 1]] = d
    for j, b_j in enumerate(sub):
        lo, mid, hi = offsets[j], offsets[j + 1], offsets[j + 2]
        t[mid:hi, lo:mid] = b_j[: hi - mid, : mid - lo]
        t[lo:mid, mid:hi] = b_j[: hi - mid, : mid - lo].T
    return torch.linalg.eigh(t)


def _tridiagonal_eigh_np(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_tridiagonal_eigh` in numpy (float64, ascending)."""
    m = len(alphas)
    t = np.diag(np.asarray(alphas, dtype=np.float64))
    if m > 1:
        off = np.asarray(betas[: m - 1], dtype=np.float64)
        t += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(t)


def _wanted_np(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    """:func:`_wanted` in numpy."""
    n = len(theta)
    if which == "LA":
        return np.arange(n - 1, n - 1 - k, -1)
    if which == "SA":
        return np.arange(k)
    return np.argsort(-np.abs(theta), kind="stable")[:k]


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition (float64, ascending) of the Lanczos tridiagonal matrix."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def _result(
    basis: _Basis, theta: Tensor, s: Tensor, idx: Tensor, residuals: Tensor, m: int, trace: float, kept: Tensor | None
) -> LanczosResult:
    coeffs = s[:m, idx].to(device=basis.device, dtype=basis.dtype)
    vectors = basis.combine(coeffs)
    vectors = vectors / basis.space.sum(vectors.square().sum(dim=0, keepdim=True)).sqrt()
    return LanczosResult(
        values=theta[idx].clone(), vectors=vectors, num_matvecs=m, residuals=residuals.clone(), krylov_trace=trace, basis=kept
    )


def _refined(
    matvec: Callable[[Tensor], Tensor], results: list[LanczosResult], dtype: torch.dtype, space: _Space | None = None
) -> list[LanczosResult]:
    """Each Ritz vector's Rayleigh quotient and true residual from one more product (float64 sums)."""
    space = space or _Space(None)
    out = []
    extra = sum(r.vectors.shape[1] for r in results)
    for res in results:
        if not res.converged:
            out.append(res)
            continue
        values, residuals = [], []
        for i in range(res.vectors.shape[1]):
            y = res.vectors[:, i]
            w = matvec(y).to(dtype)
            y64, w64 = y.double(), w.double()
            yw, yy = space.sum(torch.stack([torch.dot(y64, w64), torch.dot(y64, y64)]))
            theta = yw / yy
            r = space.norm(w64 - theta * y64) / yy.sqrt()
            values.append(theta)
            residuals.append(r)
        vals = torch.stack(values).cpu()
        out.append(
            LanczosResult(
                values=vals, vectors=res.vectors, num_matvecs=res.num_matvecs + extra,
                residuals=torch.stack(residuals).cpu(), krylov_trace=res.krylov_trace, basis=res.basis,
            )
        )
    return out


def _nan_result(k: int, dim: int, num_matvecs: int, dtype: torch.dtype, device: torch.device) -> LanczosResult:
    nan = torch.full((k,), float("nan"), dtype=torch.float64)
    return LanczosResult(
        values=nan,
        vectors=torch.full((dim, k), float("nan"), dtype=dtype, device=device),
        num_matvecs=num_matvecs,
        residuals=nan.clone(),
    )


def lanczos_tridiagonal(
    matvec: Callable[[Tensor], Tensor],
    start: Tensor,
    steps: int,
    generator: torch.Generator | None = None,
    restart_on_breakdown: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``steps`` Lanczos steps from ``start`` (no stopping test): for quadrature and trace estimates.

    Returns:
        ``(theta, weights, basis)``: the Ritz values (ascending, float64), the squared first components
        of the Ritz vectors (the Gauss quadrature weights of the spectral measure seen from ``start``;
        they sum to 1), and the orthonormal Krylov basis ``(m, n)``. ``m`` is ``steps`` (capped at the
        dimension), or less when the Krylov space of ``start`` is invariant (the quadrature is then
        exact), unless ``restart_on_breakdown`` continues with a random orthogonal vector (for a basis
        of the asked size, e.g. for trace estimates). Non-finite operator output gives NaN ``theta``.
    """
    dim = start.numel()
    res_steps = min(steps, dim)
    basis = torch.empty(res_steps, dim, dtype=start.dtype, device=start.device)
    basis[0] = start / start.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for j in range(res_steps):
        w = matvec(basis[j]).to(start.dtype)
        if not bool(torch.isfinite(w).all()):
            nan = torch.full((j + 1,), float("nan"), dtype=torch.float64)
            return nan, nan.clone(), basis[: j + 1]
        alphas.append(float(torch.dot(w, basis[j])))
        if j + 1 == res_steps:
            break
        q = basis[: j + 1]
        w = w - q.T @ (q @ w)
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        if beta <= 10 * torch.finfo(start.dtype).eps * max(max(abs(a) for a in alphas), 1e-30) * math.sqrt(j + 1):
            if not restart_on_breakdown:  # invariant subspace: the quadrature is exact with these nodes
                res_steps = j + 1
                break
            w = _randn(dim, generator, start.dtype, start.device)
            w = w - q.T @ (q @ w)
            w = w - q.T @ (q @ w)
            betas.append(0.0)
            basis[j + 1] = w / w.norm()
            continue
        betas.append(beta)
        basis[j + 1] = w / beta
    theta, s = _tridiagonal_eigh(alphas, betas)
    return theta, s[0] ** 2, basis[:res_steps]
