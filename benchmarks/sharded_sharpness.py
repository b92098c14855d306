"""Sharded Sharpness (FSDP2, 2 CPU processes, gloo) side by side with the one-process estimate.

What ``Sharpness`` runs in each case, on the same model and global batch:

- ``one process, exact``: Lanczos on double-backward Hessian-vector products (the default route);
- ``one process, finite differences``: the sharded route's products (central differences of two gradients)
  in one process, to separate the cost of the route from the cost of sharding;
- ``sharded (2 ranks)``: FSDP2 ``fully_shard`` on every Linear and the root, each rank half of the batch
  (FSDP averages the gradients), Lanczos on each rank's slice of the vectors with one all-reduce per
  Gram-Schmidt pass.

Rank 0 also runs the one-process rows, while rank 1 waits at a barrier: the rows are
interleaved (one of each per round, ``--repeats`` rounds, minimum time), one thread per process. The sharded
row uses two processes (two cores) where the others use one. Reported: top eigenvalue, its relative
difference from the exact row, Hessian-vector products per estimate (cold start, the loss gradient as start
vector as in Sharpness) and seconds per estimate.

Run::

    python benchmarks/sharded_sharpness.py [--model mlp|conv|gpt] [--tol 1e-3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(__file__))
from sharpness import LOSS, build  # noqa: E402  (benchmarks/sharpness.py: the same models and batches)

from lightning_align.measure.lanczos import lanczos_eigs  # noqa: E402
from lightning_align.measure.operators import hessian_operator  # noqa: E402
from lightning_align.measure.sharded import finite_difference_hessian, shard_layout  # noqa: E402

WORLD = 2


def _estimate(op, tol: float, all_reduce=None) -> tuple[float, int]:
    res = lanczos_eigs(op, op.dim, k=1, tol=tol, max_matvecs=300, init=op.gradient,
                       generator=torch.Generator().manual_seed(0), all_reduce=all_reduce)
    return float(res.values[0]), res.num_matvecs


def exact(model: nn.Module, batch, loss, tol: float) -> tuple[float, int]:
    with hessian_operator(model, loss, batch, method="double_backward") as op:
        return _estimate(op, tol)


def finite_differences(model: nn.Module, batch, loss, tol: float, layout=None) -> tuple[float, int]:
    params = [p for p in model.parameters() if p.requires_grad]
    with finite_difference_hessian(lambda: loss(model(batch[0]), batch[1]), params, layout) as op:
        return _estimate(op, tol, op.all_reduce)


def shard(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)) and m is not model:
            fully_shard(m)
    fully_shard(model)
    return model


def rank_main(rank: int, args: argparse.Namespace, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    model, batch = build(args.model, args.width, args.depth, args.batch)
    loss = LOSS[args.model]
    sharded = shard(copy.deepcopy(model))
    layout = shard_layout([p for p in sharded.parameters() if p.requires_grad], "benchmark")
    local_batch = tuple(t[rank::WORLD] for t in batch)  # what Sharpness's shard_probe gives each rank
    rows: dict[str, list[tuple[float, float, int]]] = {}

    def record(name: str, fn) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        value, products = fn()
        seconds = time.perf_counter() - t0
        dist.barrier()
        rows.setdefault(name, []).append((seconds, value, products))

    for _ in range(args.repeats):
        if rank == 0:
            record("one process, exact", lambda: exact(model, batch, loss, args.tol))
            record("one process, finite differences", lambda: finite_differences(model, batch, loss, args.tol))
        else:
            dist.barrier(), dist.barrier(), dist.barrier(), dist.barrier()
        record(f"sharded ({WORLD} ranks)", lambda: finite_differences(sharded, local_batch, loss, args.tol, layout))
    if rank == 0:
        reference = rows["one process, exact"][-1][1]
        print(f"model={args.model} tol={args.tol} repeats={args.repeats} torch={torch.__version__} (one thread per process)")
        print("| route | λmax | rel. diff. from exact | HVPs per estimate | s per estimate (min) | s per HVP |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, runs in rows.items():
            best = min(r[0] for r in runs)
            value, products = runs[-1][1], runs[-1][2]
            print(f"| {name} | {value:.6g} | {abs(value - reference) / abs(reference):.1e} | {products} | {best:.3f} | "
                  f"{best / products:.4f} |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mlp", choices=["mlp", "conv", "gpt"])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(rank_main, args=(args, port), nprocs=WORLD, join=False, start_method="spawn")
    while not ctx.join(timeout=600):
        pass


if __name__ == "__main__":
    main()
