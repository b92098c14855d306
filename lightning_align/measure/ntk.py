"""Empirical neural tangent kernel: the kernel, its spectrum and summaries (Day, Kahn & Roberts; Noci et al.).

The empirical NTK of a model ``f`` on inputs ``x_1..x_n`` is

    ``K[i, j, a, b] = <∂f_a(x_i)/∂θ, ∂f_b(x_j)/∂θ>``   (``c`` outputs per sample, ``θ`` the parameters)

and, with ``trace_outputs=True``, the ``(n, n)`` kernel ``Σ_a K[i, j, a, a]``. Flattened to
``(n·c, n·c)`` (row index ``i·c + a``) it is ``J Jᵀ`` with ``J`` the ``(n·c, P)`` Jacobian, so its top
eigenvalue is the stiffest direction of function space that gradient descent moves along.

How it is computed (faster than the ``vmap(jacrev)`` + einsum recipe of the PyTorch NTK tutorial):

- **Structured layers** (``nn.Linear``, ``nn.Conv2d`` with ``groups=1``): the per-sample gradient of a
  weight is ``Σ_t g_t x_tᵀ`` (``x`` the layer input, ``g`` the gradient at its output, ``t`` over tokens or
  conv patches), so its kernel is ``Σ_{s,t} (x_is·x_jt)(g_ias·g_jbt)``: an input Gram times an
  output-gradient Gram, never the ``(n·c, P)`` Jacobian (the trick of nngeometry and neural-tangents).
  For long token sequences the per-sample gradients are formed instead when that is cheaper.
- **Every other parameter** (norm scales, embeddings, attention internals, weights shared between
  modules): per-sample Jacobians by ``torch.func`` and a contraction.

Both come from one ``vmap(jacrev)`` pass over samples that differentiates with respect to the generic
parameters and to zero "probes" added to each structured layer's output; no weight gradient is formed.

Assumption: no operation mixes samples (BatchNorm must use running statistics, i.e. ``eval()``), and the
function is deterministic (no active dropout). Both are checked, with a clear error.

Matrix-free eigenvalues (``method="lanczos"``) use ``K v = J (Jᵀ v)`` with the forward linearised once
per measurement: the forward runs once with its graph kept, ``Jᵀc`` is a backward on it and ``J u`` a
backward through the graph of a symbolic ``Jᵀc`` (built once, the "double-vjp" trick), so that a product
costs two backward passes and never re-runs the forward (``torch.func.linearize`` gives the same
products but traces the model at every measurement, ~25 products' worth on the example GPT). The trace
then comes matrix-free as well: Hutch++, the exact trace of the kernel on the Lanczos basis plus
Hutchinson on its complement, one VJP per sample (``z·Kz = ‖Λ^½ Jᵀz‖²``), with its standard error.
Memory is that of the kept graphs (~2-3 training steps' activations on the probe) plus the basis
``O(m·n·c)``, never the kernel; :func:`ntk_spectrum` estimates both paths' memory from a one-sample run
before building anything and refuses what exceeds ``max_memory_gb``, naming the argument.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.func import jacrev, jvp, vmap

from lightning_align.measure.autodiff import call_with_fresh_buffers, math_attention
from lightning_align.measure.state import map_tensors, preserved_state

Method = Literal["auto", "exact", "lanczos"]

#: ``n·c`` up to which ``ntk_eigs(method="auto")`` builds the kernel and calls ``eigvalsh``.
MAX_EXACT_SIZE = 4096
#: Elements of the largest temporary of the token-Gram contraction (bounds memory for sequences).
_BLOCK_ELEMENTS = 1 << 24
#: Default memory budget of one NTK measurement (GiB): the exact path is skipped (``"auto"``) or refused
#: (``"exact"``), and the matrix-free path refused, when its estimate exceeds it.
MAX_MEMORY_GB = 4.0
#: Kept-graph memory of the matrix-free path in units of the tensors one forward saves for backward
#: (the forward graph plus the graph of the symbolic VJP): measured 3.5x on the example GPT and 3.2x on
#: a HF GPT-2 (peak resident memory, ``benchmarks/ntk_memory.py``); 4 leaves a margin.
_GRAPH_FACTOR = 4.0


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------
def empirical_ntk(
    model: nn.Module,
    inputs: Any,
    trace_outputs: bool = False,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    structured: bool = True,
) -> Tensor:
    """The empirical NTK of ``model`` on ``inputs``.

    Args:
        model: maps a batch of inputs to outputs ``(n, ...)`` sample by sample (the ``c = prod(...)``
            outputs per sample are flattened). BatchNorm must be in eval mode and dropout inactive.
        inputs: a tensor ``(n, ...)`` or a tuple/dict of tensors that all have ``n`` rows (passed to
            ``model`` as one argument).
        trace_outputs: return the ``(n, n)`` kernel summed over outputs ``a = b``.
        params: names or regular expressions (full match) of the parameters to differentiate; default:
            every parameter with ``requires_grad``.
        learning_rates: optional per-parameter factors ``λ_p`` (by name): the kernel becomes
            ``Σ_p λ_p J_p J_pᵀ``, the NTK of gradient descent with those per-parameter learning rates.
        chunk_size: samples per ``vmap`` chunk (bounds the memory of the Jacobian pass).
        structured: use the layer structure (``False``: plain per-sample Jacobian contraction everywhere).

    Returns:
        ``(n, n, c, c)`` tensor ``K[i, j, a, b]``, or ``(n, n)`` with ``trace_outputs=True``; in the
        parameters' dtype, on their device.

    Raises:
        ValueError: inputs the model cannot run on, BatchNorm in train mode, active dropout, an unknown
            parameter name, no trainable parameter.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> empirical_ntk(net, torch.randn(5, 3)).shape
        torch.Size([5, 5, 2, 2])
        >>> empirical_ntk(net, torch.randn(5, 3), trace_outputs=True).shape
        torch.Size([5, 5])
    """
    plan = _Plan.build(model, inputs, params, learning_rates, structured, owner="empirical_ntk")
    with preserved_state(model), torch.no_grad():
        factors = plan.factors(inputs, chunk_size)
        flat = plan.contract(factors, factors, trace_outputs)
    n, c = plan.n, plan.c
    if trace_outputs:
        return flat
    return flat.view(n, c, n, c).permute(0, 2, 1, 3).contiguous()


def flatten_kernel(kernel: Tensor) -> Tensor:
    """A kernel ``(n, n, c, c)`` as the ``(n·c, n·c)`` matrix with row index ``i·c + a`` (2-D kernels as is).

    Example:
        >>> flatten_kernel(torch.zeros(2, 2, 3, 3)).shape
        torch.Size([6, 6])
    """
    if kernel.ndim == 2:
        return kernel
    if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[2] != kernel.shape[3]:
        raise ValueError(f"a kernel must have shape (n, n) or (n, n, c, c), got {tuple(kernel.shape)}")
    n, _, c, _ = kernel.shape
    return kernel.permute(0, 2, 1, 3).reshape(n * c, n * c)


def ntk_eigs(
    model: nn.Module,
    inputs: Any,
    k: int,
    trace_outputs: bool = False,
    *,
    method: Method = "auto",
    max_exact_size: int = MAX_EXACT_SIZE,
    tol: float = 1e-4,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    max_memory_gb: float | None = MAX_MEMORY_GB,
) -> Tensor:
    """The ``k`` largest eigenvalues of the empirical NTK flattened to ``(n·c, n·c)`` (or ``(n, n)``).

    Args:
        model, inputs, trace_outputs, params, learning_rates, chunk_size: see :func:`empirical_ntk`.
        k: number of eigenvalues (``1 <= k <=`` kernel size).
        method: ``"exact"`` builds the kernel and calls ``eigvalsh`` (in its dtype); ``"lanczos"`` is
            matrix-free (``K v = J(Jᵀv)``, memory ``O(P + n·c·k)``); ``"auto"`` is exact when the kernel
            size is at most ``max_exact_size`` and its memory estimate within ``max_memory_gb``.
        tol, max_matvecs, init, generator: Lanczos settings (see
            :func:`lightning_align.measure.lanczos.lanczos_eigs`; ``init`` warm-starts from earlier vectors).
        max_memory_gb: memory budget (see :func:`ntk_spectrum`); ``None``: no check.

    Returns:
        ``(k,)`` float64 eigenvalues, largest first.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> ntk_eigs(net, torch.randn(5, 3), k=3).shape
        torch.Size([3])
    """
    return ntk_spectrum(
        model, inputs, k, trace_outputs, method=method, max_exact_size=max_exact_size, tol=tol,
        max_matvecs=max_matvecs, init=init, generator=generator, params=params,
        learning_rates=learning_rates, chunk_size=chunk_size, return_vectors=False, max_memory_gb=max_memory_gb,
    ).values


@dataclass(frozen=True)
class NTKSpectrumResult:
    """Top eigenpairs of an empirical NTK.

    Attributes:
        values: ``(k,)`` float64 eigenvalues, largest first.
        vectors: ``(N, k)`` eigenvectors (column ``i`` for ``values[i]``), ``N`` = kernel size
            (``(N, 0)`` when not asked for).
        method: ``"exact"`` or ``"lanczos"``.
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
    method: str
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
    method: Method = "auto",
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
    """Like :func:`ntk_eigs`, with eigenvectors, the method used, the trace and (exact path) the kernel.

    With ``return_vectors=False`` the exact path calls ``eigvalsh`` (faster than ``eigh``) and
    ``vectors`` is empty.

    Memory: before anything is built, one sample runs once to count what a forward saves for backward;
    from that and the layer shapes both paths get an estimate (exact: the Jacobian factors of every
    sample, the ``vmap(jacrev)`` temporaries of a chunk and the kernel; matrix-free: the kept graphs and
    the basis). ``"auto"`` takes the exact path only when its estimate is within ``max_memory_gb``, and
    an estimate above it on the path taken raises a ``ValueError`` naming ``max_memory_gb`` (and what
    to lower). ``chunk_size=None`` sizes the exact path's ``vmap`` chunks to a quarter of the budget.

    Args:
        trace_samples: on the matrix-free path, the Hutchinson samples of the Hutch++ trace (one VJP
            each; the Lanczos basis gives the exact part); 0: no trace there. The exact path always
            gives the exact trace.
        max_memory_gb: the budget in GiB (default 4); ``None``: no check.

    Example::

        res = ntk_spectrum(model.eval(), x, k=5)
        res.values, res.method  # "exact" for small kernels, "lanczos" beyond max_exact_size
    """
    if method not in ("auto", "exact", "lanczos"):
        raise ValueError(f"ntk_eigs: method must be 'auto', 'exact' or 'lanczos', got {method!r}")
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
    exact = method == "exact" or (method == "auto" and size <= max_exact_size and exact_bytes <= budget)
    if exact and exact_bytes > budget:
        raise ValueError(
            f"ntk_eigs: the exact kernel path needs about {exact_bytes / 2**30:.2f} GiB ({plan.n} samples x {plan.c} "
            f"outputs: per-sample Jacobian factors {plan.factor_bytes / 2**20:.1f} MiB each, kernel {size}x{size}), above "
            f"max_memory_gb={max_memory_gb}; use method='lanczos' (matrix-free) or 'auto', fewer samples, or raise max_memory_gb"
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
        from lightning_align.measure.lanczos import lanczos_eigs

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


def _hutchpp(op: _KernelOperator, basis: Tensor, krylov_trace: float, samples: int, generator: torch.Generator | None) -> tuple[float, float]:
    """``tr K`` = ``tr(QᵀKQ)`` (exact, from Lanczos) + Hutchinson on the complement of ``Q``, with its standard error.

    ``Q`` does not depend on the Rademacher vectors drawn here, so the estimate is unbiased; its variance is that
    of Hutchinson on ``K`` with the top of the spectrum removed. ``z·Kz`` is ``‖Λ^½ Jᵀz‖²``: one VJP per sample.
    """
    size = basis.shape[1]
    if basis.shape[0] >= size:
        return krylov_trace, 0.0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(samples):
        z = torch.randint(0, 2, (size,), generator=gen, device=gen.device).to(device=basis.device, dtype=basis.dtype) * 2 - 1
        z = z - basis.T @ (basis @ z)
        values.append(op.quadratic(z))
    vals = torch.tensor(values, dtype=torch.float64)
    stderr = float(vals.std() / math.sqrt(samples)) if samples > 1 else math.inf
    return krylov_trace + float(vals.mean()), stderr


def ntk_matvec(
    model: nn.Module,
    inputs: Any,
    trace_outputs: bool = False,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
) -> tuple[Callable[[Tensor], Tensor], int]:
    """``(v -> K v, size)``: the flattened NTK as a matrix-free operator (two backward passes per product).

    The operator keeps the forward graph of the batch and the graph of a symbolic VJP (the forward is
    linearised once, not re-run per product); call it inside :func:`preserved_state` if the model has
    buffers a forward could touch. With ``trace_outputs`` one product costs ``c`` VJP/JVP pairs.

    Example::

        matvec, size = ntk_matvec(model.eval(), x)
        kv = matvec(torch.ones(size))  # K @ 1 without forming K
    """
    plan = _Plan.build(model, inputs, params, learning_rates, True, owner="ntk_matvec")
    return plan.operator(inputs, trace_outputs), plan.n if trace_outputs else plan.n * plan.c


def ntk_trace(
    model: nn.Module,
    inputs: Any,
    *,
    params: Sequence[str] | None = None,
    learning_rates: Mapping[str, float] | None = None,
    chunk_size: int | None = None,
    max_memory_gb: float = 1.0,
) -> float:
    """``tr K = Σ_{i,a} ‖∂f_a(x_i)/∂θ‖²`` exactly, without building the kernel (diagonal blocks only).

    The same for the full and the output-traced kernel. It costs ``n·c`` per-sample VJPs (batched), so
    for many outputs per sample (a language model's vocabulary) prefer the Hutch++ estimate of
    :func:`ntk_spectrum` (``trace_samples``). ``chunk_size=None`` picks the samples per block so that a
    block's factors and ``vmap(jacrev)`` temporaries stay within ``max_memory_gb`` (one sample at least).

    Example:
        >>> net = nn.Linear(3, 2)
        >>> x = torch.randn(5, 3)
        >>> k = empirical_ntk(net, x)
        >>> abs(ntk_trace(net, x) - flatten_kernel(k).trace().item()) < 1e-4
        True
    """
    plan = _Plan.build(model, inputs, params, learning_rates, True, owner="ntk_trace")
    if chunk_size is None:
        chunk_size = plan.auto_chunk(max_memory_gb * 2**30, with_factors=True)
    total = 0.0
    with preserved_state(model), torch.no_grad():
        for lo in range(0, plan.n, chunk_size):
            part = _slice(inputs, lo, min(lo + chunk_size, plan.n))
            f = plan.factors(part, None)
            total += float(plan.contract(f, f, True).diagonal().double().sum())
    return total


# --------------------------------------------------------------------------------------------------
# Summaries
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NTKSummary:
    """Spectral summaries of a kernel.

    Attributes:
        eigenvalues: all eigenvalues (float64), largest first.
        max_eig: the largest eigenvalue.
        min_eig: the smallest eigenvalue.
        trace: the trace.
        cond: ``max_eig / max(min_eig, N · eps · max_eig)``, with ``eps`` of the kernel's dtype: the
            condition number, capped at ``1 / (N · eps)`` (the kernel's numerical resolution). A value at the
            cap means numerically singular (e.g. more kernel rows than parameters); it stays finite so that it
            plots in TensorBoard.
        effective_rank: ``exp(H(p))``, ``p = λ / Σ λ`` over the positive eigenvalues.

    Example::

        s = ntk_summary(empirical_ntk(model.eval(), x))
        s.max_eig, s.cond, s.effective_rank
    """

    eigenvalues: Tensor
    max_eig: float
    min_eig: float
    trace: float
    cond: float
    effective_rank: float


def ntk_summary(kernel: Tensor, eigenvalues: Tensor | None = None) -> NTKSummary:
    """Max/min eigenvalue, trace, condition number and effective rank of a kernel.

    Args:
        kernel: ``(n, n)``, ``(n, n, c, c)`` or a flattened kernel.
        eigenvalues: its eigenvalues if already known (any order).

    Example:
        >>> s = ntk_summary(torch.diag(torch.tensor([4.0, 1.0])))
        >>> s.max_eig, s.trace, s.cond
        (4.0, 5.0, 4.0)
    """
    flat = flatten_kernel(kernel)
    lam = (torch.linalg.eigvalsh(flat) if eigenvalues is None else eigenvalues).double()
    lam = lam.sort(descending=True).values.cpu()
    top, bottom = float(lam[0]), float(lam[-1])
    eps = torch.finfo(flat.dtype).eps if flat.is_floating_point() else torch.finfo(torch.float64).eps
    cond = top / max(bottom, lam.numel() * eps * top) if top > 0 else math.inf
    pos = lam.clamp_min(0)
    total = float(pos.sum())
    if total > 0:
        p = pos[pos > 0] / total
        erank = float(torch.exp(-(p * p.log()).sum()))
    else:
        erank = 0.0
    return NTKSummary(lam, top, bottom, float(flat.double().diagonal().sum()), cond, erank)


def kernel_target_alignment(kernel: Tensor, targets: Tensor) -> float:
    """``<K, y yᵀ>_F / (‖K‖_F ‖y yᵀ‖_F)``, i.e. ``yᵀKy / (‖K‖_F ‖y‖²)`` (Cristianini et al., uncentred).

    Args:
        kernel: ``(n, n, c, c)`` (``targets`` ``(n, c)`` flattened to match) or ``(n, n)`` (``targets``
            ``(n,)`` or ``(n, c)``, the target Gram ``Y Yᵀ``).
        targets: real targets; one-hot encode class labels first.

    Example:
        >>> y = torch.tensor([1.0, -1.0])
        >>> kernel_target_alignment(torch.outer(y, y), y)
        1.0
    """
    y = targets.double()
    k = kernel.double()
    if k.ndim == 4:
        n, _, c, _ = k.shape
        if y.numel() != n * c:
            raise ValueError(f"kernel_target_alignment: targets of shape {tuple(targets.shape)} do not match a kernel of shape {tuple(kernel.shape)} (need n·c = {n * c} values)")
        k, y = flatten_kernel(k), y.reshape(n * c, 1)
    else:
        if k.ndim != 2 or y.shape[0] != k.shape[0]:
            raise ValueError(f"kernel_target_alignment: targets of shape {tuple(targets.shape)} do not match a kernel of shape {tuple(kernel.shape)}")
        y = y.reshape(y.shape[0], -1)
    gram = y @ y.T
    denom = float(k.norm() * gram.norm())
    return float((k * gram).sum()) / denom if denom > 0 else 0.0


def kernel_distance(k0: Tensor, k1: Tensor) -> float:
    """``1 − <K₀, K₁>_F / (‖K₀‖_F ‖K₁‖_F)``: how far the kernel moved (0: same up to scale) (Noci et al.).

    Example:
        >>> kernel_distance(torch.eye(2), 3 * torch.eye(2))
        0.0
    """
    if k0.shape != k1.shape:
        raise ValueError(f"kernel_distance: kernels of shapes {tuple(k0.shape)} and {tuple(k1.shape)} differ")
    a, b = k0.double().flatten(), k1.double().flatten().to(k0.device)
    denom = float(a.norm() * b.norm())
    return max(0.0, 1.0 - float(a @ b) / denom) if denom > 0 else 0.0


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------
@dataclass
class _Layer:
    """A structured layer: its module, selected weight/bias names and their learning-rate factors."""

    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: str | None
    bias: str | None
    lr_weight: float
    lr_bias: float
    calls: list[tuple[int, ...]]  # per-call output shapes (batch of one)


@dataclass
class _Factors:
    """Per-sample factors of the Jacobian for a block of samples."""

    generic: dict[str, Tensor]  # name -> (b, c, P)
    inputs: dict[str, Tensor]  # layer -> (b, T, d_in)
    grads: dict[str, Tensor]  # layer -> (b, c, T, d_out)


class _Plan:
    """Which parameters go through which path, for one model and input structure."""

    def __init__(self) -> None:
        self.model: nn.Module
        self.n = 0
        self.c = 0
        self.generic: dict[str, Tensor] = {}
        self.lr: dict[str, float] = {}
        self.layers: dict[str, _Layer] = {}
        self.selected: dict[str, Tensor] = {}
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.graph_bytes = 0  # what one sample's forward saves for backward

    @classmethod
    def build(
        cls,
        model: nn.Module,
        inputs: Any,
        params: Sequence[str] | None,
        learning_rates: Mapping[str, float] | None,
        structured: bool,
        owner: str,
    ) -> _Plan:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        check_sample_independent(model, owner)
        plan = cls()
        plan.model = model
        plan.n = _num_samples(inputs, owner)
        plan.selected = _select_parameters(model, params, owner)
        lr = dict(learning_rates or {})
        unknown = sorted(set(lr) - set(plan.selected))
        if unknown:
            raise ValueError(f"{owner}: learning_rates names {unknown} that are not among the differentiated parameters")
        plan.lr = {name: float(lr.get(name, 1.0)) for name in plan.selected}
        first = next(iter(plan.selected.values()))
        plan.dtype, plan.device = first.dtype, first.device
        candidates = _structured_candidates(model, plan.selected) if structured else {}
        calls, out_shape, plan.graph_bytes = _dry_run(model, _slice(inputs, 0, 1), candidates, owner, _describe(inputs))
        plan.c = math.prod(out_shape[1:])
        for name, (module, kind, w, b) in candidates.items():
            if calls.get(name):
                plan.layers[name] = _Layer(module, kind, w, b, plan.lr.get(w, 1.0) if w else 0.0, plan.lr.get(b, 1.0) if b else 0.0, calls[name])
        covered = {p for layer in plan.layers.values() for p in (layer.weight, layer.bias) if p}
        plan.generic = {n: p for n, p in plan.selected.items() if n not in covered}
        return plan

    # -- memory estimates ---------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _layer_dims(self) -> list[tuple[_Layer, int, int, int]]:
        """``(layer, tokens, d_in, d_out)`` per structured call (tokens: positions or conv patches)."""
        dims = []
        for layer in self.layers.values():
            m = layer.module
            for shape in layer.calls:
                if layer.kind == "conv2d":
                    d_in = m.in_channels * math.prod(m.kernel_size)
                    dims.append((layer, math.prod(shape[2:]), d_in, shape[1]))
                else:
                    dims.append((layer, math.prod(shape[1:-1]), m.in_features, shape[-1]))
        return dims

    @property
    def factor_bytes(self) -> int:
        """Jacobian factors of one sample (generic Jacobians, layer inputs and output gradients)."""
        elems = self.c * sum(p.numel() for p in self.generic.values())
        elems += sum(t * (d_in + self.c * d_out) for _, t, d_in, d_out in self._layer_dims())
        return elems * self.itemsize

    def auto_chunk(self, budget: float, with_factors: bool = False) -> int:
        """Samples per ``vmap(jacrev)`` chunk whose temporaries (``c + 1`` graphs per sample) fit ``budget``."""
        per_sample = (self.c + 1) * self.graph_bytes + (self.factor_bytes if with_factors else 0)
        if not math.isfinite(budget) or per_sample == 0:
            return self.n
        return int(min(self.n, max(1, budget // per_sample)))

    def exact_bytes(self, chunk: int, size: int) -> int:
        """The exact path: every sample's factors, one chunk's temporaries, the contraction's and the kernel (twice: ``eigh``)."""
        n, c, item = self.n, self.c, self.itemsize
        contraction = _BLOCK_ELEMENTS * item
        for _, t, d_in, d_out in self._layer_dims():
            if t > 1 and _prefer_per_sample(n, n, c, t, d_in, d_out, size == n):
                contraction = max(contraction, 2 * n * c * d_in * d_out * item)
        return n * self.factor_bytes + min(chunk, n) * (c + 1) * self.graph_bytes + contraction + 2 * size * size * item

    def lanczos_bytes(self, size: int, steps: int) -> int:
        """The matrix-free path: the kept graphs, the basis and a few parameter-sized vectors."""
        params = sum(p.numel() for p in self.selected.values())
        return int(_GRAPH_FACTOR * self.n * self.graph_bytes) + (steps * size + 4 * params) * self.itemsize

    # -- Jacobian factors ---------------------------------------------------------------------------
    def factors(self, inputs: Any, chunk_size: int | None) -> _Factors:
        """Per-sample generic Jacobians, structured-layer inputs and output gradients (one vmap pass)."""
        model, layers = self.model, self.layers
        generic = {n: p.detach() for n, p in self.generic.items()}
        eps = {name: [torch.zeros(s, dtype=self.dtype, device=self.device) for s in layer.calls] for name, layer in layers.items()}

        def f_single(gen: dict[str, Tensor], probes: dict[str, list[Tensor]], x: Any) -> tuple[Tensor, dict[str, list[Tensor]]]:
            seen: dict[str, list[Tensor]] = {name: [] for name in layers}
            with _probe_hooks(layers, probes, seen):
                out = call_with_fresh_buffers(model, gen, (map_tensors(x, lambda t: t.unsqueeze(0)),))
            return out.reshape(-1), seen

        jac = jacrev(f_single, argnums=(0, 1), has_aux=True)
        with math_attention():
            (j_gen, j_eps), seen = vmap(jac, in_dims=(None, None, 0), chunk_size=chunk_size)(generic, eps, inputs)
        b, c = _num_samples(inputs, "ntk"), self.c
        out = _Factors({n: j.reshape(b, c, -1) for n, j in j_gen.items()}, {}, {})
        for name, layer in layers.items():
            xs, gs = [], []
            for x_in, g_out in zip(seen[name], j_eps[name]):
                if layer.kind == "conv2d":
                    xs.append(_unfold(layer.module, x_in.squeeze(1)).transpose(1, 2))  # (b, L, C·k·k)
                    gs.append(g_out.reshape(b, c, g_out.shape[3], -1).transpose(2, 3))  # (b, c, L, C_out)
                else:
                    xs.append(x_in.reshape(b, -1, x_in.shape[-1]))
                    gs.append(g_out.reshape(b, c, -1, g_out.shape[-1]))
            out.inputs[name] = torch.cat(xs, dim=1)
            out.grads[name] = torch.cat(gs, dim=2)
        return out

    # -- contraction --------------------------------------------------------------------------------
    def contract(self, fa: _Factors, fb: _Factors, traced: bool) -> Tensor:
        """Kernel block between two sets of samples: ``(na·c, nb·c)``, or ``(na, nb)`` traced."""
        na, nb, c = _rows(fa), _rows(fb), self.c
        out = torch.zeros((na, nb) if traced else (na * c, nb * c), dtype=self.dtype, device=self.device)
        for name, ja in fa.generic.items():
            _add_generic(out, ja, fb.generic[name], self.lr[name], traced)
        for name, layer in self.layers.items():
            xa, ga, xb, gb = fa.inputs[name], fa.grads[name], fb.inputs[name], fb.grads[name]
            tokens = xa.shape[1]
            if tokens == 1:
                _add_dense(out, xa[:, 0], ga[:, :, 0], xb[:, 0], gb[:, :, 0], layer, traced)
            elif _prefer_per_sample(na, nb, c, tokens, xa.shape[-1], ga.shape[-1], traced):
                if layer.weight:
                    ja = torch.einsum("iato,itd->iaod", ga, xa).reshape(na, c, -1)
                    jb = torch.einsum("iato,itd->iaod", gb, xb).reshape(nb, c, -1)
                    _add_generic(out, ja, jb, layer.lr_weight, traced)
                if layer.bias:
                    _add_generic(out, ga.sum(2), gb.sum(2), layer.lr_bias, traced)
            else:
                _add_token_gram(out, xa, ga, xb, gb, layer, traced)
        return out

    # -- matrix-free --------------------------------------------------------------------------------
    def operator(self, inputs: Any, traced: bool) -> _KernelOperator:
        """``v -> K v`` by ``J (Λ Jᵀ v)`` on the whole batch, the forward linearised once."""
        return _KernelOperator(self, inputs, traced)


class _KernelOperator:
    """``K = J Λ Jᵀ`` on a fixed batch as a matrix-free operator, the forward linearised once.

    The forward runs once with its graph kept: ``Jᵀc`` is one backward on it; ``J u`` is one backward
    through the graph of ``g(c) = Jᵀc`` for a symbolic cotangent ``c`` (built once with ``create_graph``;
    ``g`` is linear in ``c``, so ``∂(g·u)/∂c = J u``). A product is two backward passes and never
    re-runs the forward. An op without a double backward (rare: a custom ``autograd.Function`` whose
    backward is ``once_differentiable`` cuts the symbolic graph, silently) is caught on the first product,
    where ``cotᵀ(J Λ Jᵀ cot)`` must equal ``‖Λ^½ Jᵀ cot‖²``; the operator then falls back to a
    ``torch.func.jvp`` per product, with a warning.
    """

    def __init__(self, plan: _Plan, inputs: Any, traced: bool) -> None:
        self.n, self.c, self.traced = plan.n, plan.c, traced
        self.dtype, self.device = plan.dtype, plan.device
        self.names = list(plan.selected)
        self.scales = [plan.lr[k] for k in self.names]
        self.primals = [plan.selected[k].detach().requires_grad_() for k in self.names]
        frozen = {k: p.detach() for k, p in plan.model.named_parameters() if k not in plan.selected}
        model, n, c, names = plan.model, plan.n, plan.c, self.names

        def f(values: Sequence[Tensor]) -> Tensor:
            return call_with_fresh_buffers(model, {**frozen, **dict(zip(names, values))}, (inputs,)).reshape(n, c)

        self._f = f
        with torch.enable_grad(), math_attention():
            self.out = f(self.primals)
        self._symbolic: tuple[Tensor, list[Tensor], list[int]] | None = None
        self._functional = False
        self._checked = False

    def __call__(self, v: Tensor) -> Tensor:
        v = v.to(self.dtype)
        if not self.traced:
            return self._product(v.reshape(self.n, self.c)).reshape(-1)
        out = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for a in range(self.c):  # Σ_a J_a Λ J_aᵀ v
            cot = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
            cot[:, a] = v
            out += self._product(cot)[:, a]
        return out

    def _product(self, cot: Tensor) -> Tensor:
        """``J Λ Jᵀ cot``; the first product also checks the symbolic JVP against the VJP (both give ``cotᵀKcot``)."""
        pulled = self.vjp(cot)
        u = self._scaled(pulled)
        out = self.jvp(u)
        if not self._checked and not self._functional:
            self._checked = True
            direct = float((cot * out).sum())
            adjoint = float(sum(float((a * b).sum()) for a, b in zip(pulled, u) if a is not None))
            if abs(direct - adjoint) > 1e-3 * max(abs(adjoint), 1e-30):
                # a backward that cannot be differentiated (e.g. @once_differentiable) cut the symbolic graph
                self._fall_back(f"the symbolic JVP disagrees with the VJP ({direct:.6g} vs {adjoint:.6g})")
                out = self.jvp(u)
        return out

    def _fall_back(self, why: str) -> None:
        import warnings

        warnings.warn(
            f"lightning_align: the NTK's outputs have no usable double backward ({why[:200]}); using torch.func.jvp, "
            "which re-runs the forward at every product.",
            stacklevel=4,
        )
        self._functional, self._symbolic = True, None

    def quadratic(self, z: Tensor) -> float:
        """``zᵀ K z = Σ_p λ_p ‖J_pᵀ z‖²``: VJPs only."""
        z = z.to(self.dtype)
        cots = [z.reshape(self.n, self.c)] if not self.traced else []
        for a in range(self.c if self.traced else 0):
            cot = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
            cot[:, a] = z
            cots.append(cot)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for cot in cots:
            for u, lr in zip(self.vjp(cot), self.scales):
                if u is not None:
                    total += lr * u.double().pow(2).sum()
        return float(total)

    def vjp(self, cot: Tensor) -> list[Tensor | None]:
        if not self.out.requires_grad:  # outputs independent of the parameters: J = 0
            return [None] * len(self.primals)
        return list(torch.autograd.grad(self.out, self.primals, cot, retain_graph=True, allow_unused=True))

    def _scaled(self, u: list[Tensor | None]) -> list[Tensor | None]:
        return [t if t is None or lr == 1.0 else t * lr for t, lr in zip(u, self.scales)]

    def jvp(self, tangents: list[Tensor | None]) -> Tensor:
        zero = torch.zeros(self.n, self.c, dtype=self.dtype, device=self.device)
        if not self.out.requires_grad:
            return zero
        if not self._functional:
            try:
                return self._jvp_symbolic(tangents, zero)
            except (NotImplementedError, RuntimeError) as err:
                message = str(err).lower()
                if not any(hint in message for hint in ("derivative", "not implemented", "double backward", "twice")):
                    raise
                self._fall_back(str(err))
        primals = [p.detach() for p in self.primals]
        tangents = [torch.zeros_like(p) if t is None else t for p, t in zip(primals, tangents)]
        with math_attention():  # the fused CPU/GPU attention kernels have no forward-mode AD
            return jvp(lambda *ps: self._f(ps), tuple(primals), tuple(tangents))[1]

    def _jvp_symbolic(self, tangents: list[Tensor | None], zero: Tensor) -> Tensor:
        if self._symbolic is None:
            c = torch.zeros_like(self.out, requires_grad=True)
            with torch.enable_grad(), math_attention():
                g = torch.autograd.grad(self.out, self.primals, c, create_graph=True, allow_unused=True)
            used = [i for i, t in enumerate(g) if t is not None and t.requires_grad]
            self._symbolic = (c, [g[i] for i in used], used)
        c, g, used = self._symbolic
        pairs = [(gi, tangents[i]) for gi, i in zip(g, used) if tangents[i] is not None]
        if not pairs:
            return zero
        (ju,) = torch.autograd.grad([p[0] for p in pairs], c, [p[1] for p in pairs], retain_graph=True, allow_unused=True)
        return zero if ju is None else ju


# -- contraction kernels ----------------------------------------------------------------------------
def _rows(f: _Factors) -> int:
    for t in (*f.generic.values(), *f.inputs.values()):
        return t.shape[0]
    raise ValueError("no parameter to differentiate")


def _add_generic(out: Tensor, ja: Tensor, jb: Tensor, lr: float, traced: bool) -> None:
    if traced:  # Σ_a J_a J_aᵀ: (c, na, P) @ (c, P, nb)
        out.add_((ja.transpose(0, 1) @ jb.permute(1, 2, 0)).sum(0), alpha=lr)
    else:
        out.addmm_(ja.reshape(-1, ja.shape[-1]), jb.reshape(-1, jb.shape[-1]).T, alpha=lr)


def _add_dense(out: Tensor, xa: Tensor, ga: Tensor, xb: Tensor, gb: Tensor, layer: _Layer, traced: bool) -> None:
    """One token per sample: ``(λ_w x_i·x_j + λ_b)(g_ia·g_jb)``."""
    scale = torch.zeros((), dtype=out.dtype, device=out.device)
    if layer.weight:
        scale = layer.lr_weight * (xa @ xb.T)
    if layer.bias:
        scale = scale + layer.lr_bias
    na, nb = xa.shape[0], xb.shape[0]
    if traced:
        gram = (ga.transpose(0, 1) @ gb.permute(1, 2, 0)).sum(0)
        out.add_(scale * gram)
    else:
        c = ga.shape[1]
        gram = (ga.reshape(na * c, -1) @ gb.reshape(nb * c, -1).T).view(na, c, nb, c)
        out.view(na, c, nb, c).add_(gram * (scale.reshape(na, 1, nb, 1) if scale.ndim else scale))


def _add_token_gram(out: Tensor, xa: Tensor, ga: Tensor, xb: Tensor, gb: Tensor, layer: _Layer, traced: bool) -> None:
    """Tokens ``s, t``: ``Σ_{s,t} (λ_w x_is·x_jt + λ_b)(g_ias·g_jbt)``, in row blocks to bound memory."""
    na, c, tokens, d_out = ga.shape
    nb = gb.shape[0]
    block = max(1, _BLOCK_ELEMENTS // max(1, nb * tokens * tokens + nb * tokens * c * d_out))
    for lo in range(0, na, block):
        hi = min(na, lo + block)
        s = torch.zeros((hi - lo, nb, tokens, tokens), dtype=out.dtype, device=out.device)
        if layer.weight:
            s += layer.lr_weight * torch.einsum("isd,jtd->ijst", xa[lo:hi], xb)
        if layer.bias:
            s += layer.lr_bias
        p = torch.einsum("ijst,jbtd->ijsbd", s, gb)
        if traced:
            out[lo:hi] += torch.einsum("iasd,ijsad->ij", ga[lo:hi], p)
        else:
            out.view(na, c, nb, c)[lo:hi] += torch.einsum("iasd,ijsbd->iajb", ga[lo:hi], p)


def _prefer_per_sample(na: int, nb: int, c: int, t: int, d_in: int, d_out: int, traced: bool) -> bool:
    """Whether forming per-sample weight gradients beats the token Gram (by a flop count)."""
    cc = c if traced else c * c
    gram = na * nb * t * t * (d_in + c * d_out) + na * nb * cc * t * d_out
    per_sample = (na + nb) * c * t * d_in * d_out + na * nb * cc * d_in * d_out
    return per_sample < gram


# -- model inspection -------------------------------------------------------------------------------
_BN = nn.modules.batchnorm._BatchNorm


def check_sample_independent(model: nn.Module, owner: str = "empirical_ntk") -> None:
    """Raise if a module of ``model`` mixes samples (train-mode BatchNorm) or is random (active dropout).

    The per-sample kernel is only defined when each output depends on its own input alone, and a
    kernel of a random function changes from call to call.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> check_sample_independent(net.eval())  # running statistics: fine
        >>> check_sample_independent(net.train())
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    for name, m in model.named_modules():
        if isinstance(m, _BN) and m.training:
            raise ValueError(
                f"{owner}: BatchNorm layer {name!r} is in training mode, where it normalises with batch "
                "statistics and so mixes samples; the per-sample NTK is then undefined. Put it in eval mode "
                "(running statistics), e.g. `model.eval()`, or use NTKSpectrum(bn_mode='eval') (the default)."
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{owner}: dropout layer {name!r} is active (training mode, p={m.p}), so the model is a random "
                "function; put it in eval mode (`model.eval()` or `module.train(False)`) before computing the NTK."
            )


def _select_parameters(model: nn.Module, patterns: Sequence[str] | None, owner: str) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if patterns is None:
        chosen = trainable
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        chosen = {}
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{owner}: parameter pattern {pattern!r} is not a valid regular expression: {err}") from err
            hits = {n: p for n, p in trainable.items() if n == pattern or regex.fullmatch(n)}
            if not hits:
                names = list(trainable)
                raise ValueError(
                    f"{owner}: parameter name or pattern {pattern!r} matches no trainable parameter of "
                    f"{type(model).__name__}. Trainable names include: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                )
            chosen.update(hits)
        chosen = {n: p for n, p in trainable.items() if n in chosen}
    if not chosen:
        raise ValueError(f"{owner}: {type(model).__name__} has no trainable parameter (requires_grad=True) to differentiate")
    return chosen


def _structured_candidates(model: nn.Module, selected: dict[str, Tensor]) -> dict[str, tuple[nn.Module, str, str | None, str | None]]:
    """Linear / Conv2d modules with the stock forward whose selected parameters no other module uses."""
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in selected.items()}
    out = {}
    for mname, m in model.named_modules():
        if type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear):
            kind = "linear"
        elif (
            isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        ):
            kind = "conv2d"
        else:
            continue
        names = {}
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is not None and id(p) in by_id:
                names[attr] = by_id[id(p)]
        shared = any(uses.get(id(m._parameters[a]), 0) > 1 for a in names)
        if names and not shared:
            out[mname] = (m, kind, names.get("weight"), names.get("bias"))
    return out


@contextlib.contextmanager
def _probe_hooks(layers: Mapping[str, Any], probes: Mapping[str, list[Tensor]] | None, seen: dict[str, list[Any]]) -> Iterator[None]:
    """Record each layer's input per call; add the zero probe of that call to its output (if given)."""
    handles = []
    for name, layer in layers.items():
        module = layer.module if isinstance(layer, _Layer) else layer[0]

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor, name: str = name) -> Tensor | None:
            k = len(seen[name])
            seen[name].append(args[0] if probes is not None else tuple(out.shape))
            if probes is None:
                return None
            if k >= len(probes[name]):
                raise RuntimeError(f"layer {name!r} was called more often than on the first sample; the NTK needs the same graph for every sample")
            return out + probes[name][k]

        # prepend: see the layer's own output, before other hooks (e.g. μP output multipliers) rescale it
        handles.append(module.register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _dry_run(
    model: nn.Module, one: Any, candidates: Mapping[str, Any], owner: str, described: str
) -> tuple[dict[str, list[tuple[int, ...]]], tuple[int, ...], int]:
    """Run one sample: the per-call output shapes of the structured candidates, the output shape, and the
    bytes the forward saves for backward (parameters, buffers and inputs excluded): the per-sample unit of
    the memory estimates."""
    seen: dict[str, list[Any]] = {name: [] for name in candidates}
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *_leaves(one))}
    counted: set[tuple[int, int]] = set()
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return t
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] not in own and key not in counted:
            counted.add(key)
            saved += key[1]
        return t

    try:
        with (
            preserved_state(model), torch.enable_grad(), math_attention(), _probe_hooks(candidates, None, seen),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = model(one)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{owner}: the model could not run on the inputs ({described}; tried their first sample): "
            f"{type(err).__name__}: {err}. Check that the inputs match the model"
        ) from err
    if not isinstance(out, Tensor):
        raise TypeError(f"{owner}: the model returned {type(out).__name__}; a tensor of outputs (n, ...) is needed (define `probe_outputs` or wrap the model)")
    if out.ndim == 0 or out.shape[0] != 1:
        raise ValueError(f"{owner}: on one sample the model returned shape {tuple(out.shape)}; the leading dimension must be the sample dimension")
    if not out.is_floating_point():
        raise TypeError(f"{owner}: the model returned {out.dtype} outputs; the NTK needs floating-point outputs")
    return seen, tuple(out.shape), saved


def _unfold(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)


def _leaves(inputs: Any) -> list[Tensor]:
    leaves: list[Tensor] = []
    map_tensors(inputs, lambda t: leaves.append(t) or t)
    return leaves


def _num_samples(inputs: Any, owner: str) -> int:
    leaves = _leaves(inputs)
    if not leaves:
        raise ValueError(f"{owner}: inputs hold no tensor (got {type(inputs).__name__})")
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(f"{owner}: every input tensor needs the same leading (sample) dimension >= 1, got {_describe(inputs)}")
    return sizes.pop()


def _slice(inputs: Any, lo: int, hi: int) -> Any:
    return map_tensors(inputs, lambda t: t[lo:hi])


def _describe(inputs: Any) -> str:
    shapes = [tuple(t.shape) for t in _leaves(inputs)]
    return f"shape {shapes[0]}" if len(shapes) == 1 else f"shapes {shapes}"
