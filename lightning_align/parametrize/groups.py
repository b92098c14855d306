"""Optimizer side of a parametrization: the optimizer family, per-group factors, schedulers that follow.

Split from :mod:`~lightning_align.parametrize.apply`: these act on an optimizer's param groups only; the
grouping itself is :func:`~lightning_align.measure.optim.split_param_groups`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_align.measure.optim import follow_split, update_family
from lightning_align.parametrize.rules import ParamRule, Scale

_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def optimizer_family(optimizer: torch.optim.Optimizer, override: str = "auto") -> str:
    """``"adam"`` or ``"sgd"`` for an optimizer (its class, or ``override``), else a clear error.

    Adam-like: Adam, AdamW, Adamax, NAdam, RAdam, Adagrad, RMSprop and any class whose name contains
    "adam". SGD-like: SGD, ASGD (:func:`~lightning_align.measure.optim.update_family`).

    Example:
        >>> p = [torch.nn.Parameter(torch.zeros(1))]
        >>> optimizer_family(torch.optim.AdamW(p)), optimizer_family(torch.optim.SGD(p, lr=0.1))
        ('adam', 'sgd')
    """
    if override in ("adam", "sgd"):
        return override
    if override != "auto":
        raise ValueError(f"optimizer_family must be 'auto', 'adam' or 'sgd', got {override!r}")
    family = update_family(optimizer)
    if family is not None:
        return family
    raise ValueError(
        f"Parametrization: optimizer {type(optimizer).__name__} is not supported: μP learning-rate rules are "
        "defined for Adam-like (entry-wise normalised) and SGD-like optimizers. Use one of Adam, AdamW, Adamax, "
        "NAdam, RAdam, Adagrad, RMSprop, SGD, ASGD, or set `optimizer_family='adam'` / `'sgd'` if yours "
        "behaves like one of them."
    )


def as_float(x: Any) -> float:
    """A float from a float or a one-element tensor (param-group values may be tensors)."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def fmt_eps(eps: Any) -> str:
    """Adam ε (or a tuple of them, as Adafactor's) for a table."""
    if eps is None:
        return ""
    if isinstance(eps, (tuple, list)):
        return ", ".join(f"{as_float(e):.3g}" for e in eps)
    return f"{as_float(eps):.3g}"


def scale_value(value: Any, scale: Scale) -> Any:
    """``value * mul / div``, for a float or a tensor."""
    if isinstance(value, torch.Tensor):
        return value * scale.mul / scale.div
    return scale.apply(value)


def scale_group(group: dict[str, Any], rule: ParamRule) -> None:
    """Apply a rule's LR (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``), weight-decay and ε factors to a param group."""
    if not rule.lr.is_one:
        for k in _LR_KEYS:
            if k in group and group[k] is not None:
                group[k] = scale_value(group[k], rule.lr)
    if not rule.weight_decay.is_one and "weight_decay" in group:
        group["weight_decay"] = scale_value(group["weight_decay"], rule.weight_decay)
    if not rule.eps.is_one and isinstance(group.get("eps"), (float, int, torch.Tensor)):
        group["eps"] = scale_value(group["eps"], rule.eps)


def retarget_scheduler(scheduler: Any, mapping: Sequence[tuple[int, ParamRule]]) -> None:
    """Make a scheduler built before :meth:`Parametrized.rewrite_optimizer` follow the new groups.

    Per-group lists (``base_lrs``, ``_last_lr``, ``min_lrs``, ``max_lrs``, ``lr_lambdas``) are expanded to
    the new groups, LR-valued ones scaled by each group's LR factor (:func:`~lightning_align.measure.optim.follow_split`,
    which raises when a list does not hold one entry per old group). Chained/sequential schedulers are
    handled through their children. ``last_epoch`` and everything else are kept, so schedules stay
    relative (mup's "schedulers must scale group LRs relatively").

    Example::

        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)
        mapping = p.rewrite_optimizer_with_mapping(optimizer)  # new param groups
        retarget_scheduler(scheduler, mapping)
    """
    follow_split(scheduler, [gi for gi, _ in mapping], lambda i, lr: scale_value(lr, mapping[i][1].lr))
