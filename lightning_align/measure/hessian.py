"""Hessian spectra of a training loss: extreme eigenvalues, trace, spectral density, Adam-preconditioned.

All functions take ``(model, loss_fn, batch)`` with ``batch = (inputs, targets)`` and
``loss_fn(model(inputs), targets)`` a scalar mean loss, work matrix-free on Hessian-vector products
(:mod:`lightning_align.measure.operators`) and leave the model exactly as they found it.

- :func:`hessian_eigs`: extreme eigenpairs by Lanczos (sharpness ``λ_max`` is ``values[0]`` with ``"LA"``).
- :func:`hessian_extremes`: the top and bottom eigenpairs from one Lanczos run.
- :func:`hessian_trace` / :func:`hessian_trace_estimate`: Hutch++-style trace: the exact trace of
  the Hessian on a small Krylov basis plus Hutchinson on its orthogonal complement (unbiased, with a
  standard error).
- :func:`hessian_density`: spectral density by stochastic Lanczos quadrature (SLQ).
- :func:`~lightning_align.measure.optim.adam_preconditioner` (re-exported here, with :func:`lr_preconditioner`
  and :func:`stability_threshold`): ``D = (lr / (sqrt(v̂) + eps))^{1/2}`` from an Adam/AdamW state, so that
  ``λ_max(D H D)`` is the preconditioned sharpness ``lr · λ_max(P^{-1} H)`` of Cohen et al. (2022),
  whose stability threshold is ``2 (1 + β1) / (1 - β1)`` (38 for β1 = 0.9).

Example:
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
    >>> res = hessian_eigs(net, torch.nn.functional.mse_loss, (x, y), k=2)
    >>> res.values.shape, res.vectors.shape
    (torch.Size([2]), torch.Size([49, 2]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_align.measure.operators import FlatOperator, FlatParams, LossFn, Method, Reduce, hessian_operator
from lightning_align.measure.certified import certified_eigs, certified_pair
from lightning_align.measure.lanczos import LanczosResult, Which, lanczos_tridiagonal
# The optimizer side of the sharpness lives in measure/optim.py; re-exported here, where callers import it.
from lightning_align.measure.optim import ADAM_LIKE, adam_preconditioner, lr_preconditioner, stability_threshold  # noqa: F401


def _default_generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(0)


def _check_k(k: int, op: FlatOperator) -> None:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if k > op.dim:
        raise ValueError(
            f"k={k} eigenvalues asked, but the model has only {op.dim} trainable parameters "
            f"(the Hessian is {op.dim}x{op.dim}); use k <= {op.dim}"
        )


def _preconditioned(op: FlatOperator, preconditioner: Tensor | None) -> Any:
    if preconditioner is None:
        return op
    d = preconditioner.detach().to(device=op.device, dtype=op.dtype)
    if d.shape != (op.dim,):
        raise ValueError(f"preconditioner must be a flat ({op.dim},) vector, got shape {tuple(d.shape)}")
    return lambda v: d * op(d * v)


def _solve_args(op: FlatOperator, tol: float, max_matvecs: int, init: Tensor | None, generator: torch.Generator | None) -> dict[str, Any]:
    """Warm from ``init`` (perturbed by 1%), else a random start."""
    warm = None if init is None else init.detach().to(device=op.device, dtype=op.dtype).reshape(op.dim, -1)
    return dict(tol=tol, max_matvecs=max_matvecs, generator=_default_generator(generator), dtype=op.dtype, device=op.device, warm=warm)


def hessian_eigs(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k: int = 1,
    which: Which = "LA",
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce | None = None,
    method: Method = "auto",
    preconditioner: Tensor | None = None,
) -> LanczosResult:
    """Extreme eigenpairs of the Hessian of ``loss_fn(model(inputs), targets)`` in the trainable parameters.

    Args:
        model: the model (its trainable parameters, in ``named_parameters()`` order, index the vectors).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` mean loss.
        batch: ``(inputs, targets)``.
        k: number of eigenpairs.
        which: ``"LA"`` largest first (sharpness), ``"SA"`` smallest first, ``"LM"`` largest magnitude.
        tol: every value within ``tol · |λ|`` of its eigenvalue (``λ`` the top one; ``"SA"``: the bottom one), certified by
            :func:`~lightning_align.measure.certified.certified_extremes` (a second Lanczos run from a random vector on
            the rest of the spectrum); values that cannot be certified in ``max_matvecs`` are NaN, with a warning.
        max_matvecs: most Hessian-vector products of each Lanczos run (``num_matvecs`` counts all of them).
        init: warm start: previous ``vectors`` ``(n, j)`` or one ``(n,)`` vector.
        generator: random stream of the start vector (default: a fixed seed, so results repeat).
        reduce: applied to every product (an all-reduce mean under DDP; identity otherwise).
        method: HVP method (see :func:`~lightning_align.measure.operators.hessian_operator`).
        preconditioner: flat ``D``; then the eigenpairs are those of ``D H D`` (see :func:`~lightning_align.measure.optim.adam_preconditioner`).

    Returns:
        A :class:`~lightning_align.measure.lanczos.LanczosResult` (values in float64).

    Raises:
        ValueError: no trainable parameters, ``k`` above the parameter count, a loss that is not a scalar.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> res = hessian_eigs(model, nn.functional.mse_loss, (x, y), k=1)
        >>> exact = torch.linalg.eigvalsh(2 * torch.cat([x, torch.ones(8, 1)], 1).T @ torch.cat([x, torch.ones(8, 1)], 1) / 8)
        >>> abs(res.values[0] - exact[-1]).item() < 1e-3 * exact[-1].item()
        True
    """
    with hessian_operator(model, loss_fn, batch, method=method, reduce=reduce) as op:
        _check_k(k, op)
        args = _solve_args(op, tol, max_matvecs, init, generator)
        return certified_eigs(_preconditioned(op, preconditioner), op.dim, k, which, "hessian_eigs", **args)


def hessian_extremes(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Any,
    k_top: int = 1,
    k_bottom: int = 1,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduce: Reduce | None = None,
    method: Method = "auto",
    preconditioner: Tensor | None = None,
) -> tuple[LanczosResult, LanczosResult]:
    """Top ``k_top`` and bottom ``k_bottom`` Hessian eigenpairs from one Lanczos run (shared products).

    Arguments as in :func:`hessian_eigs`. Returns ``(top, bottom)``: top largest first, bottom smallest first.

    Example::

        top, bottom = hessian_extremes(model, loss_fn, (x, y), k_top=1, k_bottom=1)
        top.values[0], bottom.values[0]  # sharpness and the most negative curvature
    """
    with hessian_operator(model, loss_fn, batch, method=method, reduce=reduce) as op:
        _check_k(k_top + k_bottom, op)
        args = _solve_args(op, tol, max_matvecs, init, generator)
        return certified_pair(_preconditioned(op, preconditioner), op.dim, k_top, k_bottom, "hessian_extremes", **args)  # type: ignore


def float64_rayleigh_ritz(model: nn.Module, loss_fn: LossFn, batch: Any, vectors: Tensor) -> tuple[Tensor, Tensor]:
    """Rayleigh quotients and true residuals of ``vectors`` under the Hessian evaluated in float64.

    The parameters, buffers and floating-point inputs are float64 copies (the model is not touched), so
    the Hessian-vector products carry no float32 rounding: the Rayleigh quotient of a Ritz vector with
    residual ``r`` from a float32 Lanczos run is then within ``~r²/gap`` of the eigenvalue, where the float32
    products alone stop at ~1e-7-1e-6 relative (``benchmarks/sharpness.py``). One float64 forward and
    ``create_graph`` backward, then one float64 product per column. Raises ``RuntimeError`` through an op without
    a double backward (``NoDoubleBackward`` for an ``@once_differentiable`` one, which would be silently wrong).

    Args:
        vectors: ``(n, k)`` columns over the trainable parameters (``named_parameters()`` order).

    Returns:
        ``(values, residuals)``: float64 ``(k,)`` each, ``residuals[i] = ‖H y_i - θ_i y_i‖ / ‖y_i‖``.

    Example:
        >>> net = nn.Linear(3, 1)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> values, residuals = float64_rayleigh_ritz(net, nn.functional.mse_loss, (x, y), torch.eye(4)[:, :1])
        >>> values.dtype, residuals.shape
        (torch.float64, torch.Size([1]))
    """
    from torch.func import functional_call

    from lightning_align.measure.autodiff import NoDoubleBackward, batch_statistics_without_update, twice_differentiable
    from lightning_align.measure.autodiff import once_differentiable_functions
    from lightning_align.measure.operators import _split_batch, check_scalar_loss
    from lightning_align.measure.state import map_tensors, preserved_state

    params = FlatParams.of(model)
    p64 = {n: t.detach().double().requires_grad_() for n, t in zip(params.names, params.tensors)}
    others = {n: t.detach().double() if t.is_floating_point() else t.detach() for n, t in model.named_parameters() if n not in p64}
    buffers = {n: b.detach().double() if b.is_floating_point() else b.detach().clone() for n, b in model.named_buffers()}
    inputs, targets = map_tensors(_split_batch(batch), lambda t: t.double() if t.is_floating_point() else t)
    leaves = list(p64.values())
    with preserved_state(model), torch.enable_grad(), twice_differentiable(), batch_statistics_without_update(model):
        loss = check_scalar_loss(loss_fn(functional_call(model, {**buffers, **others, **p64}, (inputs,)), targets))
        if cut := once_differentiable_functions([loss]):
            raise NoDoubleBackward(f"float64_rayleigh_ritz: no double backward through {', '.join(cut)}", cut[0])
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        used = [(g, leaf) for g, leaf in zip(grads, leaves) if g is not None and g.requires_grad]
        values, residuals = [], []
        for i in range(vectors.shape[1]):
            y = vectors[:, i].detach().to(device=params.device, dtype=torch.float64)
            parts = FlatParams(params.names, leaves).unflatten(y)
            ys = [parts[n] for n, leaf in zip(params.names, leaves) if any(leaf is u for _, u in used)]
            hv_used = torch.autograd.grad([g for g, _ in used], leaves, ys, retain_graph=True, allow_unused=True) if used else [None] * len(leaves)
            hv = FlatParams(params.names, leaves).flatten(list(hv_used)).detach()
            theta = torch.dot(y, hv) / torch.dot(y, y)
            values.append(theta)
            residuals.append((hv - theta * y).norm() / y.norm())
    return torch.stack(values).cpu(), torch.stack(residuals).cpu()


@dataclass
class TraceEstimate:
    """A stochastic trace estimate.

    Attributes:
        value: the estimate of ``tr(H)`` (unbiased).
        stderr: its standard error (from the spread of the Hutchinson samples; 0 when the Krylov part
            is exact, e.g. when the basis spans the whole space).
        num_matvecs: Hessian-vector products used.

    Example::

        est = hessian_trace_estimate(model, loss_fn, (x, y))
        print(f"tr H = {est.value:.3g} ± {est.stderr:.2g} ({est.num_matvecs} HVPs)")
    """

    value: float
    stderr: float
    num_matvecs: int


def trace_estimate(
    matvec: Any,
    dim: int,
    num_samples: int = 16,
    basis_steps: int = 8,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> TraceEstimate:
    """Hutch++-style trace of a symmetric operator: Krylov part exactly, the rest by Hutchinson.

    A ``basis_steps``-step Lanczos run from a random start gives an orthonormal basis ``Q`` that
    captures the dominant eigendirections, and ``tr(QᵀAQ) = Σ θ`` (its Ritz values) for free. The
    remainder ``tr((I-QQᵀ) A (I-QQᵀ))`` is estimated with ``num_samples`` Rademacher vectors projected
    onto the complement. ``Q`` is independent of those vectors, so the estimate is unbiased; its
    variance is that of Hutchinson on ``A`` with the top of the spectrum removed.

    Example:
        >>> a = torch.diag(torch.arange(1.0, 101.0))
        >>> est = trace_estimate(lambda v: a @ v, 100, num_samples=30, basis_steps=10)
        >>> abs(est.value - 5050.0) < 4 * est.stderr + 1e-6
        True
    """
    if num_samples < 1 and basis_steps < dim:
        raise ValueError("trace_estimate: num_samples must be >= 1 unless basis_steps covers the whole dimension")
    if basis_steps < 1:
        raise ValueError(f"trace_estimate: basis_steps must be >= 1, got {basis_steps}")
    gen = _default_generator(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    start = torch.randn(dim, generator=gen, dtype=dtype, device=gen.device).to(device)
    theta, _, basis = lanczos_tridiagonal(matvec, start, basis_steps, gen, restart_on_breakdown=True)
    used = basis.shape[0]
    krylov = float(theta.sum())
    if used >= dim or not math.isfinite(krylov):
        return TraceEstimate(krylov, 0.0 if math.isfinite(krylov) else float("nan"), used)
    samples = []
    for _ in range(num_samples):
        z = torch.randint(0, 2, (dim,), generator=gen, device=gen.device).to(device=device, dtype=dtype) * 2 - 1
        z = z - basis.T @ (basis @ z)
        samples.append(float(z @ matvec(z)))
    values = torch.tensor(samples, dtype=torch.float64)
    stderr = float(values.std() / math.sqrt(len(samples))) if len(samples) > 1 else float("inf")
    return TraceEstimate(krylov + float(values.mean()), stderr, used + num_samples)


def hessian_trace_estimate(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, reduce: Reduce | None = None, method: Method = "auto", **kwargs: Any
) -> TraceEstimate:
    """Trace of the Hessian with its standard error: :func:`trace_estimate` on the Hessian.

    Args:
        reduce, method: as in :func:`hessian_eigs`.
        **kwargs: the settings of :func:`trace_estimate` (``num_samples``, ``basis_steps``, ``generator``).

    Example::

        est = hessian_trace_estimate(model, loss_fn, (x, y), num_samples=16)
        est.value, est.stderr
    """
    with hessian_operator(model, loss_fn, batch, method=method, reduce=reduce) as op:
        return trace_estimate(op, op.dim, dtype=op.dtype, device=op.device, **kwargs)


def hessian_trace(model: nn.Module, loss_fn: LossFn, batch: Any, **kwargs: Any) -> float:
    """Unbiased estimate of ``tr(H)``: :func:`hessian_trace_estimate` (same keyword arguments) without the error bar.

    Example:
        >>> net = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> t = hessian_trace(net, torch.nn.functional.mse_loss, (x, y), basis_steps=4)
        >>> abs(t - float(2 * (x.pow(2).sum(1).mean() + 1))) < 1e-4  # H = 2 E[[x,1][x,1]^T]
        True
    """
    return hessian_trace_estimate(model, loss_fn, batch, **kwargs).value


@dataclass
class SpectralDensity:
    """A spectral density from stochastic Lanczos quadrature.

    Attributes:
        nodes: ``(num_vectors, m)`` Ritz values (quadrature nodes) of each run.
        weights: ``(num_vectors, m)`` quadrature weights; each row sums to 1.
        grid: ``(grid_size,)`` points where the smoothed density is evaluated.
        density: ``(grid_size,)`` Gaussian-smoothed density on ``grid``; it integrates to 1.
        sigma: the Gaussian width used.
        num_matvecs: Hessian-vector products used.

    Example::

        dens = hessian_density(model, loss_fn, (x, y))
        (dens.density * (dens.grid[1] - dens.grid[0])).sum()  # ~ 1
    """

    nodes: Tensor
    weights: Tensor
    grid: Tensor
    density: Tensor
    sigma: float
    num_matvecs: int


def spectral_density(
    matvec: Any,
    dim: int,
    num_steps: int = 30,
    num_vectors: int = 1,
    grid_size: int = 512,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SpectralDensity:
    """SLQ density ``(1/n) Σ_i δ(λ - λ_i)`` of a symmetric operator, smoothed by a Gaussian.

    Each of ``num_vectors`` random unit vectors ``v`` gives the Gauss quadrature of ``vᵀ δ(λ - A) v``
    from ``num_steps`` Lanczos steps (nodes = Ritz values, weights = squared first components of the
    Ritz vectors); their average estimates the density (Ghorbani et al. 2019; PyHessian's ``density``).

    Args:
        sigma: Gaussian width (default: 1% of the spectral range seen).

    Example:
        >>> a = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
        >>> dens = spectral_density(lambda v: a @ v, 3, num_steps=3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        >>> sorted(round(v, 4) for v in dens.nodes[0].tolist())
        [1.0, 2.0, 3.0]
    """
    if num_vectors < 1 or num_steps < 1 or grid_size < 2:
        raise ValueError("spectral_density: num_vectors, num_steps must be >= 1 and grid_size >= 2")
    gen = _default_generator(generator)
    device = torch.device(device) if device is not None else torch.device("cpu")
    runs = []
    used = 0
    for _ in range(num_vectors):
        start = torch.randn(dim, generator=gen, dtype=dtype, device=gen.device).to(device)
        theta, weights, basis = lanczos_tridiagonal(matvec, start, num_steps, gen)
        used += basis.shape[0]
        runs.append((theta, weights))
    m = max(len(t) for t, _ in runs)
    nodes = torch.zeros(num_vectors, m, dtype=torch.float64)
    weights = torch.zeros(num_vectors, m, dtype=torch.float64)
    for i, (t, w) in enumerate(runs):
        nodes[i, : len(t)], weights[i, : len(w)] = t, w
        nodes[i, len(t):] = t[-1] if len(t) else float("nan")
    lo, hi = float(nodes.min()), float(nodes.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        nan = torch.full((grid_size,), float("nan"), dtype=torch.float64)
        return SpectralDensity(nodes, weights, nan, nan.clone(), float("nan"), used)
    width = max(hi - lo, 1e-12 * max(abs(hi), abs(lo), 1.0))
    sigma = 0.01 * width if sigma is None else float(sigma)
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_size, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[None, None, :] - nodes[..., None]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    density = (weights[..., None] * kernel).sum(dim=1).mean(dim=0)
    return SpectralDensity(nodes, weights, grid, density, sigma, used)


def hessian_density(
    model: nn.Module, loss_fn: LossFn, batch: Any, *, reduce: Reduce | None = None, method: Method = "auto", **kwargs: Any
) -> SpectralDensity:
    """Hessian spectral density by stochastic Lanczos quadrature: :func:`spectral_density` on the Hessian.

    Cost: ``num_steps · num_vectors`` Hessian-vector products, so run it rarely.

    Args:
        reduce, method: as in :func:`hessian_eigs`.
        **kwargs: the settings of :func:`spectral_density` (``num_steps``, ``num_vectors``, ``grid_size``,
            ``sigma``, ``generator``).

    Example::

        dens = hessian_density(model, loss_fn, (x, y), num_steps=30)
        plt.semilogy(dens.grid, dens.density)
    """
    with hessian_operator(model, loss_fn, batch, method=method, reduce=reduce) as op:
        return spectral_density(op, op.dim, dtype=op.dtype, device=op.device, **kwargs)
