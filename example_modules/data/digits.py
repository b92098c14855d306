"""scikit-learn's bundled 8x8 handwritten digits: the embedded default data set (no download)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from example_modules.data.base import SplitDataModule, split_tensors


class DigitsDataModule(SplitDataModule):
    """1,797 8x8 digit images from ``sklearn.datasets.load_digits``, standardised, 10 classes.

    Args:
        batch_size: training and validation batch size.
        as_images: ``(1, 8, 8)`` images instead of 64-dimensional vectors.
        val_fraction: fraction held out for validation (seeded split).
        seed: split seed.
        num_workers: DataLoader workers.

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y.dtype
        ((32, 64), torch.int64)
    """

    def __init__(
        self, batch_size: int = 64, as_images: bool = False, val_fraction: float = 0.2, seed: int = 0, num_workers: int = 0
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        self.as_images = as_images
        self.val_fraction = val_fraction
        self.seed = seed

    def build(self) -> tuple[Dataset, Dataset]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32)
        x = (x - x.mean()) / x.std()
        if self.as_images:
            x = x.reshape(-1, 1, 8, 8)
        y = torch.tensor(data.target, dtype=torch.long)
        return split_tensors(x, y, self.val_fraction, self.seed)
