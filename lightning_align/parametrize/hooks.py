"""Forward multipliers of a parametrization, as hooks holding plain floats (they trace under ``torch.compile``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

INPUT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
"""Layers whose output ``input_mult`` can scale."""


class ScaleOutput:
    """Forward hook: multiply a module's output (or the first tensor of a tuple output) by a constant."""

    def __init__(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, torch.Tensor):
            return output * self.multiplier
        if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            return (output[0] * self.multiplier, *output[1:])
        raise TypeError(f"cannot scale the output of {type(module).__name__}: not a tensor")


class ScaleReadoutInput:
    """Forward pre-hook: ``x -> output_mult * x / width_mult`` on the first input (``MuReadout.forward``)."""

    def __init__(self, output_mult: float, width_mult: float) -> None:
        self.output_mult = output_mult
        self.width_mult = width_mult

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args:
            raise TypeError(
                f"Parametrization: the readout multiplier scales the first positional input of {type(module).__name__}, "
                "which was called with keyword arguments only; call it with its input as the first positional argument."
            )
        return (self.output_mult * args[0] / self.width_mult, *args[1:])


def require_layer(module: nn.Module, name: str, what: str, kinds: tuple[type[nn.Module], ...]) -> None:
    """A forward multiplier needs a layer of its own; a raw parameter inside a larger module has none."""
    if not isinstance(module, kinds):
        raise ValueError(
            f"Parametrization: cannot apply the {what} to {name!r}: it belongs to a {type(module).__name__}, "
            f"not a {'/'.join(k.__name__ for k in kinds)} layer whose output can be scaled. Keep the multiplier at "
            "1, or give the parameter another role with `role_overrides`."
        )
