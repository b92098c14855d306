"""A small convolutional ResNet for 1x8x8 digit images (or any small image)."""

from __future__ import annotations

import torch
from torch import nn

from example_modules.base import ExampleModule, InitName, LossName, OptimizerName, init_weights
from example_modules.mlp import ResBlock, branch_scale


class ConvBranch(nn.Module):
    """Pre-activation residual branch: ``conv(relu(bn(conv(relu(bn(h))))))`` (BatchNorm optional)."""

    def __init__(self, channels: int, batch_norm: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=not batch_norm)
        self.act = nn.ReLU()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.bn2(self.conv1(self.act(self.bn1(h))))))


class ResNet(ExampleModule):
    """Conv ResNet: stem conv, ``depth`` residual blocks of ``width`` channels, global pooling, readout.

    Layer names: ``stem``, ``blocks.i.branch.conv1``/``conv2`` (and ``bn1``/``bn2``), ``readout``;
    :attr:`residual_branches` lists ``blocks.i.branch``.

    Args:
        in_channels: image channels (1 for digits).
        num_classes: output dimension.
        width: channels of every block.
        depth: number of residual blocks.
        branch_multiplier: residual branch scale (``None`` = ``1/sqrt(depth)``).
        batch_norm: BatchNorm inside the branches.

    Example:
        >>> ResNet(width=8, depth=2)(torch.randn(3, 1, 8, 8)).shape
        torch.Size([3, 10])
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        depth: int = 2,
        branch_multiplier: float | None = 1.0,
        batch_norm: bool = True,
        init: InitName = "default",
        loss: LossName = "cross_entropy",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if width < 1 or depth < 1:
            raise ValueError(f"ResNet: width and depth must be >= 1, got width={width}, depth={depth}")
        self._configure_training(loss, optimizer, lr, momentum, weight_decay)
        beta = branch_scale(branch_multiplier, depth)
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1)
        self.blocks = nn.ModuleList(ResBlock(ConvBranch(width, batch_norm), beta) for _ in range(depth))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.readout = nn.Linear(width, num_classes)
        init_weights(self, init, "relu")

    @property
    def residual_branches(self) -> list[str]:
        """Qualified names of the residual branches."""
        return [f"blocks.{i}.branch" for i in range(len(self.blocks))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:  # flat 8x8 digits
            side = int(round(x.shape[1] ** 0.5))
            x = x.reshape(x.shape[0], 1, side, side)
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        return self.readout(self.pool(h).flatten(1))
