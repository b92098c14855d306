"""Contracting per-sample Jacobian factors into kernel blocks (the structured-layer trick).

A structured layer's per-sample weight gradient is ``Σ_t g_t x_tᵀ``, so its kernel is an input Gram times an
output-gradient Gram (:func:`_add_dense`, :func:`_add_token_gram`), or, for long token sequences when a flop
count says so, the per-sample gradients formed and contracted as generic Jacobians (:func:`_add_generic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_align.measure.ntk.plan import _Layer, _Plan

#: Elements of the largest temporary of the token-Gram contraction (bounds memory for sequences).
_BLOCK_ELEMENTS = 1 << 24


@dataclass
class _Factors:
    """Per-sample factors of the Jacobian for a block of samples."""

    generic: dict[str, Tensor]  # name -> (b, c, P)
    inputs: dict[str, Tensor]  # layer -> (b, T, d_in)
    grads: dict[str, Tensor]  # layer -> (b, c, T, d_out)


def contract(plan: _Plan, fa: _Factors, fb: _Factors, traced: bool) -> Tensor:
    """Kernel block between two sets of samples: ``(na·c, nb·c)``, or ``(na, nb)`` traced."""
    na, nb, c = _rows(fa), _rows(fb), plan.c
    out = torch.zeros((na, nb) if traced else (na * c, nb * c), dtype=plan.dtype, device=plan.device)
    for name, ja in fa.generic.items():
        _add_generic(out, ja, fb.generic[name], plan.lr[name], traced)
    for name, layer in plan.layers.items():
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

