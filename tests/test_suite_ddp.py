"""Every measurement callback under DDP (``ddp_spawn``, 2 CPU processes, gloo): it runs, does not hang,
every rank logs the same values, and they equal a single-process run on the same data, before training and
at its end.

Same data: under DDP Lightning gives the training loader a ``DistributedSampler(shuffle=True, seed=0)``;
rank ``r`` takes entries ``r, r+2, ...`` of one permutation per epoch. The single process uses the same
sampler with one replica and twice the batch, so each of its batches is the union of the ranks' batches
and its mean loss is DDP's mean of the rank means.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import NetClassifier, ddp_order_loader, measurement_suite, tiny_loader
from torch import nn
from torch.utils.data import DataLoader

from lightning_align import AlignSummary

FAMILIES = ("align/", "sharpness/", "ntk/", "elr/", "rank/", "coord/")


class LayerNormNet(NetClassifier):
    """No BatchNorm (batch statistics would differ between a rank's shard and the whole batch)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Dump(pl.Callback):
    """Writes each rank's measured values at the start (after the step-0 measurements) and at the end."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def _dump(self, trainer: pl.Trainer, when: str) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(FAMILIES)}
        Path(self.folder, f"{when}_rank{trainer.global_rank}_of{trainer.world_size}.json").write_text(json.dumps(values))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, "start")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._dump(trainer, "end")


def run(folder: Path, devices: int) -> None:
    torch.manual_seed(0)
    trainer = pl.Trainer(
        strategy="ddp_spawn" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_steps=4,
        logger=False, enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[*measurement_suite(tol=1e-6, max_matvecs=120), AlignSummary(table=False), Dump(str(folder))],
    )
    data = tiny_loader(n=64).dataset
    if devices > 1:  # Lightning replaces the sampler by a DistributedSampler over the ranks
        loader = DataLoader(data, batch_size=16)
    else:
        loader = ddp_order_loader(data, batch_size=32)
    trainer.fit(LayerNormNet(), loader)


@pytest.mark.distributed
def test_every_callback_agrees_across_ranks_and_with_one_process(tmp_path: Path) -> None:
    run(tmp_path, devices=2)
    run(tmp_path, devices=1)
    read = lambda name: json.loads((tmp_path / name).read_text())  # noqa: E731
    for when in ("start", "end"):
        r0, r1 = read(f"{when}_rank0_of2.json"), read(f"{when}_rank1_of2.json")
        assert r0 == r1, f"{when}: ranks disagree on {[k for k in r0 if r0[k] != r1.get(k)]}"
    ddp, single = read("start_rank0_of2.json"), read("start_rank0_of1.json")
    assert {k.split("/")[0] for k in ddp} >= {"align", "sharpness", "ntk", "rank", "coord"}
    assert ddp.keys() == single.keys()
    for key, value in single.items():
        assert ddp[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    ddp_end, single_end = read("end_rank0_of2.json"), read("end_rank0_of1.json")
    assert {k.split("/")[0] for k in ddp_end} >= {"align", "sharpness", "ntk", "elr", "rank", "coord"}
    assert ddp_end.keys() == single_end.keys()
    for key, value in single_end.items():  # 4 training steps later: only float rounding of the reductions differs
        assert ddp_end[key] == pytest.approx(value, rel=1e-3, abs=1e-5), key
