"""NTK fluctuations over random initialisations (Day, Kahn & Roberts: orthogonal vs Gaussian tanh networks).

At finite width ``n`` the NTK at initialisation is random; its relative fluctuations are ``O(1/n)``
and, for Gaussian weights, grow linearly with depth ``ℓ`` (the ``ℓ/n`` expansion of the Principles of
Deep Learning Theory). Day, Kahn & Roberts (arXiv 2310.07765) show that orthogonal weights at tanh
criticality (gain 1, zero biases) keep them bounded in depth. This module measures, over fresh
initialisations, for each input ``x`` and output units ``a ≠ b``:

- ``diag_ratio = n · Var(Θ_aa) / E[Θ_aa]²`` (the paper's ``(A + 2B)/H²``), and
- ``offdiag_ratio = n · E[Θ_ab²] / E[Θ_aa]²`` (the paper's ``B/H²``),

with ``Θ`` the NTK of the PDLT convention: learning-rate factor ``λ_W / n_{ℓ-1}`` on each weight (fan-in
``n_{ℓ-1}``) and ``λ_b = 1`` on biases (``lr_scaling="pdlt"``), or the plain ``J Jᵀ`` (``"none"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_align.measure.ntk import empirical_ntk

LrScaling = Literal["pdlt", "none"]


@dataclass(frozen=True)
class NTKFluctuation:
    """Ensemble statistics of the NTK at initialisation.

    Attributes:
        diag_ratio: ``n · Var(Θ_aa) / E[Θ_aa]²`` (variance over inits, averaged over inputs and units).
        offdiag_ratio: ``n · E[Θ_ab²] / E[Θ_aa]²`` over ``a ≠ b`` (NaN with a single output unit).
        mean: ``E[Θ_aa]``.
        variance: ``Var(Θ_aa)`` (unbiased over inits, averaged over inputs and units).
        width: the ``n`` used in the ratios.
        n_inits: number of initialisations.
        diagonals: ``(n_inits, n_inputs, c)`` values of ``Θ_aa(x, x)``, for further statistics.

    Example::

        fl = ntk_fluctuation(lambda: MLP(width=256), x, n_inits=8)
        fl.diag_ratio  # ~ constant in width under NTK parametrization
    """

    diag_ratio: float
    offdiag_ratio: float
    mean: float
    variance: float
    width: int
    n_inits: int
    diagonals: Tensor


def ntk_fluctuation(
    model_factory: Callable[[int], nn.Module],
    inputs: Any,
    n_inits: int,
    *,
    width: int | None = None,
    lr_scaling: LrScaling = "pdlt",
    seed: int = 0,
) -> NTKFluctuation:
    """NTK fluctuation ratios over ``n_inits`` fresh initialisations.

    Args:
        model_factory: ``seed -> model``, a freshly initialised model for each seed (it should seed its
            own initialisation, e.g. with ``torch.Generator().manual_seed(seed)``; the factory is also
            called under ``torch.random.fork_rng`` seeded with ``seed``, so a factory using the global
            stream is reproducible and the caller's stream is not advanced).
        inputs: probe inputs ``(m, ...)``; each input gives one ``Θ(x, x)`` per init (use a fixed norm,
            e.g. ``‖x‖² = n_0``).
        n_inits: number of initialisations (>= 2; the paper uses 100-300).
        width: the ``n`` of the ratios; default: the fan-in of the model's last ``nn.Linear``.
        lr_scaling: ``"pdlt"`` weighs each ``nn.Linear``/conv weight by ``1/fan_in`` (biases by 1), the
            NTK of the PDLT book; ``"none"`` uses the plain ``J Jᵀ``.
        seed: seed of the first init; init ``k`` uses ``seed + k``.

    Returns:
        :class:`NTKFluctuation`.

    Example:
        >>> def factory(seed):
        ...     torch.manual_seed(seed)
        ...     return nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> r = ntk_fluctuation(factory, torch.randn(1, 8), n_inits=4)
        >>> r.width, r.n_inits
        (8, 4)
    """
    if not isinstance(n_inits, int) or n_inits < 2:
        raise ValueError(f"ntk_fluctuation: n_inits must be an int >= 2 (a variance needs two inits), got {n_inits!r}")
    if lr_scaling not in ("pdlt", "none"):
        raise ValueError(f"ntk_fluctuation: lr_scaling must be 'pdlt' or 'none', got {lr_scaling!r}")
    diagonals, offdiag_sq = [], []
    n = width
    for k in range(n_inits):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k)
            model = model_factory(seed + k)
        if not isinstance(model, nn.Module):
            raise TypeError(f"ntk_fluctuation: model_factory returned {type(model).__name__}, not an nn.Module")
        if n is None:
            n = _last_linear_fan_in(model)
        lrs = _pdlt_learning_rates(model) if lr_scaling == "pdlt" else None
        kernel = empirical_ntk(model, inputs, learning_rates=lrs).detach().double()
        blocks = kernel.diagonal(dim1=0, dim2=1).permute(2, 0, 1)  # (m, c, c): Θ_ab(x, x)
        diagonals.append(blocks.diagonal(dim1=1, dim2=2))
        c = blocks.shape[-1]
        off = ~torch.eye(c, dtype=torch.bool, device=blocks.device)
        offdiag_sq.append((blocks[:, off] ** 2).mean() if c > 1 else torch.tensor(math.nan, dtype=torch.float64))
    diag = torch.stack(diagonals).cpu()  # (n_inits, m, c)
    mean = float(diag.mean())
    variance = float(diag.var(dim=0, unbiased=True).mean())
    second = float(torch.stack(offdiag_sq).mean())
    assert n is not None
    return NTKFluctuation(
        diag_ratio=n * variance / mean**2,
        offdiag_ratio=n * second / mean**2,
        mean=mean,
        variance=variance,
        width=int(n),
        n_inits=n_inits,
        diagonals=diag,
    )


def _pdlt_learning_rates(model: nn.Module) -> dict[str, float]:
    """``1/fan_in`` for the weights of Linear/conv layers, 1 elsewhere (trainable parameters only)."""
    rates = {}
    for mname, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.weight.requires_grad:
            fan_in = m.weight[0].numel()
            rates[f"{mname}.weight" if mname else "weight"] = 1.0 / fan_in
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in rates.items() if k in trainable}


def _last_linear_fan_in(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not last:
        raise ValueError("ntk_fluctuation: the model has no nn.Linear to read the width from; pass `width=`")
    return int(last[-1].in_features)
