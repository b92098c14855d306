"""Sharpness under DDP (2 CPU processes, gloo): every rank logs the same value, equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import NetClassifier, tiny_loader
from torch import nn

from lightning_align.callbacks.sharpness import Sharpness
from lightning_align.measure.hessian import hessian_extremes


class NoNorm(NetClassifier):
    """No BatchNorm: the sharded probe's mean HVP equals the full probe's HVP exactly."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Dump(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("sharpness/")}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


def test_ddp_ranks_agree_with_one_process(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = NoNorm()
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    cb = Sharpness(every_n_steps=1000, probe_size=32, k=2, min_eig=True, tol=1e-6, max_matvecs=120)
    trainer = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[cb, Dump(str(tmp_path))],
    )
    loader = tiny_loader(n=64)
    trainer.fit(module, loader)
    r0 = json.loads((tmp_path / "rank0.json").read_text())
    r1 = json.loads((tmp_path / "rank1.json").read_text())
    assert r0 == r1 and "sharpness/max_eig" in r0
    # one process on the whole probe (the same 32 samples the two ranks split), at the initial weights
    reference = NoNorm()
    reference.load_state_dict(initial)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))[:32]
    x = torch.stack([loader.dataset[i][0] for i in order.tolist()])
    y = torch.stack([loader.dataset[i][1] for i in order.tolist()])
    top, bottom = hessian_extremes(reference, nn.functional.cross_entropy, (x, y), k_top=2, tol=1e-8, max_matvecs=200)
    scale = abs(float(top.values[0]))
    assert r0["sharpness/max_eig"] == pytest.approx(float(top.values[0]), abs=1e-4 * scale)
    assert r0["sharpness/eig_2"] == pytest.approx(float(top.values[1]), abs=1e-4 * scale)
    assert r0["sharpness/min_eig"] == pytest.approx(float(bottom.values[0]), abs=1e-4 * scale)
