"""Run a function in 2 CPU processes (gloo) as Lightning's ModelParallelStrategy (FSDP2) sees them, with a timeout.

The processes are started here (torch.multiprocessing, spawn) with the environment Lightning reads
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), so the Trainer joins them
instead of launching its own; a run that hangs is killed after ``timeout`` seconds and fails the test.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from helpers import NetClassifier

from lightning_align.measure.sharded import is_sharded

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., None], port: int, args: tuple[Any, ...]) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    fn(*args)
    _leave_together()


def _leave_together() -> None:
    """Wait for every rank, then close the process group: without it the rank hosting the store (rank 0) could exit
    while another rank's gloo threads still reach it, and that process aborts (a rare SIGABRT seen in CI)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def run_sharded(fn: Callable[..., None], *args: Any, timeout: int = 240) -> None:
    """``fn(*args)`` in each of 2 processes; raises if one fails, or if they are not done after ``timeout`` waits of
    at most a second each (a hang)."""
    context = mp.start_processes(_entry, args=(fn, _free_port(), args), nprocs=WORLD, join=False, start_method="spawn")
    try:
        for _ in range(timeout):
            if context.join(timeout=1):
                return
        raise TimeoutError(f"the {WORLD}-process sharded run did not finish within about {timeout} s (a hang)")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()


class ShardedNet(NetClassifier):
    """A LayerNorm MLP that ``fully_shard``s each Linear and itself under ModelParallelStrategy (and is a plain
    module in one process). Odd widths make the ranks' slices uneven."""

    def __init__(self, lr: float = 0.1, optimizer: str = "sgd", width: int = 15, lazy: bool = False, relu: bool = False) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.optimizer, self.width, self.relu = lr, optimizer, width, relu
        self.net = None if lazy else self._layers()

    def _layers(self) -> nn.Sequential:
        w = self.width
        act = (nn.ReLU(), nn.ReLU()) if self.relu else (nn.Tanh(), nn.GELU())
        return nn.Sequential(nn.Linear(8, w), nn.LayerNorm(w), act[0], nn.Linear(w, w), act[1], nn.Linear(w, 3))

    def configure_model(self) -> None:
        if self.net is None:  # ``lazy``: the layers are created here (as for models too large for one device)
            self.net = self._layers()
        if self.device_mesh is None:
            return
        mesh = self.device_mesh["data_parallel"]
        for m in self.net:
            if isinstance(m, nn.Linear):
                fully_shard(m, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def dataset(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def weights_digest(module: nn.Module) -> list[float]:
    """Sum and sum of squares of every parameter's whole tensor (gathered when sharded), in float64."""
    out = []
    for p in module.parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        t = t.detach().double()
        out += [float(t.sum()), float(t.square().sum())]
    return out


def orthogonality(module: nn.Module) -> float:
    """Largest ``|off-diagonal| / mean diagonal`` of ``W Wᵀ`` (the smaller side) over the whole 2-D weights: ~1e-7
    for orthogonal matrices, ~0.1-1 for a default init."""
    worst = 0.0
    for p in module.parameters():
        if p.ndim != 2:
            continue
        w = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().double()
        g = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        off = g - torch.diag(torch.diagonal(g))
        worst = max(worst, float(off.abs().max() / torch.diagonal(g).mean()))
    return worst


class DumpMetrics(pl.Callback):
    """Each rank's logged values (``prefixes``) after the step-0 measurement and at the end, and a weights digest."""

    def __init__(self, folder: str, prefixes: tuple[str, ...]) -> None:
        self.folder, self.prefixes = folder, prefixes
        self.start: dict[str, float] = {}

    def _values(self, trainer: pl.Trainer) -> dict[str, float]:
        return {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefixes)}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start = self._values(trainer)
        self.orthogonality = orthogonality(pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lrs = sorted((g["lr"], sum(p.numel() for p in g["params"])) for o in trainer.optimizers for g in o.param_groups)
        record = {"start": self.start, "end": self._values(trainer), "weights": weights_digest(pl_module), "lrs": lrs,
                  "orthogonality": self.orthogonality}
        Path(self.folder, f"rank{trainer.global_rank}_of{trainer.world_size}.json").write_text(json.dumps(record))


class SaveAt(pl.Callback):
    """A checkpoint after optimizer step ``step`` (its end of epoch: the resumed run sees the same batches)."""

    def __init__(self, path: str, step: int) -> None:
        self.path, self.step = path, step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)  # every rank: a collective under ModelParallelStrategy


class StepMetrics(pl.Callback):
    """Each rank's logged values after every optimizer step (and before the first), and the weights at the end.
    Put it after the callbacks it records."""

    def __init__(self, folder: str, prefixes: tuple[str, ...]) -> None:
        self.folder, self.prefixes = folder, prefixes
        self.steps: dict[str, dict[str, float]] = {}

    def _record(self, trainer: pl.Trainer) -> None:
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(self.prefixes)}
        if trainer.world_size > 1:  # parameters left gathered by a measurement (FSDP2: each should be its slice)
            values["gathered"] = float(sum(not is_sharded(p) for p in trainer.lightning_module.parameters()))
        self.steps[str(trainer.global_step)] = values
        trainer.callback_metrics.clear()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self._record(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"steps": self.steps, "weights": weights_digest(pl_module)}
        Path(self.folder, f"rank{trainer.global_rank}_of{trainer.world_size}.json").write_text(json.dumps(record))


def fit_same_data(make_module: Callable[[], pl.LightningModule], callbacks: list[pl.Callback], sharded: bool,
                  max_steps: int, ckpt_path: str | None = None) -> None:
    """Fit a module built after seeding on :func:`dataset`: sharded over 2 ranks (ModelParallelStrategy, batches of
    16 per rank) or in one process on the same global batches (the DistributedSampler Lightning gives the sharded
    run, with one replica and batches of 32)."""
    pl.seed_everything(0, verbose=False)
    torch.set_num_threads(1)
    common: dict[str, Any] = dict(
        accelerator="cpu", max_steps=max_steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    data = dataset()
    if sharded:
        trainer = pl.Trainer(strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1), devices=2, **common)
        loader = DataLoader(data, batch_size=16)
    else:
        trainer = pl.Trainer(devices=1, **common)
        loader = DataLoader(data, batch_size=32, sampler=DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0))
    trainer.fit(make_module(), loader, ckpt_path=ckpt_path)


def read(folder: Path, rank: int, world: int) -> dict[str, Any]:
    return json.loads((folder / f"rank{rank}_of{world}.json").read_text())
