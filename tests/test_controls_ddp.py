"""The control callbacks under DDP (``ddp_spawn``, 2 CPU processes, gloo): Parametrization("mup"),
FeatureSpeedControl and ELRWarmup together on a normalized MLP.

They change training, so more must hold than for the measurements: every rank takes the same decisions
(multipliers, warm-up factors, per-group learning rates) and ends with the same weights, and the run equals
a single-process run on the same global batches, at the end of training, not only at step 0.

Same global batches: Lightning always gives a training loader under DDP a ``DistributedSampler(shuffle=True,
seed=PL_GLOBAL_SEED)`` (even when the loader has ``shuffle=False``): one permutation per epoch, rank ``r``
taking its entries ``r, r+2, ...``. So per-rank batch ``B`` over 2 ranks sees the samples of batch ``2B`` of a
single process whose loader uses the same sampler with one replica, and DDP's mean of the rank means is
the mean over ``2B``. LayerNorm, not BatchNorm (batch statistics would differ between a shard and the batch).

The module and data here are also used by ``test_resume_controls.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import NetClassifier, ddp_order_loader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.callbacks.summary import AlignSummary
from lightning_align.callbacks.warmup import ELRWarmup
from lightning_align.logging import MemoryLogger

CONTROL_TAGS = ("align/control", "elr/warmup_factor")


class NormalizedMLP(NetClassifier):
    """``in -> [Linear -> LayerNorm -> ReLU] x 2 -> Linear``; tiny hidden init (weights and biases: they feed the
    LayerNorm and are scale-invariant together) and a large LR (so ELRWarmup warms up for a couple of steps), SGD
    with momentum and a per-step LR schedule."""

    def __init__(self, width: int = 32, in_features: int = 8, num_classes: int = 3, lr: float = 2.0, init_scale: float = 0.01) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Linear(in_features, width), nn.LayerNorm(width), nn.ReLU(),
            nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU(),
            nn.Linear(width, num_classes),
        )  # fmt: skip
        with torch.no_grad():
            for i in (0, 3):
                self.net[i].weight.mul_(init_scale)
                self.net[i].bias.mul_(init_scale)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.95)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def loader(batch_size: int, n: int = 64, seed: int = 0, ddp_order: bool = False) -> DataLoader:
    """Unshuffled, or with ``ddp_order`` in the order Lightning's DDP sampler gives the 2 ranks together."""
    g = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))
    if ddp_order:
        return ddp_order_loader(data, batch_size)
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def controls() -> list[pl.Callback]:
    """μP (base width 16, the model is width 32) + per-layer feature-speed control + critical-LR warm-up."""
    return [
        Parametrization("mup", base_width=16, verbose=False),
        FeatureSpeedControl(target_speed=0.05, every_n_steps=1, probe_size=32),
        ELRWarmup(every_n_steps=1, probe_size=32),
    ]


class Dump(pl.Callback):
    """At the end of training, writes this rank's logged control values, decisions, LRs and weights."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fsc = next(c for c in trainer.callbacks if isinstance(c, FeatureSpeedControl))
        warm = next(c for c in trainer.callbacks if isinstance(c, ELRWarmup))
        (logger,) = trainer.loggers
        rows = [[s, {k: v for k, v in m.items() if k.startswith(CONTROL_TAGS)}] for s, m in logger.rows]
        state = {
            "rows": [r for r in rows if r[1]],
            "multipliers": fsc.multipliers,
            "warmup": [warm.done, warm.factor],
            "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
            "step": trainer.global_step,
        }
        name = f"rank{trainer.global_rank}_of{trainer.world_size}"
        Path(self.folder, f"{name}.json").write_text(json.dumps(state))
        torch.save({k: v.detach().clone() for k, v in pl_module.state_dict().items()}, Path(self.folder, f"{name}.pt"))


def run(folder: Path, devices: int, max_steps: int = 6) -> None:
    pl.seed_everything(0, verbose=False)  # PL_GLOBAL_SEED=0: the seed of Lightning's DistributedSampler
    trainer = pl.Trainer(
        strategy="ddp_spawn" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_steps=max_steps,
        logger=MemoryLogger(), enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
        num_sanity_val_steps=0, callbacks=[*controls(), AlignSummary(table=False), Dump(str(folder))],
    )  # fmt: skip
    trainer.fit(NormalizedMLP(), loader(batch_size=16 // devices, ddp_order=devices == 1))


def by_step(rows: list) -> dict[tuple[int, str], float]:
    return {(step, tag): value for step, metrics in rows for tag, value in metrics.items()}


@pytest.mark.distributed
def test_controls_agree_across_ranks_and_with_one_process_at_the_end(tmp_path: Path) -> None:
    run(tmp_path, devices=2)
    run(tmp_path, devices=1)
    read = lambda name: json.loads((tmp_path / f"{name}.json").read_text())  # noqa: E731
    r0, r1, single = read("rank0_of2"), read("rank1_of2"), read("rank0_of1")
    assert r0["step"] == r1["step"] == single["step"] == 6
    # Every rank takes the same decisions, logs the same values and ends with the same weights, bit for bit.
    assert r0 == r1
    w0, w1, ws = (torch.load(tmp_path / f"{n}.pt") for n in ("rank0_of2", "rank1_of2", "rank0_of1"))
    for k in w0:
        assert torch.equal(w0[k], w1[k]), f"ranks end with different {k}"
    # The controls did act: multipliers moved, the warm-up scaled the LR and finished within the run.
    ddp = by_step(r0["rows"])
    factors = [v for (s, t), v in sorted(ddp.items()) if t == "elr/warmup_factor"]
    assert factors[0] < 0.9 and factors[-1] == 1.0 and r0["warmup"][0] is True
    assert all(abs(m - 1) > 0.05 for m in r0["multipliers"])
    # DDP equals one process on the same global batches, at every logged step up to the end.
    expected = by_step(single["rows"])
    assert ddp.keys() == expected.keys()
    assert max(s for s, _ in ddp) == 6
    for key, value in expected.items():
        assert ddp[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    assert r0["multipliers"] == pytest.approx(single["multipliers"], rel=1e-4)
    assert r0["lrs"] == pytest.approx(single["lrs"], rel=1e-4)
    for k in ws:
        torch.testing.assert_close(w0[k], ws[k], rtol=1e-4, atol=1e-5, msg=lambda m: f"{k}: {m}")
