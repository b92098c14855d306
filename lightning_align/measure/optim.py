"""What an optimizer holds per parameter (pure PyTorch), for measurements in learning-rate units."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def learning_rates_by_parameter(optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer]) -> dict[int, float]:
    """``{id(parameter): lr of its param group}`` over one or several optimizers.

    Example:
        >>> w, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(1))
        >>> lrs = learning_rates_by_parameter(torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [b]}], lr=0.1))
        >>> lrs[id(w)], lrs[id(b)]
        (0.5, 0.1)
    """
    if isinstance(optimizers, torch.optim.Optimizer):
        optimizers = [optimizers]
    return {id(p): float(group["lr"]) for opt in optimizers for group in opt.param_groups for p in group["params"]}
