"""Shared plumbing of the example LightningModules: loss, metrics, optimizer, activations, init.

Every example module saves its hyper-parameters (so :class:`~lightning_align.Parametrization` can
re-instantiate it at a base width/depth), takes ``width`` and ``depth``, returns a mean loss from
``training_step`` and builds one optimizer from ``optimizer``/``lr``/``momentum``/``weight_decay``. A
LightningCLI ``optimizer:`` section replaces ``configure_optimizers`` as usual.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F

Activation = Literal["relu", "tanh", "gelu", "linear"]
OptimizerName = Literal["sgd", "adam", "adamw"]
LossName = Literal["cross_entropy", "mse"]
InitName = Literal["default", "kaiming", "normal", "orthogonal", "xavier"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "linear": nn.Identity}


def make_activation(name: str) -> nn.Module:
    """``nn.Module`` for an activation name (``relu``, ``tanh``, ``gelu``, ``linear``)."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def init_weights(module: nn.Module, scheme: str, activation: str = "relu") -> None:
    """Re-initialise the Linear/Conv weights of ``module`` (biases to zero unless ``default``).

    ``kaiming``: He normal for the activation's gain; ``normal``: N(0, 1/fan_in);
    ``orthogonal``: orthogonal with the activation's gain; ``xavier``: Glorot normal; ``default``: PyTorch's.
    """
    if scheme == "default":
        return
    gain = nn.init.calculate_gain("linear" if activation in ("linear", "gelu") else activation)
    for m in module.modules():
        if not isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        fan_in = m.weight[0].numel()
        if scheme == "kaiming":
            nn.init.normal_(m.weight, std=gain / math.sqrt(fan_in))
        elif scheme == "normal":
            nn.init.normal_(m.weight, std=1 / math.sqrt(fan_in))
        elif scheme == "orthogonal":
            nn.init.orthogonal_(m.weight, gain=gain)
        elif scheme == "xavier":
            nn.init.xavier_normal_(m.weight, gain=gain)
        else:
            raise ValueError(f"unknown init {scheme!r}; choose default, kaiming, normal, orthogonal or xavier")
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class ExampleModule(pl.LightningModule):
    """Classification/regression step logic and the optimizer shared by every example module.

    Subclasses build layers in ``__init__`` and define ``forward``; set ``self.loss_name``.
    """

    loss_name: str = "cross_entropy"

    def _configure_training(
        self, loss: str, optimizer: str, lr: float, momentum: float, weight_decay: float
    ) -> None:
        if loss not in ("cross_entropy", "mse"):
            raise ValueError(f"{type(self).__name__}: loss must be 'cross_entropy' or 'mse', got {loss!r}")
        if optimizer not in ("sgd", "adam", "adamw"):
            raise ValueError(f"{type(self).__name__}: optimizer must be 'sgd', 'adam' or 'adamw', got {optimizer!r}")
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.loss_name = loss

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss: cross-entropy on class indices, or MSE (on one-hot targets for class indices)."""
        if outputs.ndim == 3:  # sequence models: (batch, time, vocab)
            outputs, targets = outputs.flatten(0, 1), targets.flatten()
        if self.loss_name == "cross_entropy":
            return F.cross_entropy(outputs, targets)
        if not targets.is_floating_point():
            targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return F.mse_loss(outputs, targets.reshape(outputs.shape))

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        self.log(f"{stage}/loss", loss, prog_bar=stage == "train")
        if not y.is_floating_point():
            pred = out.argmax(dim=-1)
            self.log(f"{stage}/acc", (pred == y).float().mean(), prog_bar=stage == "val")
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        if hp.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        cls = torch.optim.Adam if hp.optimizer == "adam" else torch.optim.AdamW
        return cls(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
