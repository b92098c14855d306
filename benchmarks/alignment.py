"""Cost of one FeatureAlignment measurement, side by side with its peers, in the same process.

Compared per model (CPU, fp32, one probe batch):

- ``train step``: one forward + backward + ``optimizer.step()`` (the unit of training cost);
- ``feature_speed``: :func:`lightning_align.measure.feature_speed` for every Linear/Conv/attention output
  (one forward+backward for ``b`` and the gradients, one forward-mode jvp pass for every ``δf``);
- ``naive FD``: the do-it-yourself peer: forward+backward at ``θ`` for ``b``, then one more forward at
  ``θ + Δθ`` and ``δf ≈ f(θ+Δθ) − f(θ)`` (not first order, no loss decomposition per layer).

Run by hand: ``OMP_NUM_THREADS=1 python benchmarks/alignment.py`` (add ``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call

from example_modules import GPT, MLP, ResMLP
from lightning_align.measure.modules import select_modules
from lightning_align.measure.alignment import feature_speed
from lightning_align.measure.modules import captured_outputs


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def cases(quick: bool) -> list[tuple[str, nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    n = 128 if quick else 512
    xs, ys = torch.randn(n, 64, generator=g), torch.randint(0, 10, (n,), generator=g)
    tok = torch.randint(0, 256, (16 if quick else 32, 64), generator=g)
    return [
        ("MLP w256 d8", MLP(width=256, depth=8), (xs, ys)),
        ("ResMLP w256 d8", ResMLP(width=256, depth=8, branch_multiplier=None), (xs, ys)),
        ("GPT w64 d2 T64", GPT(width=64, depth=2, block_size=64), (tok, torch.roll(tok, -1, 1))),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"{'model':<16} {'layers':>6} {'train step ms':>14} {'feature_speed ms':>17} {'naive FD ms':>12} {'fs/step':>8} {'fs/FD':>6}")
    for name, model, batch in cases(args.quick):
        x, y = batch
        mods = select_modules(model, None, "features", owner="benchmark")
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        params = dict(model.named_parameters())

        def train_step() -> None:
            opt.zero_grad(set_to_none=True)
            model.loss(model(x), y).backward()
            opt.step()

        def ours() -> None:
            feature_speed(model, model.loss, batch, mods, lr=1e-3)

        def naive() -> None:
            with captured_outputs(mods) as feats:
                loss = model.loss(model(x), y)
            fs = [feats[n] for n in mods]
            grads = torch.autograd.grad(loss, fs + list(params.values()), allow_unused=True)
            moved = {
                n: (p.detach() - 1e-3 * g) if g is not None else p.detach()
                for (n, p), g in zip(params.items(), grads[len(fs) :])
            }
            with torch.no_grad(), captured_outputs(mods) as after:
                functional_call(model, moved, (x,))
            for n, f, b in zip(mods, fs, grads[: len(fs)]):
                df = after[n] - f.detach()
                _ = float(-(b * df).sum() / (b.norm() * df.norm())), float(df.norm() / f.norm())

        t_step, t_ours, t_naive = (timed(f, args.repeats) for f in (train_step, ours, naive))
        print(
            f"{name:<16} {len(mods):>6} {1e3 * t_step:>14.1f} {1e3 * t_ours:>17.1f} {1e3 * t_naive:>12.1f} "
            f"{t_ours / t_step:>8.2f} {t_ours / t_naive:>6.2f}"
        )


if __name__ == "__main__":
    main()
