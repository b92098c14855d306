"""Benchmark: empirical NTK by lightning_align vs the torch.func Jacobian-contraction recipe.

Run by hand (single thread keeps the comparison fair on a shared machine)::

    OMP_NUM_THREADS=1 python benchmarks/ntk.py [--repeats 5] [--n-large 8192] [--device cpu|cuda]

With ``--device cuda`` models and inputs live on the GPU and every timed region is bracketed by
``torch.cuda.synchronize()``; the method (warm-up, median of repeats) is the same.

Part 1, exact kernel: a width-256 ReLU MLP (3 hidden layers), 128 inputs, 10 outputs, full
``(n, n, c, c)`` and output-traced ``(n, n)`` kernels. The peer is the recipe of the PyTorch NTK
tutorial (``vmap(jacrev)`` per-sample Jacobians, then ``einsum('Naf,Mbf->NMab')``), measured side by
side in the same process; the table gives the median time of each, the speed-up and the max abs
difference of the two kernels (relative to the largest entry).

Part 3, cost in training-step equivalents: one NTKSpectrum measurement (kernel + eigvalsh, probe of
64, 10 classes) against one SGD step (forward, backward, update) at batch 64 on the same MLP.

Part 2, matrix-free: top-5 eigenvalues by Lanczos on ``J(Jᵀv)`` for a kernel too big to build
(``n·c`` rows, where the dense kernel alone would need the memory printed), against the exact
eigenvalues on a subset small enough to check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

from lightning_align.measure.ntk import empirical_ntk, ntk_spectrum


def mlp(width: int, depth: int, d_in: int, d_out: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


def recipe_ntk(model: nn.Module, x: torch.Tensor, traced: bool) -> torch.Tensor:
    """The PyTorch tutorial's Jacobian contraction (``intermediate_source/neural_tangent_kernels.py``)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def fnet_single(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(params, x)
    jac1 = [j.flatten(2) for j in jac1.values()]
    einsum_expr = "Naf,Maf->NM" if traced else "Naf,Mbf->NMab"
    return torch.stack([torch.einsum(einsum_expr, j1, j1) for j1 in jac1]).sum(0)


DEVICE = {"name": "cpu"}  # set from --device


def sync() -> None:
    """Wait for the GPU's queued work before a clock is read (nothing on CPU)."""
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def part_exact(repeats: int) -> None:
    torch.manual_seed(0)
    model = mlp(256, 3, 64, 10).to(DEVICE["name"])
    x = torch.randn(128, 64).to(DEVICE["name"])
    print("Part 1: exact kernel, MLP width 256 (3 hidden layers, P = %d), n = 128, c = 10" % sum(p.numel() for p in model.parameters()))
    print(f"{'kernel':<22}{'recipe s':>10}{'ours s':>10}{'speed-up':>10}{'max|diff|/max|K|':>18}")
    for traced in (False, True):
        with torch.no_grad():
            t_ref, k_ref = timed(lambda: recipe_ntk(model, x, traced), repeats)
        t_ours, k_ours = timed(lambda: empirical_ntk(model, x, trace_outputs=traced), repeats)
        rel = float((k_ours - k_ref).abs().max() / k_ref.abs().max())
        name = "traced (n, n)" if traced else "full (n, n, c, c)"
        print(f"{name:<22}{t_ref:>10.3f}{t_ours:>10.3f}{t_ref / t_ours:>9.1f}x{rel:>18.2e}")


def part_matrix_free(n: int) -> None:
    torch.manual_seed(0)
    model = mlp(256, 3, 64, 10).to(DEVICE["name"])
    x = torch.randn(n, 64).to(DEVICE["name"])
    size = n * 10
    print(f"\nPart 2: matrix-free top-5 eigenvalues, n = {n}, c = 10: kernel {size} x {size} "
          f"({size * size * 4 / 2**30:.1f} GiB in fp32 if built)")
    if DEVICE["name"] == "cuda":  # the same run once untimed: kernels, handles, allocator (CPU times stay cold)
        ntk_spectrum(model, x, k=5, solver="lanczos", tol=1e-4, max_matvecs=200, generator=torch.Generator().manual_seed(0))
    sync()
    t0 = time.perf_counter()
    res = ntk_spectrum(model, x, k=5, solver="lanczos", tol=1e-4, max_matvecs=200, generator=torch.Generator().manual_seed(0))
    sync()
    t_lanczos = time.perf_counter() - t0
    print(f"  lanczos: {t_lanczos:.2f} s, {res.num_matvecs} kernel-vector products, top-5 = {[round(v, 2) for v in res.values.tolist()]}")
    sub = x[:256]
    sync()
    t0 = time.perf_counter()
    exact = ntk_spectrum(model, sub, k=5, solver="exact").values
    sync()
    t_exact = time.perf_counter() - t0
    lanczos_sub = ntk_spectrum(model, sub, k=5, solver="lanczos", tol=1e-4, max_matvecs=200, generator=torch.Generator().manual_seed(0))
    rel = float(((lanczos_sub.values - exact).abs() / exact).max())
    print(f"  check on n = 256 (2560 x 2560): exact {t_exact:.2f} s; lanczos {lanczos_sub.num_matvecs} products, "
          f"max relative error of top-5 {rel:.1e}")


def part_step_equivalents(repeats: int) -> None:
    torch.manual_seed(0)
    model = mlp(128, 3, 64, 10).to(DEVICE["name"])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64).to(DEVICE["name"]), torch.randint(0, 10, (64,)).to(DEVICE["name"])

    def step() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    t_step, _ = timed(step, repeats * 10)
    print("\nPart 3: one measurement vs one SGD step (MLP width 128, depth 3, batch = probe = 64, c = 10)")
    for traced in (False, True):
        t_meas, _ = timed(lambda: ntk_spectrum(model, x, 10, traced, return_vectors=False), repeats)
        name = "traced (64 x 64)" if traced else "full (640 x 640)"
        print(f"  {name:<18} {t_meas * 1e3:8.1f} ms = {t_meas / t_step:6.1f} step-equivalents (step {t_step * 1e3:.2f} ms)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--n-large", type=int, default=8192)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    DEVICE["name"] = args.device
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread"
    print(f"torch {torch.__version__}, {where}")
    part_exact(args.repeats)
    part_matrix_free(args.n_large)
    part_step_equivalents(args.repeats)
