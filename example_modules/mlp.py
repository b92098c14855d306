"""Fully connected example modules: a plain MLP and a residual MLP (ResMLP)."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from example_modules.base import Activation, ExampleModule, InitName, LossName, OptimizerName, init_weights, make_activation

NormName = Literal["batch", "layer"]


def _norm(kind: str | None, width: int) -> nn.Module:
    if kind is None:
        return nn.Identity()
    if kind == "batch":
        return nn.BatchNorm1d(width)
    if kind == "layer":
        return nn.LayerNorm(width)
    raise ValueError(f"unknown norm {kind!r}; choose None, 'batch' or 'layer'")


class MLP(ExampleModule):
    """Multi-layer perceptron: ``depth`` hidden layers of ``width`` units, then a linear readout.

    Layer names: ``layers.0`` (input -> width), ``layers.1`` ... ``layers.{depth-1}`` (width -> width),
    ``norms.i`` (with ``norm``), ``readout`` (width -> outputs). Hidden pre-activations are the outputs
    of ``layers.i`` (or ``norms.i``).

    Args:
        in_features: input dimension (64 for the 8x8 digits).
        num_classes: output dimension.
        width: hidden width.
        depth: number of hidden layers (>= 1).
        activation: ``relu``, ``tanh``, ``gelu`` or ``linear``.
        norm: ``None``, ``"batch"`` (BatchNorm1d after each hidden linear) or ``"layer"``.
        init: weight init (see :func:`example_modules.base.init_weights`).
        bias: biases in linear layers.
        dropout: dropout probability after each hidden activation.
        loss: ``cross_entropy`` or ``mse``.
        optimizer, lr, momentum, weight_decay: the optimizer.

    Example:
        >>> MLP(width=32, depth=2)(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 3,
        activation: Activation = "relu",
        norm: NormName | None = None,
        init: InitName = "default",
        bias: bool = True,
        dropout: float = 0.0,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if width < 1 or depth < 1:
            raise ValueError(f"MLP: width and depth must be >= 1, got width={width}, depth={depth}")
        self._configure_training(loss, optimizer, lr, momentum, weight_decay)
        dims = [in_features] + [width] * depth
        self.layers = nn.ModuleList(nn.Linear(dims[i], dims[i + 1], bias=bias) for i in range(depth))
        self.norms = nn.ModuleList(_norm(norm, width) for _ in range(depth)) if norm else None
        self.act = make_activation(activation)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.readout = nn.Linear(width, num_classes, bias=bias)
        init_weights(self, init, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if self.norms is not None:
                h = self.norms[i](h)
            h = self.drop(self.act(h))
        return self.readout(h)


class ResidualBranch(nn.Module):
    """``branch(h) = W · act(norm(h))``: the residual branch of a ResMLP block."""

    def __init__(self, width: int, activation: str, norm: str | None, bias: bool) -> None:
        super().__init__()
        self.norm = _norm(norm, width)
        self.act = make_activation(activation)
        self.linear = nn.Linear(width, width, bias=bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(self.act(self.norm(h)))


class ResBlock(nn.Module):
    """``h + multiplier · branch(h)``."""

    def __init__(self, branch: nn.Module, multiplier: float) -> None:
        super().__init__()
        self.branch = branch
        self.multiplier = multiplier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.multiplier * self.branch(h)


def branch_scale(branch_multiplier: float | None, depth: int) -> float:
    """The residual branch multiplier: as given, or ``1/sqrt(depth)`` for ``None``."""
    return 1.0 / math.sqrt(depth) if branch_multiplier is None else float(branch_multiplier)


class ResMLP(ExampleModule):
    """Residual MLP: ``h_0 = embed(x)``, ``h_{l+1} = h_l + β·W_l act(norm(h_l))``, ``out = readout(h_L)``.

    The branch scale ``β`` (``branch_multiplier``; ``None`` = ``1/sqrt(depth)``) decides whether features
    keep moving at large depth (Chizat & Netrapalli: only ``1/sqrt(depth)`` keeps backward-feature alignment).

    Layer names: ``embed``, ``blocks.i.branch.linear``, ``readout``; :attr:`residual_branches` lists
    ``blocks.i.branch`` for depth scaling by :class:`~lightning_align.Parametrization`.

    Example:
        >>> ResMLP(width=32, depth=4, branch_multiplier=None)(torch.randn(5, 64)).shape
        torch.Size([5, 10])
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        width: int = 128,
        depth: int = 4,
        branch_multiplier: float | None = 1.0,
        activation: Activation = "relu",
        norm: NormName | None = None,
        init: InitName = "default",
        bias: bool = True,
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if width < 1 or depth < 1:
            raise ValueError(f"ResMLP: width and depth must be >= 1, got width={width}, depth={depth}")
        self._configure_training(loss, optimizer, lr, momentum, weight_decay)
        beta = branch_scale(branch_multiplier, depth)
        self.embed = nn.Linear(in_features, width, bias=bias)
        self.blocks = nn.ModuleList(ResBlock(ResidualBranch(width, activation, norm, bias), beta) for _ in range(depth))
        self.readout = nn.Linear(width, num_classes, bias=bias)
        init_weights(self, init, activation)

    @property
    def residual_branches(self) -> list[str]:
        """Qualified names of the residual branches (outputs added to the residual stream)."""
        return [f"blocks.{i}.branch" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x.flatten(1))
        for block in self.blocks:
            h = block(h)
        return self.readout(h)
