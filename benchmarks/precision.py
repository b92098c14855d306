"""Cost of fp32 probes on a bf16 model, side by side with the same probe on the fp32 model, in one process.

With ``precision="bf16-true"`` the probe context swaps every bfloat16 parameter/buffer for a float32 copy
and back (:func:`lightning_align.measure.state.upcast_floating`). This script times, on an MLP (BatchNorm,
``--width``, ``--depth``) and a probe batch of ``--probe`` samples:

- ``context``: entering and leaving :meth:`MeasurementCallback.probe_context` (nothing measured): the
  swap's own cost on the bf16 model against the fp32 model's context (where nothing is swapped);
- ``hessian``: a top-Hessian-eigenvalue measurement (``hessian_eigs``, fixed 20 Lanczos products) inside
  the context: the whole probe on the bf16 model (measured in fp32) against the same probe on the fp32 model.

Each figure is the minimum over ``--repeats`` alternating runs. Ratios near 1 mean fp32 probes of a bf16
model cost what probing an fp32 model costs.

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/precision.py [--width 1024] [--depth 4] [--probe 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable

import torch
from torch import nn

from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.measure.hessian import hessian_eigs


def mlp(width: int, depth: int, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def best(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--probe", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    torch.manual_seed(0)
    fp32 = mlp(args.width, args.depth)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    batch = (torch.randn(args.probe, args.width), torch.randint(0, 10, (args.probe,)))
    cb = MeasurementCallback()
    loss = nn.functional.cross_entropy

    def context(model: nn.Module) -> None:
        with cb.probe_context(model):
            pass

    def hessian(model: nn.Module) -> None:
        with cb.probe_context(model):
            hessian_eigs(model, loss, batch, k=1, tol=0.0, max_matvecs=20, generator=torch.Generator().manual_seed(0))

    n_params = sum(p.numel() for p in fp32.parameters())
    print(f"MLP width {args.width}, depth {args.depth} ({n_params / 1e6:.2f}M parameters), probe {args.probe}, "
          f"threads {torch.get_num_threads()}, min of {args.repeats}")
    for name, fn in (("context", context), ("hessian", hessian)):
        fn(fp32), fn(bf16)  # warm-up
        t32, t16 = [], []
        for _ in range(args.repeats):
            t32.append(best(lambda: fn(fp32), 1))
            t16.append(best(lambda: fn(bf16), 1))
        a, b = min(t32), min(t16)
        print(f"{name:8s} fp32 model {a * 1e3:9.2f} ms   bf16 model (fp32 probe) {b * 1e3:9.2f} ms   ratio {b / a:6.2f}")


if __name__ == "__main__":
    main()
