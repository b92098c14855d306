"""Shared test helpers: a tiny model with BatchNorm and dropout, a seeded fit, and a state comparison.

Used by every callback's "training is bit-identical with and without the callback" test, so each
test states only what differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from lightning_align import CoordCheck, EffectiveLR, FeatureAlignment, NTKSpectrum, RankMonitor, Sharpness
from lightning_align.logging import MemoryLogger  # noqa: F401  (re-exported for the tests)


class NetClassifier(pl.LightningModule):
    """A classifier around ``self.net`` (built by the subclass): forward through it, cross-entropy training loss.
    Subclasses add ``configure_optimizers``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)


class TinyClassifier(pl.LightningModule):
    """Linear-BatchNorm-ReLU-Dropout-Linear classifier; logs its loss like a real module."""

    def __init__(self, in_features: int = 8, width: int = 16, num_classes: int = 3, optimizer: str = "adam", lr: float = 1e-2) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, width),
            nn.BatchNorm1d(width),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(width, width),
            nn.LayerNorm(width),
            nn.Tanh(),
            nn.Linear(width, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def tiny_loader(n: int = 64, in_features: int = 8, num_classes: int = 3, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True)


def ddp_order_loader(data: Dataset, batch_size: int) -> DataLoader:
    """One process seeing the global batches of a DDP run: under DDP Lightning gives the training loader a
    ``DistributedSampler(shuffle=True, seed=PL_GLOBAL_SEED)`` (even with ``shuffle=False``), rank ``r`` taking
    entries ``r, r+R, ...`` of one permutation per epoch; the same sampler with one replica and ``R`` times the
    per-rank batch gives, batch for batch, the union of the ranks' batches (seed 0: ``seed_everything(0)`` or none)."""
    return DataLoader(data, batch_size=batch_size, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0))


def fit(
    callbacks: Sequence[Callback] = (),
    module: pl.LightningModule | Callable[[], pl.LightningModule] | None = None,
    loader: DataLoader | None = None,
    max_steps: int = 6,
    seed: int = 0,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[pl.LightningModule, pl.Trainer]:
    """Seeded fit on CPU with no logger, progress bar or checkpoints (unless given).

    ``module`` may be a factory (e.g. a class): it is then built after seeding, so two runs start from
    the same weights. A module instance is used as is.
    """
    pl.seed_everything(seed, verbose=False)
    if module is None:
        module = TinyClassifier()
    elif not isinstance(module, pl.LightningModule):
        module = module()
    loader = loader if loader is not None else tiny_loader()
    kwargs: dict[str, Any] = dict(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(callbacks=list(callbacks), **kwargs)
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module, trainer


def assert_same_training_state(a: tuple[pl.LightningModule, pl.Trainer], b: tuple[pl.LightningModule, pl.Trainer]) -> None:
    """Weights, buffers (BatchNorm statistics) and optimizer state are bit-identical."""
    (ma, ta), (mb, tb) = a, b
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), f"{k} differs"
    for oa, ob in zip(ta.optimizers, tb.optimizers):
        for (ka, va), (kb, vb) in zip(oa.state_dict()["state"].items(), ob.state_dict()["state"].items()):
            assert ka == kb
            for name in va:
                assert torch.equal(torch.as_tensor(va[name]), torch.as_tensor(vb[name])), f"optimizer state {ka}.{name} differs"
    assert ta.global_step == tb.global_step



def measurement_suite(every_n_steps: int = 2, jacobian_points: int = 2, **sharpness: Any) -> list[Callback]:
    """Every measurement callback at once, with small probes (``sharpness`` overrides Sharpness arguments;
    ``jacobian_points=0`` for models on token inputs)."""
    return [
        FeatureAlignment(every_n_steps=every_n_steps, probe_size=32),
        Sharpness(every_n_steps=every_n_steps, probe_size=32, **{"k": 2, **sharpness}),
        NTKSpectrum(every_n_steps=every_n_steps, probe_size=8, k=4),
        EffectiveLR(every_n_steps=1, probe_size=32),
        RankMonitor(every_n_steps=every_n_steps, probe_size=32, jacobian_points=jacobian_points),
        CoordCheck(every_n_steps=every_n_steps, probe_size=32),
    ]
