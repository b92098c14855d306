"""Top Hessian eigenvalue: lightning_align (Lanczos) side by side with PyHessian (power iteration).

Same model, same batch, same process, single thread. For each method and tolerance: wall time
(median of repeats), Hessian-vector products and the relative error of λ_max against a tight
reference (scipy ARPACK ``eigsh`` in float64 on the same operator, tol 1e-12). Then the warm-started
case met inside training: after a few SGD steps, Lanczos started from the previous top vector
against PyHessian, which always starts cold.

PyHessian is not a project dependency: ``pip install pyhessian`` into the environment to run this.
It runs on CPU with ``cuda=False``; it puts the model in eval mode and leaves ``create_graph``
gradients in ``.grad`` (a model without BatchNorm/dropout is used, and ``.grad`` is cleared after).

Run::

    OMP_NUM_THREADS=1 python benchmarks/sharpness.py [--width 256] [--depth 3] [--batch 512] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from torch import nn

from lightning_align.measure.hessian import hessian_eigs
from lightning_align.measure.operators import hessian_operator

F = nn.functional


def digits_batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target, dtype=torch.long)
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
    return x[idx], y[idx]


def make_model(width: int, depth: int) -> nn.Module:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(64, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def reference_top(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """λ_max by ARPACK in float64 (independent of our Lanczos)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    m64 = make_like(model).double()
    b64 = (batch[0].double(), batch[1])
    with hessian_operator(m64, F.cross_entropy, b64, method="double_backward") as op:
        lin = LinearOperator((op.dim, op.dim), matvec=lambda v: op(torch.from_numpy(np.ascontiguousarray(v).ravel())).numpy(), dtype=np.float64)
        vals = eigsh(lin, k=1, which="LA", tol=1e-12, return_eigenvectors=False)
    return float(vals[0])


def make_like(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def pyhessian_top(model: nn.Module, batch, tol: float, seed: int = 0) -> tuple[float, int]:
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    was_training = model.training
    h = PyHessian(model, F.cross_entropy, data=batch, cuda=False)
    counter = {"n": 0}
    import sys

    ph_module = sys.modules["pyhessian.hessian"]  # the package re-exports the class under the module's name

    real = ph_module.hessian_vector_product

    def counting(*args, **kwargs):
        counter["n"] += 1
        return real(*args, **kwargs)

    ph_module.hessian_vector_product = counting
    try:
        values, _ = h.eigenvalues(maxIter=100, tol=tol, top_n=1)
    finally:
        ph_module.hessian_vector_product = real
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return float(values[0]), counter["n"]


def ours_top(model: nn.Module, batch, tol: float, init=None, seed: int = 0):
    res = hessian_eigs(model, F.cross_entropy, batch, k=1, tol=tol, max_matvecs=200, init=init,
                       generator=torch.Generator().manual_seed(seed))
    return float(res.values[0]), res.num_matvecs, res.vectors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=20, help="SGD steps between warm-started measurements")
    parser.add_argument("--rounds", type=int, default=5, help="warm-started measurements")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model = make_model(args.width, args.depth)
    batch = digits_batch(args.batch)
    # train a little so the spectrum is not that of the initialisation
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        F.cross_entropy(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    ref = reference_top(model, batch)
    print(f"model: tanh MLP width {args.width} depth {args.depth} ({n_params} params), batch {args.batch} digits, "
          f"torch {torch.__version__}, 1 thread")
    print(f"reference lambda_max (ARPACK float64, tol 1e-12): {ref:.8f}\n")

    print("COLD START (median of %d repeats)" % args.repeats)
    print(f"{'method':<28}{'time [s]':>10}{'HVPs':>7}{'rel. error':>13}")
    rows = []
    for tol in (1e-3, 1e-4, 1e-5):
        t, (val, n) = timed(lambda: pyhessian_top(model, batch, tol), args.repeats)
        rows.append(("pyhessian", tol, t, n, abs(val - ref) / abs(ref)))
    for tol in (1e-1, 3e-2, 1e-2, 1e-3):
        t, (val, n, _) = timed(lambda: ours_top(model, batch, tol), args.repeats)
        rows.append(("lightning_align", tol, t, n, abs(val - ref) / abs(ref)))
    for name, tol, t, n, err in rows:
        print(f"{name + f' tol={tol:g}':<28}{t:>10.4f}{n:>7d}{err:>13.2e}")
    print("\nspeed-up at equal or better accuracy (fastest lightning_align setting whose error <= PyHessian's):")
    for name, tol, t, n, err in rows:
        if name != "pyhessian":
            continue
        ok = [r for r in rows if r[0] == "lightning_align" and r[4] <= err]
        if ok:
            best = min(ok, key=lambda r: r[2])
            print(f"  PyHessian tol={tol:g} (err {err:.1e}, {t:.4f} s) vs lightning_align tol={best[1]:g} "
                  f"(err {best[4]:.1e}, {best[2]:.4f} s): {t / best[2]:.2f}x faster")
        else:
            print(f"  PyHessian tol={tol:g} (err {err:.1e}): no lightning_align setting as accurate")

    print(f"\nWARM START inside training ({args.rounds} rounds of {args.train_steps} SGD steps, lr 0.1)")
    print(f"{'round':<7}{'ref':>12}{'PyH t [s]':>11}{'PyH HVPs':>9}{'PyH err':>10}"
          f"{'ours t [s]':>11}{'HVPs':>6}{'ours err':>10}{'speed-up':>10}")
    _, _, vectors = ours_top(model, batch, 1e-2)
    speedups = []
    for r in range(args.rounds):
        for _ in range(args.train_steps):
            opt.zero_grad()
            F.cross_entropy(model(batch[0]), batch[1]).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        ref_r = reference_top(model, batch)
        t_p, (v_p, n_p) = timed(lambda: pyhessian_top(model, batch, 1e-3, seed=r), args.repeats)
        t_o, (v_o, n_o, new_vectors) = timed(lambda: ours_top(model, batch, 1e-2, init=vectors, seed=r), args.repeats)
        vectors = new_vectors
        speedups.append(t_p / t_o)
        print(f"{r:<7}{ref_r:>12.6f}{t_p:>11.4f}{n_p:>9d}{abs(v_p - ref_r) / ref_r:>10.1e}"
              f"{t_o:>11.4f}{n_o:>6d}{abs(v_o - ref_r) / ref_r:>10.1e}{t_p / t_o:>9.2f}x")
    print(f"median warm speed-up vs PyHessian (tol 1e-3, cold by design): {statistics.median(speedups):.2f}x")


if __name__ == "__main__":
    main()
