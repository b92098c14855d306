"""FSDP2 on one GPU with NCCL: the sharded code paths (DTensor parameters, NCCL collectives, finite-difference
Hessian-vector products, Lanczos on slices) against the plain run on the same GPU, and the cost of the
finite-difference route against exact products there.

The lent machine has one GPU, so ``ModelParallelStrategy(data_parallel_size=1)``: every parameter is a DTensor
over a one-rank mesh and every collective runs through NCCL, but nothing is split. Multi-GPU NCCL is untested.

Run (on a machine with a GPU; ``tests/`` on the path for the test network)::

    PYTHONPATH=.:tests python benchmarks/gpu_sharded_check.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from sharded_helpers import DumpMetrics, ShardedNet, dataset, read  # tests/sharded_helpers.py
from torch.utils.data import DataLoader, DistributedSampler

from lightning_align import CoordCheck, EffectiveLR, RankMonitor, Sharpness


def fit(folder: str, sharded: bool, callbacks: bool) -> None:
    pl.seed_everything(0, verbose=False)
    cbs = [Sharpness(every_n_steps=2, probe_size=32, k=2, tol=1e-5, max_matvecs=120), EffectiveLR(every_n_steps=2, probe_size=32),
           CoordCheck(every_n_steps=2, probe_size=32), RankMonitor(every_n_steps=2, probe_size=32)] if callbacks else []
    strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1) if sharded else "auto"
    trainer = pl.Trainer(accelerator="cuda", devices=1, strategy=strategy, max_steps=4, logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[*cbs, DumpMetrics(folder, ("sharpness/", "elr/", "rank/", "coord/"))])
    data = dataset()
    # ModelParallelStrategy gives the loader a DistributedSampler(shuffle=True, seed=0): the plain run takes the same one
    sampler = None if sharded else DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer.fit(ShardedNet(), DataLoader(data, batch_size=32, sampler=sampler))


def main() -> None:
    if len(sys.argv) > 1:  # a child: one fit
        fit(sys.argv[1], sys.argv[2] == "sharded", sys.argv[3] == "with")
        return
    print(torch.cuda.get_device_name(0), "torch", torch.__version__)
    root = Path(tempfile.mkdtemp())
    runs = {}
    for name, args in {"plain": ("plain", "with"), "sharded": ("sharded", "with"), "sharded_bare": ("sharded", "without")}.items():
        folder = root / name
        folder.mkdir()
        t0 = time.perf_counter()
        rc = os.system(f"{sys.executable} {__file__} {folder} {args[0]} {args[1]} > {folder}/log.txt 2>&1")
        print(name, "exit", rc, f"{time.perf_counter() - t0:.1f} s")
        if rc:
            print(open(folder / "log.txt").read()[-3000:])
            continue
        runs[name] = read(folder, 0, 1)
    plain, sharded = runs["plain"], runs["sharded"]
    worst = 0.0
    for when in ("start", "end"):
        for key, value in plain[when].items():
            other = sharded[when][key]
            rel = abs(other - value) / max(abs(value), 1e-12)
            if not key.endswith(("matvecs", "residual")):
                worst = max(worst, rel)
            if rel > 1e-5 or key.startswith("sharpness/"):
                print(f"{when} {key}: plain {value:.7g} sharded {other:.7g} rel {rel:.1e}")
    print("weights: plain vs sharded, largest relative difference of the digests:",
          f"{max(abs(a - b) / max(abs(a), 1e-12) for a, b in zip(plain['weights'], sharded['weights'])):.1e}")
    print("fd_consistency", sharded["end"].get("sharpness/fd_consistency"))
    print("largest relative difference (excluding matvecs/residuals):", f"{worst:.1e}")
    print("sharded weights bit-identical with and without the callbacks:", sharded["weights"] == runs["sharded_bare"]["weights"])
    print(json.dumps({"worst": worst}))


if __name__ == "__main__":
    main()
