"""Scaling tables of sp | ntk | mup | depth_mup | completep, relative to a base model.

Everything is expressed relative to the base width ``n0`` (``m = n/n0``, per tensor: mup's
``width_mult``) and base depth ``L0`` (``m_L = L/L0``), so at the base size every scheme equals SP.
Factors are kept as a multiplier and a divisor (:class:`Scale`) so that ``lr * mul / div`` reproduces
microsoft/mup's arithmetic (``lr /= width_mult``, ``lr *= width_mult``) bit for bit.

**Width (TP5 Table 8, exactly as mup 1.0.0's MuAdam / MuSGD):**

======== ================= ============== ==================== =====================
role     Adam LR           Adam WD        SGD LR               SGD WD
======== ================= ============== ==================== =====================
hidden   η / m             λ · m          η / (m_in / m_out)   λ · (m_in / m_out)
input    η                 λ              η · m                λ / m
output   η                 λ              η · m                λ / m
vector   η                 λ              η · m                λ / m
fixed    η                 λ              η                    λ
======== ================= ============== ==================== =====================

With ``decoupled_wd=True`` weight decay is not width-scaled (mup's later ``decoupled_wd`` flag).

**Depth (residual branches ``x + m_L^-α · F(x)``, parameters inside branches):**

- branch forward multiplier ``m_L^-α`` (α = ½ depth-μP [TP6], α = 1 CompleteP [Dey et al. 2505.01618]);
- Adam-like LR ``× m_L^(α-1)``: ``m_L^-½`` for depth-μP (TP6), 1 for CompleteP (its Table 1 gives
  ``η·m^-1·m_L^(α-1)`` for hidden weights and ``η·m_L^(α-1)`` for in-block biases and gains);
- Adam ε ``× m_L^-α`` on branch parameters, and ``× 1/m`` on hidden weights for CompleteP (Table 1). For
  depth-μP the ε factor is **our derivation** (ε must follow the gradient scale, which the branch
  multiplier sets), not stated in TP6;
- SGD-like LR ``× m_L^(2α-1)``: 1 for depth-μP (TP6), ``m_L`` for CompleteP — **our derivation** for
  CompleteP (the paper gives no SGD rule);
- weight decay: the width rule (CompleteP: hidden ``λ·m``, α-independent).

**NTK (our derivation, SP form):** the NTK parametrization ``W = w/√fan_in, w ~ N(0, 1)`` moved into SP
form with TP5 Lemma J.1 (multiplier × θ, init ÷ θ, SGD LR ÷ θ², Adam LR ÷ θ, θ = √fan_in): SP init, and
for tensors with an infinite fan-in (hidden and readout weights) SGD LR ``η / m_in`` and Adam LR
``η / √m_in``; everything else as SP.

**SP:** all factors 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightning_align.parametrize.roles import ParamInfo

Scheme = Literal["sp", "ntk", "mup", "depth_mup", "completep"]
SCHEMES: tuple[str, ...] = ("sp", "ntk", "mup", "depth_mup", "completep")
MUP_FAMILY: tuple[str, ...] = ("mup", "depth_mup", "completep")
OptimizerFamily = Literal["adam", "sgd"]


@dataclass(frozen=True)
class Scale:
    """A positive factor ``mul / div``; :meth:`apply` computes ``x * mul / div`` (mup's operation order).

    Example:
        >>> Scale(div=4.0).apply(0.1) == 0.1 / 4.0
        True
    """

    mul: float = 1.0
    div: float = 1.0

    def apply(self, x: float) -> float:
        """``x * mul / div``."""
        return x * self.mul / self.div

    @property
    def value(self) -> float:
        """The factor as one float."""
        return self.mul / self.div

    @property
    def is_one(self) -> bool:
        """Whether it leaves every value unchanged."""
        return self.mul == 1 and self.div == 1


@dataclass(frozen=True)
class ParamRule:
    """Per-parameter optimizer factors: learning rate, weight decay and Adam ε.

    Example:
        >>> ParamRule().lr
        Scale(mul=1.0, div=1.0)
    """

    lr: Scale = Scale()
    weight_decay: Scale = Scale()
    eps: Scale = Scale()

    @property
    def key(self) -> tuple[float, ...]:
        """Hashable key: parameters with equal keys share a param group."""
        return (self.lr.mul, self.lr.div, self.weight_decay.mul, self.weight_decay.div, self.eps.mul, self.eps.div)


def depth_alpha(scheme: str) -> float | None:
    """The depth exponent α of a scheme (½ depth-μP, 1 CompleteP), ``None`` for width-only schemes."""
    return {"depth_mup": 0.5, "completep": 1.0}.get(scheme)


def branch_multiplier(scheme: str, depth_mult: float) -> float:
    """Forward multiplier ``m_L^-α`` of each residual branch (1 for width-only schemes).

    Example:
        >>> branch_multiplier("depth_mup", 4.0), branch_multiplier("completep", 4.0), branch_multiplier("mup", 4.0)
        (0.5, 0.25, 1.0)
    """
    alpha = depth_alpha(scheme)
    return 1.0 if alpha is None or depth_mult == 1 else depth_mult ** (-alpha)


def readout_multiplier_divisor(scheme: str, info: ParamInfo) -> float:
    """The readout input is multiplied by ``output_mult`` and divided by this (``m`` under μP, as MuReadout)."""
    return info.width_mult if scheme in MUP_FAMILY else 1


def optimizer_rule(
    info: ParamInfo,
    scheme: str,
    family: str,
    depth_mult: float = 1.0,
    decoupled_wd: bool = False,
) -> ParamRule:
    """Learning-rate, weight-decay and ε factors of one parameter.

    Args:
        info: the parameter's role and shapes.
        scheme: one of :data:`SCHEMES`.
        family: ``"adam"`` (entry-wise normalised updates: Adam, AdamW, RMSprop, Adagrad, ...) or ``"sgd"``.
        depth_mult: ``L / L0`` (only used by depth schemes, for parameters inside residual branches).
        decoupled_wd: do not width-scale weight decay (for truly decoupled weight decay).

    Example:
        >>> from lightning_align.parametrize.roles import ParamInfo
        >>> hidden = ParamInfo("h.weight", "h", (256, 256), (64, 64), (True, True), "hidden")
        >>> optimizer_rule(hidden, "mup", "adam").lr.apply(1e-3) == 1e-3 / 4.0
        True
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    if family not in ("adam", "sgd"):
        raise ValueError(f"unknown optimizer family {family!r}; choose 'adam' or 'sgd'")
    if scheme == "sp":
        return ParamRule()
    if scheme == "ntk":
        return _ntk_rule(info, family)
    lr, wd = _mup_width_rule(info, family)
    if decoupled_wd:
        wd = Scale()
    eps = Scale(div=info.width_mult) if (scheme == "completep" and family == "adam" and info.role == "hidden") else Scale()
    alpha = depth_alpha(scheme)
    if alpha is not None and info.in_branch and depth_mult != 1:
        if family == "adam":
            lr = Scale(lr.mul * depth_mult ** (alpha - 1), lr.div)
            eps = Scale(eps.mul * depth_mult ** (-alpha), eps.div)
        else:
            lr = Scale(lr.mul * depth_mult ** (2 * alpha - 1), lr.div)
    return ParamRule(lr=lr, weight_decay=wd, eps=eps)


def _mup_width_rule(info: ParamInfo, family: str) -> tuple[Scale, Scale]:
    """(lr, wd) of MuAdam / MuSGD (mup 1.0.0, ``mup/optim.py``)."""
    if family == "adam":
        if info.role == "hidden":
            return Scale(div=info.width_mult), Scale(mul=info.width_mult)
        return Scale(), Scale()
    if info.role == "hidden":
        ratio = info.fanin_fanout_ratio
        return Scale(div=ratio), Scale(mul=ratio)
    if info.role == "fixed":
        return Scale(), Scale()
    return Scale(mul=info.width_mult), Scale(div=info.width_mult)


def _ntk_rule(info: ParamInfo, family: str) -> ParamRule:
    fanin = info.fanin_mult
    if len(info.shape) < 2 or fanin == 1:
        return ParamRule()
    return ParamRule(lr=Scale(div=fanin if family == "sgd" else fanin**0.5))
