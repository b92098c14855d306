"""Real image data sets from a local folder: MNIST, FashionMNIST (torchvision) and CIFAR-10.

Nothing is downloaded unless ``download=True``. When the files are missing, the error says where it
looked and how to get them. MNIST/FashionMNIST are read by torchvision from their raw IDX files
(``<root>/MNIST/raw/train-images-idx3-ubyte`` ...). CIFAR-10 is read from the official "python
version" batches (``<root>/cifar-10-batches-py/data_batch_1`` ... ``test_batch``), without torchvision's
MD5 check, so converted or subset copies in the same format work too.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from example_modules.data.base import SplitDataModule

DatasetName = Literal["mnist", "fashion_mnist", "cifar10"]

_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_STATS = {"mnist": (0.1307, 0.3081), "fashion_mnist": (0.2860, 0.3530), "cifar10": (0.4734, 0.2516)}


def _mnist_like(name: str, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision import datasets

    cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
    folder = root / cls.__name__ / "raw"
    if not download and not all((folder / f).exists() for f in _IDX_FILES):
        raise FileNotFoundError(
            f"{cls.__name__} not found: looked for {', '.join(_IDX_FILES)} in {folder}. Put the uncompressed IDX "
            f"files there (from the {cls.__name__} distribution), or set download: true on TorchvisionDataModule "
            "if this machine has internet."
        )
    ds = cls(str(root), train=train, download=download)
    return ds.data.unsqueeze(1).float() / 255.0, ds.targets.long()


def _cifar10(root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    folder = root / "cifar-10-batches-py"
    files = _CIFAR_TRAIN if train else ("test_batch",)
    if download and not all((folder / f).exists() for f in files):
        from torchvision import datasets

        datasets.CIFAR10(str(root), train=train, download=True)
    missing = [f for f in files if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 not found: missing {', '.join(missing)} in {folder}. Extract cifar-10-python.tar.gz into {root} "
            "(it creates cifar-10-batches-py/), or set download: true on TorchvisionDataModule if this machine has internet."
        )
    images, labels = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
    x = torch.from_numpy(np.concatenate(images)).float() / 255.0
    return x, torch.tensor(labels, dtype=torch.long)


def load_image_dataset(name: str, root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, c, h, w)`` in [0, 1] and labels of a local MNIST, FashionMNIST or CIFAR-10 copy."""
    root = Path(root).expanduser()
    if name in ("mnist", "fashion_mnist"):
        return _mnist_like(name, root, train, download)
    if name == "cifar10":
        return _cifar10(root, train, download)
    raise ValueError(f"unknown data set {name!r}; choose 'mnist', 'fashion_mnist' or 'cifar10'")


class TorchvisionDataModule(SplitDataModule):
    """MNIST, FashionMNIST or CIFAR-10 from a local folder (train split for training, test split for validation).

    Args:
        name: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        root: folder that holds the data set (see the module docstring for the layout).
        download: download when missing (needs internet).
        flatten: serve flat vectors instead of images (for MLPs).
        max_train_samples: use only the first this many training samples (``None``: all).
        batch_size, num_workers: loaders.

    Example::

        data:
          class_path: example_modules.TorchvisionDataModule
          init_args: {name: mnist, root: ~/data, flatten: true}
    """

    def __init__(
        self,
        name: DatasetName = "mnist",
        root: str = "data",
        download: bool = False,
        flatten: bool = False,
        max_train_samples: int | None = None,
        batch_size: int = 128,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        if name not in _CIFAR_STATS:
            raise ValueError(f"TorchvisionDataModule: unknown name {name!r}; choose mnist, fashion_mnist or cifar10")
        self.name, self.root, self.download = name, root, download
        self.flatten, self.max_train_samples = flatten, max_train_samples

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = _CIFAR_STATS[self.name]
        x = (x - mean) / std
        return x.flatten(1) if self.flatten else x

    def build(self) -> tuple[Dataset, Dataset]:
        xt, yt = load_image_dataset(self.name, self.root, train=True, download=self.download)
        xv, yv = load_image_dataset(self.name, self.root, train=False, download=self.download)
        if self.max_train_samples is not None:
            xt, yt = xt[: self.max_train_samples], yt[: self.max_train_samples]
        return TensorDataset(self._prepare(xt), yt), TensorDataset(self._prepare(xv), yv)
