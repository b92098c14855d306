"""Certified extreme eigenvalues: a Lanczos estimate is reported only when a check can tell it is the top.

A Ritz value is a Rayleigh quotient, so it is a lower bound on ``λ_max``; its residual says that *an* eigenvalue
lies near it, not that none lies above it. From a start almost orthogonal to the top eigenvector (the loss
gradient at some steps, the previous top vector after the second eigenvalue overtook the first) Lanczos converges
on the second eigenvalue with a small residual, and nothing in that Krylov space can show it. A solve here is:

1. **Main run**: Lanczos from the previous vectors (warm, unperturbed) or from the loss gradient mixed with an
   equal random vector (cold: the gradient can be almost orthogonal to the top, the random part never is),
   stopped when the norm of the wanted Ritz residuals is ``<= tol · |θ_1| / 2`` (``RESIDUAL_SHARE``): relative to
   the top value, not to the largest ``|θ|`` (a large negative Ritz value does not loosen it), and half of
   ``tol``, the other half being the margin the check needs (with all of it a value next to another could never
   be certified). ``Sharpness`` logs this residual.
2. **Check**: Lanczos on the deflated operator ``(I - YYᵀ) A (I - YYᵀ)`` (``Y``: the locked Ritz vectors) from a
   fresh random vector, stopped as soon as :func:`~lightning_align.measure.certificate.rest_bounds` places the rest
   of the spectrum where :func:`~lightning_align.measure.certificate.certified` accepts the values. Not a residual
   test: a hidden outlier has a ``~1/sqrt(n)`` component in a random vector, so the check's early Ritz values
   say nothing by themselves; the bound counts the Chebyshev amplification of its products from the
   probability that the component is that small, and is gap-aware through the check's own Ritz values (an
   outlier top certifies in ~10-20 products, a value inside a cluster needs ``~log(n)/sqrt(gap)``).
3. **Recovery**: when the check's Ritz values rule the values out (a direction above them: the miss that a residual
   cannot see) or cannot be separated from them in ``max_matvecs`` products while the next ones could, its
   extreme Ritz vector joins the locked ones, the main run restarts from all of them (block Lanczos where the
   vectors are whole) and a new check runs: "more Ritz values than asked", only where the spectrum needs them.
   At most ``rounds`` times. When the main run does not converge, the check finds a cluster or a continuum at the
   values that no budget-sized check can separate, or the rounds run out, the solve is *not certified*.

Why not a cheaper test: no quantity from one Krylov space can exclude a larger eigenvalue, and a check from the
previous vectors would share their blind spot; gap-free (Kuczyński–Woźniakowski) counts are what ``rest_bounds``
falls back to only where the spectrum is a continuum. The certificate fails with probability at most
``2 · FAILURE`` (1e-3 each end) over the check's random vector, whatever the spectrum. A check costs products
on every estimate (``docs/speed.md``); a solve on an operator identical to the last certified one (the same
parameters and gradient: ``key``) reuses that check's bound on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from lightning_align.measure.certificate import Certificate, certified, rest_bounds, reusable
from lightning_align.measure.lanczos import LanczosResult, Reduce, _refined, _Space, lanczos_eigs, lanczos_extremes

#: Relative norm of the random vector mixed into a cold start from the gradient (as large as the gradient: the
#: gradient can be almost orthogonal to the top eigenvector, the random part never is).
COLD_START_NOISE = 1.0

#: Share of ``tol · |θ_1|`` that the norm of the main run's residuals may take: the rest is the margin the check
#: needs to place the rest of the spectrum (with all of it, a value inside a cluster could never be certified).
RESIDUAL_SHARE = 0.5

Refine = Callable[[Tensor], "tuple[Tensor, Tensor] | None"]


@dataclass
class CertifiedEigs:
    """Result of :func:`certified_extremes`.

    Attributes:
        top, bottom: the ``k_top`` largest (largest first) and ``k_bottom`` smallest Ritz pairs (``bottom`` is
            ``None`` when none were asked), values as computed even when not certified.
        certified: whether every value is within ``tol`` of its eigenvalue (with probability ``>= 1 - 2·FAILURE``).
        num_matvecs, check_matvecs: operator products in all, and in checks.
        misses: checks whose Ritz values ruled the answer of that round out (each followed by a recovery).
        vectors: ``(n, k_top + k_bottom)`` the Ritz vectors of ``top`` and ``bottom`` (``None`` when not converged).
        extra: ``(n, j)`` more warm-start columns: the top vectors a recovery locked beyond ``k_top``.
        locked: top vectors locked (``k_top`` plus those added by recoveries).
        certificate: for the next solve on the same operator (``None`` when not certified).
        reason: why not certified (``""`` when certified).
    """

    top: LanczosResult
    bottom: LanczosResult | None
    certified: bool
    num_matvecs: int = 0
    check_matvecs: int = 0
    misses: int = 0
    vectors: Tensor | None = None
    extra: Tensor | None = None
    locked: int = 1
    certificate: Certificate | None = None
    reason: str = ""


def certified_extremes(
    matvec: Callable[[Tensor], Tensor], dim: int, k_top: int = 1, k_bottom: int = 0, *, tol: float, max_matvecs: int,
    generator: torch.Generator, dtype: torch.dtype, device: torch.device | str, warm: Tensor | None = None,
    cold: Tensor | None = None, sentinel: Tensor | None = None,
    all_reduce: Reduce | None = None, global_dim: int | None = None, refine: bool | Refine = False,
    key: Tensor | None = None, previous: Certificate | None = None, rounds: int = 2,
) -> CertifiedEigs:
    """The ``k_top`` largest and ``k_bottom`` smallest eigenpairs of a symmetric operator, certified (module docstring).

    Args:
        matvec, dim, generator, dtype, device, all_reduce: as in :func:`~lightning_align.measure.lanczos.lanczos_eigs`.
        k_top, k_bottom: values asked at each end (``k_top >= 1``).
        tol: every value within ``tol · |θ_1|`` of its eigenvalue (the bottom ones ``tol · max(|θ_1|, |θ_min|)``).
        max_matvecs: most products of each Lanczos run (main, check, recovery).
        warm: ``(dim, j)`` previous vectors (any order: the reported ones and those locked beyond them).
        cold: a start direction without ``warm`` (the loss gradient), mixed with an equal random vector.
        sentinel: with ``warm``, a direction to add to the first block step (``Sharpness(gradient_check=True)``).
        global_dim: the whole vectors' size when they are split over processes (``dim`` is the local slice's).
        refine: ``True``: one more product per Ritz vector for its Rayleigh quotient and true residual; a callable
            ``vectors -> (values, residuals)`` does it another way (e.g. in float64), ``None`` from it falls back.
        key, previous: the operator's fingerprint and the last solve's certificate; equal keys reuse the bound.
        rounds: most recoveries.

    Example (warm from the second eigenvector: the check finds the top, the recovery converges on it):
        >>> a = torch.diag(torch.cat([torch.linspace(0, 0.5, 199, dtype=torch.float64), torch.ones(1, dtype=torch.float64)]))
        >>> res = certified_extremes(lambda v: a @ v, 200, tol=1e-2, max_matvecs=50, generator=torch.Generator().manual_seed(0),
        ...                          dtype=torch.float64, device="cpu", warm=torch.eye(200, dtype=torch.float64)[:, 198:199])
        >>> res.certified, res.misses, round(float(res.top.values[0]), 4)
        (True, 1, 1.0)
    """
    n = global_dim if global_dim is not None else dim
    run = _Runner(matvec, dim, tol, max_matvecs, generator, dtype, device, all_reduce, False if callable(refine) else refine)
    out = _rounds(run, n, k_top, k_bottom, warm, cold, sentinel, key, previous, rounds)
    if callable(refine) and out.vectors is not None:  # last: a float64 refinement may leave the operator unusable
        out.top, out.bottom = run.polish(out.top, out.bottom, refine)
        out.vectors = torch.cat([out.top.vectors] + ([out.bottom.vectors] if out.bottom is not None else []), 1)
        out.num_matvecs = run.products
    return out


def _rounds(
    run: _Runner, n: int, k_top: int, k_bottom: int, warm: Tensor | None, cold: Tensor | None, sentinel: Tensor | None,
    key: Tensor | None, previous: Certificate | None, rounds: int,
) -> CertifiedEigs:
    """Main run, check, recoveries (module docstring)."""
    tol, max_matvecs, lock, lock_bottom = run.tol, run.max_matvecs, k_top, k_bottom
    top, bottom = run.main(lock, lock_bottom, warm, cold, sentinel)
    out = CertifiedEigs(top, bottom, False, locked=lock)
    for round_ in range(rounds + 1):
        out.top, out.bottom = _asked(top, k_top), None if bottom is None else _asked(bottom, k_bottom)
        out.num_matvecs, out.check_matvecs, out.locked = run.products, run.check_products, lock
        if not (top.converged and (bottom is None or bottom.converged)):
            out.reason = "the operator returned non-finite values"
            return out
        residual = _residual_norm(top, bottom)
        scale_top, scale_bottom = _scales(top, bottom)
        if top.num_matvecs >= n:  # the Krylov space is the whole space: the Ritz values are the eigenvalues
            out.vectors = torch.cat([out.top.vectors] + ([out.bottom.vectors] if out.bottom is not None else []), 1)
            out.certified, out.extra = True, _extra(top, k_top)
            return out
        if _ratio((top, bottom), tol) > 1:
            out.reason = f"the Lanczos run did not reach the residual tol·|λmax|/2 in max_matvecs={max_matvecs} products"
            return out
        out.vectors = torch.cat([out.top.vectors] + ([out.bottom.vectors] if out.bottom is not None else []), 1)
        tops, bottoms = top.values.tolist(), [] if bottom is None else bottom.values.tolist()
        if reusable(previous, key, lock, lock_bottom, tops, bottoms, residual, tol * scale_top, tol * scale_bottom):
            out.certified, out.certificate, out.extra = True, previous, _extra(top, k_top)
            return out
        locked_vectors = torch.cat([top.vectors] + ([bottom.vectors] if bottom is not None else []), 1)
        verdict, bounds, rest = run.check(n - locked_vectors.shape[1], locked_vectors, tops, bottoms, k_top, k_bottom,
                                          residual, tol * scale_top, tol * scale_bottom)
        out.num_matvecs, out.check_matvecs = run.products, run.check_products
        if verdict == "nan":
            out.reason = "the operator returned non-finite values"
            return out
        if verdict == "certified":
            out.certified, out.extra = True, _extra(top, k_top)
            out.certificate = Certificate(key, lock, lock_bottom, *bounds)
            return out
        out.misses += verdict == "miss"
        if verdict == "hopeless":
            out.reason = (f"the rest of the spectrum lies within tol of the values: telling them apart takes more than "
                          f"max_matvecs={max_matvecs} products")
            return out
        if round_ == rounds:
            break
        # recovery: the check's extreme vectors that blocked the certificate join the locked ones
        more_top, more_bottom = bounds
        columns = [top.vectors] + rest[:1] * more_top + ([bottom.vectors] if bottom is not None else []) + rest[1:] * more_bottom
        lock, lock_bottom = lock + more_top, lock_bottom + more_bottom
        top, bottom = run.main(lock, lock_bottom, torch.cat(columns, 1), None, None, recovery=True)
    out.reason = (f"checks found the rest of the spectrum within tol of the values ({out.misses} times above them) after "
                  f"{rounds} recoveries")
    return out


class _Runner:
    """The Lanczos runs of one solve, with their product counts."""

    def __init__(self, matvec: Callable[[Tensor], Tensor], dim: int, tol: float, max_matvecs: int, generator: torch.Generator,
                 dtype: torch.dtype, device: torch.device | str, all_reduce: Reduce | None, refine: bool | Refine) -> None:
        self.matvec, self.dim, self.tol, self.max_matvecs = matvec, dim, tol, max_matvecs
        self.common = dict(generator=generator, dtype=dtype, device=device, all_reduce=all_reduce)
        self.refine = refine
        self.products = self.check_products = 0

    def _lanczos(self, k_top: int, k_bottom: int, **kwargs: object) -> tuple[LanczosResult, LanczosResult | None]:
        args = {"tol": self.tol, "max_matvecs": self.max_matvecs, **self.common, **kwargs}
        if k_bottom:
            top, bottom = lanczos_extremes(self.matvec, self.dim, k_top=k_top, k_bottom=k_bottom, **args)
            return top, bottom
        return lanczos_eigs(self.matvec, self.dim, k=k_top, which="LA", **args), None

    def main(self, k_top: int, k_bottom: int, warm: Tensor | None, cold: Tensor | None, sentinel: Tensor | None,
             recovery: bool = False) -> tuple[LanczosResult, LanczosResult | None]:
        """The main run (or a recovery's), stopped on the residuals relative to the top value, then refined. Warm
        starts are not perturbed: the check, not a perturbation, guards against a start that hides a larger eigenvalue."""
        stop = _residual_stop(k_top, k_bottom, self.tol)
        block = self.common["all_reduce"] is None
        if warm is not None and sentinel is not None and block:  # a first block step on [warm, sentinel]
            init = torch.cat([warm.reshape(self.dim, -1), sentinel.to(warm).reshape(-1, 1)], 1)
            first = self._lanczos(k_top, k_bottom, init=init, init_noise=0.0, block=True, stop=stop,
                                  max_matvecs=min(init.shape[1], self.max_matvecs))
            self.products += first[0].num_matvecs
            results = [r for r in first if r is not None]
            if all(r.converged for r in results) and (_ratio(first, self.tol) <= 1 or first[0].num_matvecs >= self.max_matvecs):
                return self._refined(*first)
            warm = torch.cat([r.vectors for r in results], 1) if all(r.converged for r in results) else warm
        if warm is not None:
            # a recovery: block Lanczos, whose first step is a Rayleigh-Ritz on all the columns
            res = self._lanczos(k_top, k_bottom, init=warm, init_noise=0.0, block=recovery and block, stop=stop)
        else:
            res = self._lanczos(k_top, k_bottom, init=cold, init_noise=COLD_START_NOISE, stop=stop)
        self.products += res[0].num_matvecs
        return self._refined(*res)

    def _refined(self, top: LanczosResult, bottom: LanczosResult | None) -> tuple[LanczosResult, LanczosResult | None]:
        """With ``refine=True``, each Ritz vector's Rayleigh quotient and true residual from one more product."""
        if self.refine is False or not (top.converged and (bottom is None or bottom.converged)):
            return top, bottom
        return self.polish(top, bottom, None)

    def polish(self, top: LanczosResult, bottom: LanczosResult | None, refine: Refine | None) -> tuple[LanczosResult, LanczosResult | None]:
        """The Rayleigh quotients and true residuals of the Ritz vectors, from ``refine`` (falling back on one more
        product each), reordered."""
        out = []
        for res, descending in zip([top] + ([bottom] if bottom is not None else []), (True, False)):
            measured = refine(res.vectors) if refine is not None else None
            if measured is None:
                measured = _refined(self.matvec, [res], self.common["dtype"], _Space(self.common["all_reduce"]))[0]
                measured = (measured.values, measured.residuals)
            self.products += res.vectors.shape[1]
            values, residuals = measured
            order = torch.argsort(values, descending=descending)
            out.append(LanczosResult(values[order], res.vectors[:, order], res.num_matvecs, residuals[order], res.krylov_trace))
        return out[0], out[1] if bottom is not None else None

    def check(self, n_rest: int, locked: Tensor, tops: list[float], bottoms: list[float], k_top: int, k_bottom: int,
              residual: float, tol_top: float, tol_bottom: float) -> tuple[str, tuple, list[Tensor]]:
        """Lanczos on the deflated operator from a fresh random vector until the values are certified or cannot be.

        Returns the verdict (``"certified"``, ``"miss"``: the check's Ritz values alone rule the values out,
        ``"close"``: its bounds cannot reach them within ``max_matvecs``), then the bounds ``(upper, lower)`` of the
        rest when certified, else which ends to lock ``(top, bottom)``, and the check's top and bottom Ritz vectors.
        """
        if n_rest <= 0:
            return "certified", (-math.inf, math.inf), []
        budget = min(self.max_matvecs, n_rest)
        verdict: dict[str, object] = {}

        def ok(hi: float, lo: float, m: int) -> tuple[bool, bool]:
            return certified(tops, bottoms, k_top, k_bottom, residual, *rest_bounds(hi, lo, m, n_rest), tol_top, tol_bottom)

        def stop(theta: np.ndarray, residuals: np.ndarray, m: int) -> float:
            hi, lo = float(theta[-1]), float(theta[0])
            seen = certified(tops, bottoms, k_top, k_bottom, residual, hi, lo, tol_top, tol_bottom)
            if not all(seen):  # a direction outside the locked ones that the values cannot account for
                verdict.update(kind="miss", ends=(int(not seen[0]), int(not seen[1])))
                return 0.0
            now = ok(hi, lo, m)
            if all(now):
                verdict.update(kind="certified", bounds=rest_bounds(hi, lo, m, n_rest))
                return 0.0
            # The Ritz values only move outwards. Products still needed here, and in a new check once the blocking
            # extreme Ritz pair is locked (the next Ritz value then blocks), judged once that pair has converged (or
            # the budget is spent): lock when that is cheaper in all, or the only way within the budget; give up when
            # neither can (a cluster, or a continuum, at the values).
            need = _first(lambda j: all(ok(hi, lo, j)), m + 1, budget)
            converged = (not now[0] and residuals[-1] <= tol_top) or (not now[1] and residuals[0] <= tol_bottom)
            if converged or m >= budget:
                inner = ((float(theta[-2]), lo) if not now[0] else (hi, float(theta[1]))) if len(theta) > 2 else (hi, lo)
                after = _first(lambda j: all(ok(*inner, j)), 1, budget)
                if need is None or (after is not None and after + len(tops) + len(bottoms) + 2 < need - m):
                    verdict.update(kind="close" if after is not None else "hopeless", ends=(int(not now[0]), int(not now[1])))
                    return 0.0
            return (need - m) / 4 + 1 if need is not None else math.inf  # for the device path: when a stop is near

        if n_rest >= 2:
            top, bottom = lanczos_extremes(self.matvec, self.dim, 1, 1, tol=self.tol, max_matvecs=budget, deflate=locked,
                                           stop=stop, **self.common)
        else:
            top = bottom = lanczos_eigs(self.matvec, self.dim, 1, tol=self.tol, max_matvecs=1, deflate=locked, stop=stop, **self.common)
        self.products += top.num_matvecs
        self.check_products += top.num_matvecs
        if not (top.converged and bottom.converged):
            return "nan", (0, 0), []
        rest = [top.vectors, bottom.vectors]
        kind = str(verdict.get("kind", "close"))
        return kind, verdict["bounds"] if kind == "certified" else verdict.get("ends", (1, 0)), rest


def _first(test: Callable[[int], bool], low: int, high: int) -> int | None:
    """The smallest ``j`` in ``[low, high]`` that passes ``test`` (monotone: once it passes, it passes), or ``None``."""
    if low > high or not test(high):
        return None
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if test(mid) else (mid + 1, high)
    return low


def _asked(res: LanczosResult, k: int) -> LanczosResult:
    """The first ``k`` Ritz pairs of ``res``."""
    return LanczosResult(res.values[:k], res.vectors[:, :k], res.num_matvecs, res.residuals[:k], res.krylov_trace)


def _extra(top: LanczosResult, k_top: int) -> Tensor | None:
    """Warm-start columns beyond the reported ones: the top vectors a recovery locked past ``k_top``."""
    return top.vectors[:, k_top:].detach() if top.vectors.shape[1] > k_top else None


def _residual_norm(top: LanczosResult, bottom: LanczosResult | None) -> float:
    """``‖A Y - Y Θ‖₂ <= ‖·‖_F`` over the locked vectors (equal for the rank-one residual of one Krylov space)."""
    parts = [top.residuals] + ([bottom.residuals] if bottom is not None else [])
    return float(torch.cat([p.double().cpu() for p in parts]).square().sum().sqrt())


def _scales(top: LanczosResult, bottom: LanczosResult | None) -> tuple[float, float]:
    """What ``tol`` is relative to: ``|θ_1|`` for the top values, ``max(|θ_1|, |θ_min|)`` for the bottom ones."""
    top_scale = abs(float(top.values[0]))
    return top_scale, max(top_scale, abs(float(bottom.values[0]))) if bottom is not None else top_scale


def _residual_ratio(top: float, residuals: np.ndarray, tol: float) -> float:
    """The main run's test: the norm of the locked vectors' residuals over ``RESIDUAL_SHARE · tol · |θ_1|`` (<= 1: done)."""
    limit = RESIDUAL_SHARE * tol * abs(top)
    return float(np.sqrt(np.square(residuals.astype(np.float64)).sum())) / limit if limit > 0 else math.inf


def _residual_stop(k_top: int, k_bottom: int, tol: float) -> Callable[[np.ndarray, np.ndarray, int], float]:
    """:func:`_residual_ratio` as a Lanczos stopping test on the ``k_top`` largest and ``k_bottom`` smallest Ritz pairs."""

    def stop(theta: np.ndarray, residuals: np.ndarray, _m: int) -> float:
        return _residual_ratio(float(theta[-1]), np.concatenate([residuals[len(theta) - k_top:], residuals[:k_bottom]]), tol)

    return stop


def _ratio(results: tuple[LanczosResult, LanczosResult | None], tol: float) -> float:
    """:func:`_residual_ratio` of finished results."""
    top, bottom = results
    parts = [top.residuals] + ([bottom.residuals] if bottom is not None else [])
    return _residual_ratio(float(top.values[0]), torch.cat(parts).double().cpu().numpy(), tol)


def certified_eigs(
    matvec: Callable[[Tensor], Tensor], dim: int, k: int, which: str, owner: str, **kwargs: object
) -> LanczosResult:
    """``k`` extreme eigenpairs (``which``: ``"LA"``, ``"SA"``, ``"LM"``) by :func:`certified_extremes` (``kwargs``);
    values NaN, with a warning naming ``owner``, when not certified. ``"SA"`` is the top of ``-A``; ``"LM"`` takes the
    ``k`` largest magnitudes among the top and bottom ``k`` (both ends certified)."""
    if which == "SA":
        top, _ = certified_pair(lambda v: -matvec(v), dim, k, 0, owner, **kwargs)
        return LanczosResult(-top.values, top.vectors, top.num_matvecs, top.residuals, certified=top.certified)
    if which == "LM":
        if 2 * k > dim:
            raise ValueError(f"{owner}: which='LM' certifies the top and bottom k={k} values, more than the dimension {dim}; "
                             "use k <= dim // 2 or which='LA'/'SA'")
        top, bottom = certified_pair(matvec, dim, k, k, owner, **kwargs)
        values, vectors = torch.cat([top.values, bottom.values]), torch.cat([top.vectors, bottom.vectors], 1)
        order = torch.argsort(values.abs(), descending=True, stable=True)[:k]
        residuals = torch.cat([top.residuals, bottom.residuals])[order]
        return LanczosResult(values[order], vectors[:, order], top.num_matvecs, residuals, certified=top.certified)
    return certified_pair(matvec, dim, k, 0, owner, **kwargs)[0]


def certified_pair(
    matvec: Callable[[Tensor], Tensor], dim: int, k_top: int, k_bottom: int, owner: str, **kwargs: object
) -> tuple[LanczosResult, LanczosResult | None]:
    """:func:`certified_extremes` as two :class:`LanczosResult` (``num_matvecs``: every product), NaN values and a
    warning naming ``owner`` when not certified."""
    import warnings

    res = certified_extremes(matvec, dim, k_top, k_bottom, **kwargs)  # type: ignore[arg-type]
    if not res.certified:
        remedy = "" if "non-finite" in res.reason else " Raise max_matvecs or tol."
        warnings.warn(
            f"{owner}: the eigenvalues could not be certified as the extreme ones to tol={kwargs.get('tol')} ({res.reason}); "
            f"returned as NaN.{remedy}", stacklevel=3,
        )
    out = []
    for part in (res.top, res.bottom):
        if part is not None:
            values = part.values if res.certified else torch.full_like(part.values, math.nan)
            out.append(LanczosResult(values, part.vectors, res.num_matvecs, part.residuals, part.krylov_trace, certified=res.certified))
    return out[0], out[1] if len(out) > 1 else None
