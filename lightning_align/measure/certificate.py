"""Bounds on where the rest of a spectrum can lie, from a Krylov space of a random start: the certificate's math.

A Lanczos run finds *an* eigenvalue near each Ritz value (the residual says how near), never that no larger one
exists: from a start almost orthogonal to the top eigenvector it converges on the second and looks converged.
:mod:`lightning_align.measure.certified` locks the Ritz vectors ``Y`` it found and runs a *check*: Lanczos on
``B = (I - YYᵀ) A (I - YYᵀ)`` from a fresh random vector. This module turns that check into bounds.

**The rest of the spectrum** (:func:`rest_bounds`). Let ``z`` be uniform on the unit sphere of ``range(I - YYᵀ)``
(dimension ``n``). For any fixed unit vector ``v``, ``P(<z, v>² < c0²) <= δ`` with ``c0² = π δ² / (2 n)`` (the
density of ``<z, v>`` is at most ``sqrt((n - 1) / (2π))``, Wendel's inequality). Suppose ``λ_max(B) = U`` with its
eigenvector's component ``c² >= c0²``, and every eigenvalue of ``B`` is ``>= L``. The Krylov space of ``m``
products holds ``p(B) z`` for every polynomial of degree ``m - 1``; with ``p`` the Chebyshev polynomial ``T_{m-1}``
mapped from ``[L, b]`` to ``[-1, 1]`` the eigenvalues below ``b`` weigh at most 1 in total, ``U`` weighs at least
``c0² T²``, those between ``b`` and ``U`` pull the Rayleigh quotient above ``b``; so the top Ritz value obeys
``θ >= min(b, U - (U - L) / (1 + c0² T_{m-1}(1 + 2 (U - b) / (b - L))²))`` for every ``b``. With ``b -> θ``:
``U`` is impossible once ``c0² T_{m-1}(1 + 2 (U - θ) / (θ - L))² > (θ - L) / (U - θ)``. The bottom is the
mirror image, and ``L`` is not known either: a pair ``(U, L)`` is possible when neither test excludes it, and
:func:`rest_bounds` returns the largest possible ``U`` and the smallest possible ``L``. The tests only see ratios
of distances, so these are the Ritz values pushed apart by a factor :func:`spread` of ``m`` and ``n`` alone. Both hold with probability ``>= 1 - 2δ`` over ``z``, for any
symmetric ``B``: no assumption on gaps. The bound is gap-aware by itself: when the rest of the spectrum lies well
below the locked values, ``U - θ`` is large and few products make ``T`` large enough; a hidden eigenvalue just
above a continuum needs the Kuczyński–Woźniakowski count ``~ log(n/δ²) / sqrt(gap)``. Not the gap-free KW bound
itself: it would need the spectrum's width, which is what ``L`` is here.

**From the rest to the reported values** (:func:`certified`). In the basis ``[Y, Y⊥]``,
``A = [[Θ, Eᵀ], [E, B']]`` with ``Θ`` the Ritz values (``Yᵀ A Y``), ``‖E‖ <= ‖A Y - Y Θ‖ = ε`` (the residuals) and
``B'`` the rest, with eigenvalues in ``[L, U]``. Cauchy interlacing gives ``λ_j(A) >= θ_j`` (a Ritz value is a
lower bound). Weyl gives ``λ_j(A) <= max(θ_j, U) + ε``; when the spectra of ``Θ`` and ``B'`` are ``η`` apart,
Li & Li (2005) improve ``ε`` to ``(sqrt(η² + 4ε²) - η) / 2 <= ε² / η``. So the top ``k`` values are certified to
``t`` when ``max(0, U - θ_k) + ε' <= t``, the bottom ones likewise. These two steps are exact; rounding in the
products (float32: ~1e-7 relative) and finite-difference products (FSDP2) are outside them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

#: Probability, per end of the spectrum, that the check's random start hides an eigenvalue of the rest (its
#: component along the start below ``c0``): a certificate is wrong with probability at most twice this.
FAILURE = 1e-3


@dataclass
class Certificate:
    """What a certified solve showed about the operator beyond its locked vectors, for a solve on the same one."""

    key: Tensor | None
    locked: int  # top vectors locked
    locked_bottom: int
    upper: float  # λ_{locked + 1} <= upper
    lower: float  # the (locked_bottom + 1)-th smallest eigenvalue >= lower


def min_component_sq(dim: int, failure: float = FAILURE) -> float:
    """``c0²`` with ``P(<z, v>² < c0²) <= failure`` for ``z`` uniform on the unit sphere of ``R^dim``, any unit ``v``."""
    return math.pi * failure**2 / (2 * max(dim, 1))


def _log_chebyshev(degree: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``log T_degree(x)`` for ``x >= 1`` (``inf`` for ``x = inf`` and a positive degree)."""
    a = np.arccosh(np.maximum(x, 1.0))
    with np.errstate(over="ignore", invalid="ignore"):
        out = degree * a + np.log1p(np.exp(-2.0 * degree * a)) - math.log(2.0)
    return np.where(degree == 0, 0.0, np.where(np.isinf(a), np.inf, out))


def _excluded(beyond: np.ndarray, inside: np.ndarray, steps: np.ndarray, log_c0: float) -> np.ndarray:
    """Whether an extreme eigenvalue ``beyond`` past the observed extreme Ritz value is impossible after ``steps``
    products, when the other end of the spectrum is ``inside`` on the other side of that Ritz value (distances >= 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.where(inside > 0, 1.0 + 2.0 * beyond / inside, np.inf)
        lhs = log_c0 + 2.0 * _log_chebyshev(steps - 1, x)
        rhs = np.log(inside / beyond)
    return (beyond > 0) & (lhs > rhs)


def _lowest_possible(top: np.ndarray, steps: np.ndarray, log_c0: float) -> np.ndarray:
    """For hypothetical tops ``top`` (the bottom Ritz value at 0), how far below 0 the spectrum can reach: the first
    distance the mirror test excludes, by bisection on a log scale."""
    lo, hi = np.maximum(top, 1e-300) * 2.0**-60, np.maximum(top, 1e-300) * 2.0**61
    for _ in range(30):
        mid = np.sqrt(lo * hi)
        bad = _excluded(mid, top, steps, log_c0)
        hi, lo = np.where(bad, mid, hi), np.where(bad, lo, mid)
    return hi


def rest_bounds(top: float, bottom: float, steps: int, dim: int, failure: float = FAILURE) -> tuple[float, float]:
    """``(U, L)``: bounds ``λ_max(B) <= U`` and ``λ_min(B) >= L`` from a Krylov space of ``steps`` products of ``B``
    from a random start uniform on the unit sphere of a space of dimension ``dim`` whose extreme Ritz values are
    ``top`` and ``bottom`` (each bound fails with probability at most ``failure``; see the module docstring):
    ``top + w (top - bottom)`` and ``bottom - w (top - bottom)``, with ``w`` = :func:`spread` (the tests are
    scale-free). ``steps >= dim``: the space is the whole space and the Ritz values are the extremes."""
    if steps >= dim:
        return top, bottom
    w = spread(steps, dim, failure)
    if math.isinf(w):
        return math.inf, -math.inf
    return top + w * (top - bottom), bottom - w * (top - bottom)


def spread(steps: int, dim: int, failure: float = FAILURE) -> float:
    """How far beyond its extreme Ritz values, in units of their distance, the spectrum of ``B`` can reach after
    ``steps`` products from a random start in dimension ``dim`` (``inf``: too few products to say anything)."""
    table = _spread_table(dim, failure, 1 << max(6, (steps - 1).bit_length()))
    return float(table[steps - 1])


@functools.lru_cache(maxsize=64)
def _spread_table(dim: int, failure: float, count: int) -> np.ndarray:
    """:func:`spread` for 1..``count`` steps: the largest ``u`` for which some bottom ``l`` leaves the pair
    ``(1 + u, -l)`` possible around Ritz values at 1 and 0. A scan over a geometric grid up to 2^40 (beyond it the
    tests are scale-free: ``inf``), refined twice on a linear grid; the first excluded point is kept (at most 1/256
    of ``u`` above the exact value)."""
    log_c0 = math.log(min_component_sq(dim, failure))
    steps = np.arange(1, count + 1, dtype=np.float64)[:, None]
    grid = np.broadcast_to(np.ldexp(1.0, np.arange(-30, 41))[None, :], (count, 71))
    possible = _possible(grid, steps, log_c0)
    last = np.where(possible.any(1), possible.shape[1] - 1 - np.argmax(possible[:, ::-1], 1), -1)
    rows = np.arange(count)
    lo = np.where(last >= 0, grid[rows, np.maximum(last, 0)], 0.0)
    hi = grid[rows, np.minimum(last + 1, 70)]
    for _ in range(2):
        fine = lo[:, None] + (hi - lo)[:, None] * np.linspace(0, 1, 17)[None, 1:]
        ok = _possible(fine, steps, log_c0)
        j = np.where(ok.any(1), 16 - np.argmax(ok[:, ::-1], 1), 0)  # the point after the last possible one
        lo, hi = np.where(j > 0, fine[rows, np.maximum(j - 1, 0)], lo), fine[rows, np.minimum(j, 15)]
    return np.where(possible[:, -1], np.inf, hi)


def _possible(beyond: np.ndarray, steps: np.ndarray, log_c0: float) -> np.ndarray:
    """Whether a top ``beyond`` above the top Ritz value (at 1, the bottom one at 0) is possible with the lowest
    bottom that the mirror test leaves possible for it."""
    below = _lowest_possible(1.0 + beyond, steps, log_c0)
    return ~_excluded(beyond, 1.0 + below, steps, log_c0)


def li_li(gap: float, residual: float) -> float:
    """The eigenvalue error bound ``(sqrt(η² + 4ε²) - η) / 2`` of a block-diagonal matrix perturbed by an
    off-diagonal block of norm ``ε`` whose blocks' spectra are ``η`` apart (``ε`` itself when they are not)."""
    if not gap > 0:
        return residual
    return 2 * residual**2 / (gap + math.sqrt(gap**2 + 4 * residual**2))


def certified(
    top: list[float], bottom: list[float], k_top: int, k_bottom: int, residual: float, upper: float, lower: float,
    tol_top: float, tol_bottom: float,
) -> tuple[bool, bool]:
    """Whether the top ``k_top`` of the locked Ritz values ``top`` (largest first), and the bottom ``k_bottom`` of
    ``bottom`` (smallest first), are within ``tol_top`` (``tol_bottom``) of their eigenvalues, when the locked
    vectors' residual matrix has norm ``<= residual`` and the rest of the spectrum lies in ``[lower, upper]``:
    ``max(0, upper - θ_k) + ε' <= tol`` with ``ε'`` the Li–Li bound (module docstring). ``True`` for an end with
    nothing asked."""
    locked = [*top, *bottom]
    gap = min((0.0 if lower <= t <= upper else min(abs(t - upper), abs(t - lower))) for t in locked) if locked else 0.0
    err = li_li(gap, residual)
    top_ok = not k_top or max(0.0, upper - top[k_top - 1]) + err <= tol_top
    bottom_ok = not k_bottom or max(0.0, bottom[k_bottom - 1] - lower) + err <= tol_bottom
    return bool(top_ok), bool(bottom_ok)


def reusable(
    previous: Certificate | None, key: Tensor | None, lock: int, lock_bottom: int, tops: list[float], bottoms: list[float],
    residual: float, tol_top: float, tol_bottom: float,
) -> bool:
    """Whether the last certificate holds for these values: the same operator and locked counts, the rest below the
    ``lock``-th value by more than the residual (Kahan: each value is then within the residual of its eigenvalue)."""
    if previous is None or key is None or previous.key is None or not torch.equal(previous.key, key):
        return False
    if (previous.locked, previous.locked_bottom) != (lock, lock_bottom) or residual > min(tol_top, tol_bottom):
        return False
    return previous.upper < tops[-1] - residual and (not bottoms or previous.lower > bottoms[-1] + residual)
