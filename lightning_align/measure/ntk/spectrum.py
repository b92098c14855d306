"""Top eigenpairs and trace of the empirical NTK: the exact path (kernel and ``eigh``) or the matrix-free one
(Lanczos on ``K v = J (Λ Jᵀ v)``, Hutch++ trace), chosen by size and a memory estimate."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_align.measure.lanczos import lanczos_eigs
from lightning_align.measure.ntk.operator import _hutchpp
from lightning_align.measure.ntk.plan import _Plan
from lightning_align.measure.state import preserved_state

Solver = Literal["auto", "exact", "lanczos"]

#: ``n·c`` up to which ``ntk_eigs(solver="auto")`` builds the kernel and calls ``eigvalsh``.
MAX_EXACT_SIZE = 4096
#: Default memory budget of one NTK measurement (GiB): the exact path is skipped (``"auto"``) or refused
#: (``"exact"``), and the matrix-free path refused, when its estimate exceeds it.
MAX_MEMORY_GB = 4.0


def ntk_eigs(model: nn.Module, inputs: Any, k: int, trace_outputs: bool = False, **kwargs: Any) -> Tensor:
    """The ``k`` largest eigenvalues of the empirical NTK flattened to ``(n·c, n·c)`` (or ``(n, n)``).

    :func:`ntk_spectrum` with ``return_vectors=False``, its ``.values``; the keyword arguments are those of
    :func:`ntk_spectrum` (``solver``, ``max_exact_size``, ``tol``, ``max_matvecs``, ``init``, ``generator``,
    ``params``, ``learning_rates``, ``chunk_size``, ``max_memory_gb``).

    Returns:
        ``(k,)`` float64 eigenvalues, largest first.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> ntk_eigs(net, torch.randn(5, 3), k=3).shape
        torch.Size([3])
    """
    return ntk_spectrum(model, inputs, k, trace_outputs, return_vectors=False, **kwargs).values


@dataclass(frozen=True)
class NTKSpectrumResult:
    """Top eigenpairs of an empirical NTK.

    Attributes:
        values: ``(k,)`` float64 eigenvalues, largest first.
        vectors: ``(N, k)`` eigenvectors (column ``i`` for ``values[i]``), ``N`` = kernel size
            (``(N, 0)`` when not asked for).
        solver: the eigensolver used, ``"exact"`` or ``"lanczos"``.
        num_matvecs: kernel-vector products used (0 on the exact path).
        kernel: the flattened ``(N, N)`` kernel on the exact path, else ``None``.
        eigenvalues: all ``N`` eigenvalues (float64, largest first) on the exact path, else ``None``.
        trace: ``tr K``: exact on the exact path; on the matrix-free path the Hutch++ estimate when
            ``trace_samples > 0``, else ``None``.
        trace_stderr: the standard error of ``trace`` (0 when exact; ``None`` without a trace).

    Example::

        res = ntk_spectrum(model.eval(), x, k=3, return_vectors=True)
        res.values, res.vectors.shape
    """

    values: Tensor
    vectors: Tensor
    solver: str
    num_matvecs: int
    kernel: Tensor | None
    eigenvalues: Tensor | None = None
    trace: float | None = None
    trace_stderr: float | None = None


def ntk_spectrum(
    model: nn.Module,
    inputs: Any,
    k: int,
    trace_outputs: bool = False,
    *,
    solver: Solver = "auto",
    max_exact_size: int = MAX_EXACT_SIZE,
    tol: float = 1e-4,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    return_vectors: bool = True,
    trace_samples: int = 0,
    max_memory_gb: float | None = MAX_MEMORY_GB,
) -> NTKSpectrumResult:
    """Top ``k`` eigenpairs of the empirical NTK flattened to ``(n·c, n·c)`` (or ``(n, n)``), the solver used,
    the trace and (exact path) the kernel.

    With ``return_vectors=False`` the exact path calls ``eigvalsh`` (faster than ``eigh``) and
    ``vectors`` is empty (:func:`ntk_eigs` is that, returning the values).

    Memory: before anything is built, one sample runs once to count what a forward saves for backward;
    from that and the layer shapes both paths get an estimate (exact: the Jacobian factors of every
    sample, the ``vmap(jacrev)`` temporaries of a chunk and the kernel; matrix-free: the kept graphs and
    the basis). ``"auto"`` takes the exact path only when its estimate is within ``max_memory_gb``, and
    an estimate above it on the path taken raises a ``ValueError`` naming ``max_memory_gb`` (and what
    to lower). ``chunk_size=None`` sizes the exact path's ``vmap`` chunks to a quarter of the budget.

    Args:
        model, inputs, trace_outputs, params, learning_rates, chunk_size: see
            :func:`~lightning_align.measure.ntk.empirical_ntk`.
        k: number of eigenpairs (``1 <= k <=`` kernel size).
        solver: ``"exact"`` builds the kernel and calls ``eigh``/``eigvalsh`` (in its dtype); ``"lanczos"`` is
            matrix-free (``K v = J(Jᵀv)``, memory ``O(P + n·c·k)``); ``"auto"`` is exact when the kernel
            size is at most ``max_exact_size`` and its memory estimate within ``max_memory_gb``.
        tol, max_matvecs, init, generator: Lanczos settings (see
            :func:`lightning_align.measure.lanczos.lanczos_eigs`; ``init`` warm-starts from earlier vectors).
        return_vectors: also return the eigenvectors.
        trace_samples: on the matrix-free path, the Hutchinson samples of the Hutch++ trace (one VJP
            each; the Lanczos basis gives the exact part); 0: no trace there. The exact path always
            gives the exact trace.
        max_memory_gb: the budget in GiB (default 4); ``None``: no check.

    Example::

        res = ntk_spectrum(model.eval(), x, k=5)
        res.values, res.solver  # "exact" for small kernels, "lanczos" beyond max_exact_size
    """
    if solver not in ("auto", "exact", "lanczos"):
        raise ValueError(f"ntk_eigs: solver must be 'auto', 'exact' or 'lanczos', got {solver!r}")
    if not isinstance(trace_samples, int) or trace_samples < 0:
        raise ValueError(f"ntk_spectrum: trace_samples must be an int >= 0, got {trace_samples!r}")
    plan = _Plan.build(model, inputs, params, learning_rates, True, owner="ntk_eigs")
    size = plan.n if trace_outputs else plan.n * plan.c
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= size:
        what = f"n={plan.n}" if trace_outputs else f"n·c = {plan.n}·{plan.c}"
        raise ValueError(f"ntk_eigs: k={k!r} eigenvalues asked of a kernel of size {size} ({what}); use 1 <= k <= {size}")
    budget = math.inf if max_memory_gb is None else float(max_memory_gb) * 2**30
    if chunk_size is None:
        chunk_size = plan.auto_chunk(budget / 4)
    exact_bytes = plan.exact_bytes(chunk_size, size)
    exact = solver == "exact" or (solver == "auto" and size <= max_exact_size and exact_bytes <= budget)
    if exact and exact_bytes > budget:
        raise ValueError(
            f"ntk_eigs: the exact kernel path needs about {exact_bytes / 2**30:.2f} GiB ({plan.n} samples x {plan.c} "
            f"outputs: per-sample Jacobian factors {plan.factor_bytes / 2**20:.1f} MiB each, kernel {size}x{size}), above "
            f"max_memory_gb={max_memory_gb}; use solver='lanczos' (matrix-free) or 'auto', fewer samples, or raise max_memory_gb"
        )
    if not exact:
        lanczos_bytes = plan.lanczos_bytes(size, min(max_matvecs, size))
        if lanczos_bytes > budget:
            raise ValueError(
                f"ntk_eigs: the matrix-free path needs about {lanczos_bytes / 2**30:.2f} GiB (the kept graphs of {plan.n} "
                f"samples, {plan.graph_bytes / 2**20:.1f} MiB saved per sample, and a Krylov basis of up to "
                f"{min(max_matvecs, size)} x {size}), above max_memory_gb={max_memory_gb}; use fewer samples, a shorter "
                "sequence or fewer outputs, or raise max_memory_gb"
            )
    with preserved_state(model):
        if exact:
            with torch.no_grad():
                factors = plan.factors(inputs, chunk_size)
                flat = plan.contract(factors, factors, trace_outputs)
                del factors
            # In the kernel's own dtype: a float32 kernel carries float32 rounding, which a float64
            # solve cannot undo (and eigvalsh costs ~1.7x more in float64).
            if return_vectors:
                evals, evecs = torch.linalg.eigh(flat)
                evecs = evecs.flip(1)[:, :k]
            else:
                evals, evecs = torch.linalg.eigvalsh(flat), flat.new_zeros(size, 0)
            evals = evals.flip(0).double().cpu()
            trace = float(flat.double().diagonal().sum())
            return NTKSpectrumResult(evals[:k], evecs, "exact", 0, flat, evals, trace, 0.0)
        op = plan.operator(inputs, trace_outputs)
        res = lanczos_eigs(
            op, size, k=k, which="LA", tol=tol, max_matvecs=max_matvecs, init=init,
            generator=generator, dtype=plan.dtype, device=plan.device, keep_basis=trace_samples > 0,
        )
        trace = stderr = None
        if trace_samples > 0 and res.converged and res.basis is not None:
            trace, stderr = _hutchpp(op, res.basis, res.krylov_trace, trace_samples, generator)
        elif trace_samples > 0:
            trace = stderr = math.nan
    return NTKSpectrumResult(res.values.double().cpu(), res.vectors, "lanczos", res.num_matvecs, None, None, trace, stderr)
