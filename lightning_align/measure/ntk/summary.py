"""Spectral summaries of a kernel and comparisons of kernels (pure tensor functions)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_align.measure.ntk.kernel import flatten_kernel


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

