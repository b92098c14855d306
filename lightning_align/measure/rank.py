"""Rank of weights and representations (bottleneck structure).

Deep L2-regularized networks learn low-dimensional inner representations: middle-layer weights get a
few singular values near 1 and the rest near 0, and the representations there become nearly
latent-dimensional (Jacot, arXiv 2305.19008). These functions summarise spectra for that picture.

Definitions (``s`` are singular values, largest first):

- stable rank ``‖W‖_F² / ‖W‖_2² = Σ s² / s_1²``;
- effective rank ``exp(H(p))`` with ``p = s / Σ s`` (Roy & Vetterli's entropy rank);
- participation ratio ``(Σ s²)² / Σ s⁴``;
- numerical rank ``#{s_i > tol · s_1}``.

Representations are centred over samples before their SVD (a constant offset is not a direction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_align.measure.autodiff import call_with_fresh_buffers
from lightning_align.measure.batch import ModelKwargs, call_model, prediction


def weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """A weight as a matrix: ``(out, in)`` for linear, ``(out, in·kernel)`` for conv, as is for 2-D.

    Example:
        >>> weight_matrix(torch.zeros(8, 3, 5, 5)).shape
        torch.Size([8, 75])
    """
    if weight.ndim < 2:
        raise ValueError(f"a weight matrix needs at least 2 dimensions, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], -1)


def singular_values(x: torch.Tensor) -> torch.Tensor:
    """Singular values (float64 for accuracy, largest first) of a matrix or a reshaped weight.

    Example:
        >>> singular_values(torch.diag(torch.tensor([1.0, 3.0])))
        tensor([3., 1.], dtype=torch.float64)
    """
    return torch.linalg.svdvals(weight_matrix(x).double())


def stable_rank(w: torch.Tensor) -> float:
    """Stable rank ``‖W‖_F² / ‖W‖_2²`` (0 for a zero matrix).

    Example:
        >>> stable_rank(torch.eye(4))
        4.0
    """
    s = singular_values(w)
    top = s[0] ** 2
    return float((s**2).sum() / top) if top > 0 else 0.0


def effective_rank(x: torch.Tensor, *, center: bool = False) -> float:
    """Entropy effective rank ``exp(-Σ p log p)``, ``p = s / Σ s`` (0 for a zero matrix).

    Args:
        x: a matrix (rows = samples for representations) or a weight tensor.
        center: subtract the mean row first (use for representations).

    Example:
        >>> round(effective_rank(torch.diag(torch.tensor([1.0, 1.0, 0.0]))), 6)
        2.0
    """
    s = singular_values(_centered(x) if center else x)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def participation_ratio(x: torch.Tensor, *, center: bool = False) -> float:
    """Participation ratio ``(Σ s²)² / Σ s⁴`` of the spectrum (0 for a zero matrix).

    Example:
        >>> participation_ratio(torch.eye(4))
        4.0
    """
    s2 = singular_values(_centered(x) if center else x) ** 2
    denom = (s2**2).sum()
    return float(s2.sum() ** 2 / denom) if denom > 0 else 0.0


def numerical_rank(x: torch.Tensor, *, tol: float = 1e-3, center: bool = False) -> int:
    """Number of singular values above ``tol`` times the largest.

    Example:
        >>> numerical_rank(torch.diag(torch.tensor([1.0, 0.5, 1e-6])))
        2
    """
    s = singular_values(_centered(x) if center else x)
    if s.numel() == 0 or s[0] <= 0:
        return 0
    return int((s > tol * s[0]).sum())


def _centered(x: torch.Tensor) -> torch.Tensor:
    m = weight_matrix(x)
    return m - m.mean(dim=0, keepdim=True)


@dataclass(frozen=True)
class WeightSpectrum:
    """Summary of one weight's singular values."""

    singular_values: torch.Tensor
    stable_rank: float
    count_above: int
    count_near_one: int
    frobenius_sq: float


def weight_spectrum(weight: torch.Tensor, *, threshold: float = 0.5, near_one_tol: float = 0.25) -> WeightSpectrum:
    """Singular values of a weight and the bottleneck summaries of Jacot's theorem.

    Args:
        weight: a linear or conv weight.
        threshold: count singular values above this (≈0.5 separates the O(1) from the O(L^-1/2) ones).
        near_one_tol: count singular values with ``|s - 1| <= near_one_tol``.

    Example:
        >>> spec = weight_spectrum(torch.eye(4))
        >>> spec.stable_rank, spec.count_near_one
        (4.0, 4)
    """
    s = singular_values(weight)
    fro_sq = float((s**2).sum())
    top = float(s[0] ** 2) if s.numel() else 0.0
    return WeightSpectrum(
        singular_values=s,
        stable_rank=fro_sq / top if top > 0 else 0.0,
        count_above=int((s > threshold).sum()),
        count_near_one=int(((s - 1).abs() <= near_one_tol).sum()),
        frobenius_sq=fro_sq,
    )


@dataclass(frozen=True)
class RepresentationRanks:
    """Rank estimators of one representation matrix (samples × features, centred)."""

    effective_rank: float
    participation_ratio: float
    numerical_rank: int
    singular_values: torch.Tensor


def representation_ranks(features: torch.Tensor, *, tol: float = 1e-3) -> RepresentationRanks:
    """Effective rank, participation ratio and numerical rank of centred features ``(n, ...)``.

    Example:
        >>> z = torch.randn(100, 2) @ torch.randn(2, 16)  # 2-dimensional data in 16 dimensions
        >>> representation_ranks(z).numerical_rank
        2
    """
    if features.ndim < 2 or features.shape[0] < 2:
        raise ValueError(f"representations need at least 2 samples, got shape {tuple(features.shape)}")
    z = _centered(features.reshape(features.shape[0], -1))
    s = singular_values(z)
    total, s2 = s.sum(), s**2
    p = (s / total)[s > 0] if total > 0 else s[:0]
    return RepresentationRanks(
        effective_rank=float(torch.exp(-(p * p.log()).sum())) if p.numel() else 0.0,
        participation_ratio=float(s2.sum() ** 2 / (s2**2).sum()) if total > 0 else 0.0,
        numerical_rank=int((s > tol * s[0]).sum()) if total > 0 else 0,
        singular_values=s,
    )


def jacobian_rank(
    model: nn.Module, inputs: Any, *, tol: float = 1e-3, k: int | None = None, wrt: str | None = None
) -> tuple[list[int], list[float]]:
    """Numerical rank of the input-output Jacobian at each input, and ``2·Σ_{i≤k} log s_i``.

    The rank estimates the bottleneck rank ``R^(0)``; the log pseudo-determinant over the top ``k``
    (default: the numerical rank) is the lower-bound proxy of ``R^(1)`` in Jacot 2023.

    Args:
        model: maps a batch of inputs to outputs, sample-wise (no cross-sample operations: BatchNorm
            must be in eval mode).
        inputs: a few probe inputs ``(n, ...)``, or keyword inputs (a :class:`~lightning_align.measure.batch.ModelKwargs`
            of a Hugging Face batch) differentiated with respect to their entry ``wrt`` (e.g. ``pixel_values``), the
            other entries (an attention mask) each sample's own. Each sample runs alone (no ``vmap`` over samples).
        wrt: the entry of keyword ``inputs`` to differentiate.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 2, bias=False), nn.Linear(2, 4, bias=False))
        >>> ranks, logdets = jacobian_rank(net, torch.randn(3, 4))
        >>> ranks
        [2, 2, 2]
    """
    from lightning_align.measure.modules import train_mode_batchnorms

    mixing = train_mode_batchnorms(model)
    if mixing:
        raise ValueError(
            f"jacobian_rank needs a sample-wise model, but BatchNorm layers {mixing} are in training mode "
            "(batch statistics mix samples): call model.eval() first to use running statistics."
        )
    n = len(inputs[wrt]) if wrt is not None else len(inputs)
    ranks, logdets = [], []
    for i in range(n):
        caller, x = (model, inputs[i]) if wrt is None else _KeywordInput.of(model, inputs, wrt, i)
        params = {name: p.detach() for name, p in caller.named_parameters()}
        jac = torch.func.jacrev(lambda z: prediction(call_with_fresh_buffers(caller, params, (z.unsqueeze(0),))).squeeze(0))(x)
        s = singular_values(jac.reshape(-1, x.numel()))  # (outputs, inputs), whatever the outputs' shape
        rank = int((s > tol * s[0]).sum()) if s.numel() and s[0] > 0 else 0
        top = s[: (k if k is not None else rank)]
        ranks.append(rank)
        logdets.append(float(2 * top.log().sum()) if top.numel() else 0.0)
    return ranks, logdets


class _KeywordInput(nn.Module):
    """``model`` called on one sample's keyword inputs with the entry ``wrt`` as the (positional) argument."""

    def __init__(self, model: nn.Module, others: ModelKwargs, wrt: str) -> None:
        super().__init__()
        self.model, self.others, self.wrt = model, others, wrt

    @classmethod
    def of(cls, model: nn.Module, inputs: ModelKwargs, wrt: str, i: int) -> tuple[_KeywordInput, torch.Tensor]:
        """The caller for sample ``i`` and that sample's ``wrt`` entry."""
        one = ModelKwargs((k, v[i : i + 1] if isinstance(v, torch.Tensor) else v) for k, v in inputs.items())
        one.labels = None if inputs.labels is None else inputs.labels[i : i + 1]
        return cls(model, one, wrt), inputs[wrt][i]

    def forward(self, x: torch.Tensor) -> Any:
        kwargs = ModelKwargs({**self.others, self.wrt: x})
        kwargs.labels = self.others.labels
        return call_model(self.model, kwargs)
