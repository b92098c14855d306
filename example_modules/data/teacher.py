"""Synthetic teacher/student data: targets from a fixed random network, optionally through a low-dimensional latent."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.data import Dataset

from example_modules.data.base import SplitDataModule, split_tensors


def teacher_network(in_features: int, out_features: int, width: int, depth: int, latent_dim: int | None, seed: int) -> nn.Module:
    """A random tanh teacher ``R^in -> R^out``; with ``latent_dim`` it factors through ``R^latent_dim``.

    With a latent, ``f* = g ∘ h`` where ``h`` is linear onto ``latent_dim`` dimensions: the task has inner
    dimension ``latent_dim`` (the setting of the bottleneck-structure paper).
    """
    gen = torch.Generator().manual_seed(seed)
    dims = [in_features] + ([latent_dim] if latent_dim else []) + [width] * depth + [out_features]
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        lin = nn.Linear(dims[i], dims[i + 1])
        with torch.no_grad():
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=gen) / dims[i] ** 0.5)
            lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=gen))
        layers.append(lin)
        is_latent = latent_dim and i == 0
        if i < len(dims) - 2 and not is_latent:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers).requires_grad_(False)


class TeacherDataModule(SplitDataModule):
    """Gaussian inputs labelled by a random teacher network (regression or classification).

    Args:
        in_features: input dimension.
        out_features: regression outputs, or number of classes for ``task="classification"``.
        task: ``regression`` (float targets of shape ``(n, out_features)``) or ``classification``
            (argmax of the teacher's outputs, long targets).
        latent_dim: if set, the teacher factors through a linear map onto this many dimensions.
        teacher_width, teacher_depth: the teacher's hidden width and number of hidden layers.
        n_samples: total samples (train + validation).
        noise: std of Gaussian label noise (regression).
        val_fraction, seed, batch_size, num_workers: split and loaders.

    Example:
        >>> dm = TeacherDataModule(in_features=8, out_features=2, n_samples=100, batch_size=10)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), tuple(y.shape)
        ((10, 8), (10, 2))
    """

    def __init__(
        self,
        in_features: int = 16,
        out_features: int = 1,
        task: Literal["regression", "classification"] = "regression",
        latent_dim: int | None = None,
        teacher_width: int = 64,
        teacher_depth: int = 2,
        n_samples: int = 2048,
        noise: float = 0.0,
        val_fraction: float = 0.2,
        seed: int = 0,
        batch_size: int = 64,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        if task not in ("regression", "classification"):
            raise ValueError(f"TeacherDataModule: task must be 'regression' or 'classification', got {task!r}")
        if task == "classification" and out_features < 2:
            raise ValueError("TeacherDataModule: classification needs out_features >= 2 classes")
        self.cfg = dict(self.hparams)

    def build(self) -> tuple[Dataset, Dataset]:
        c = self.cfg
        gen = torch.Generator().manual_seed(c["seed"])
        x = torch.randn(c["n_samples"], c["in_features"], generator=gen)
        teacher = teacher_network(
            c["in_features"], c["out_features"], c["teacher_width"], c["teacher_depth"], c["latent_dim"], c["seed"] + 1
        )
        out = teacher(x)
        if c["task"] == "classification":
            y = out.argmax(dim=1)
        else:
            y = out + c["noise"] * torch.randn(out.shape, generator=gen)
        return split_tensors(x, y, c["val_fraction"], c["seed"])
