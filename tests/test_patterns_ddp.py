"""DDP on a rank-sharded stream: every rank measures the same probe and the controls decide alike on every rank.

Each rank's ``IterableDataset`` yields its own samples (as a sharded stream does), so a probe drawn per rank
would differ; the probe is rank 0's first batch, broadcast (Sharpness, which shards its probe and all-reduces,
uses each rank's own first batch: its value is the mean over the ranks, the same on every rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
from helpers import measurement_suite
from test_suite_ddp import FAMILIES, LayerNormNet
from torch.utils.data import DataLoader, IterableDataset

from lightning_align import AlignSummary, FeatureSpeedControl


class RankStream(IterableDataset):
    """A stream whose samples depend on the rank reading it (each rank its own shard)."""

    def __iter__(self):
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        g = torch.Generator().manual_seed(100 + rank)
        for _ in range(64):
            yield torch.randn(8, generator=g), torch.randint(0, 3, (), generator=g)


class DumpEnd(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(FAMILIES)}
        values["weights"] = float(sum(p.double().abs().sum() for p in pl_module.parameters()))
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(values))


def _run(folder: Path) -> None:
    torch.manual_seed(0)
    control = FeatureSpeedControl(target_speed=0.05, every_n_steps=2, probe_size=16)
    trainer = pl.Trainer(
        strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=6, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*measurement_suite(), control, AlignSummary(table=False), DumpEnd(str(folder))],
    )
    trainer.fit(LayerNormNet(), DataLoader(RankStream(), batch_size=16))


@pytest.mark.distributed
def test_rank_sharded_stream_gives_identical_values_and_decisions_on_every_rank(tmp_path: Path) -> None:
    _run(tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert {k.split("/")[0] for k in r0} >= {"align", "sharpness", "ntk", "rank", "coord", "weights"}
    assert r0 == r1, f"ranks disagree on {[k for k in r0 if r0[k] != r1.get(k)]}"
