"""``max_overhead`` under ModelParallelStrategy (FSDP2, 2 CPU processes, gloo): rank 0 decides for every rank.

Each rank gets its own fake clock (nothing is timed): on rank 0 every reading advances it by one unit, so after
the first scheduled measurement its tiny budget postpones every later one; on rank 1 the clock stands still, so
its own rule would measure at every step. Sharpness all-reduces inside every measurement, so ranks that decided
apart would hang (the launcher's timeout) or log different steps; with rank 0's decision broadcast both measure
at steps 0 and 1 only, and training is the same as without the callback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
from sharded_helpers import ShardedNet, fit_same_data, run_sharded, weights_digest

from lightning_align import Sharpness, schedules

pytestmark = pytest.mark.distributed


class Steps(pl.Callback):
    """Each rank's steps with a logged sharpness value, and the weights at the end."""

    def __init__(self, folder: str) -> None:
        self.folder, self.steps = folder, []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.callback_metrics.pop("sharpness/max_eig", None) is not None:
            self.steps.append(trainer.global_step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"steps": self.steps, "weights": weights_digest(pl_module)}
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit(folder: str, with_sharpness: bool) -> None:
    ticks = iter(range(10**9))
    schedules.clock = (lambda: float(next(ticks))) if os.environ["RANK"] == "0" else (lambda: 0.0)
    callbacks: list[pl.Callback] = [Steps(folder)]
    if with_sharpness:
        callbacks.insert(0, Sharpness(every_n_steps=1, max_overhead=1e-6, probe_size=32, tol=1e-3, max_matvecs=40))
    fit_same_data(ShardedNet, callbacks, True, 5)


def test_rank_zero_decides_which_measurements_are_postponed(tmp_path: Path) -> None:
    measured, plain = tmp_path / "measured", tmp_path / "plain"
    measured.mkdir(), plain.mkdir()
    run_sharded(fit, str(measured), True)
    run_sharded(fit, str(plain), False)
    r0, r1 = (json.loads((measured / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == [1]  # (step 0's value is logged before training: not seen here)
    assert r0["weights"] == json.loads((plain / "rank0.json").read_text())["weights"]
