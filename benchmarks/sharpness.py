"""Top Hessian eigenvalue: lightning_align (Lanczos) side by side with PyHessian (power iteration).

Same model, same batch, same process, single thread. For each method and tolerance: wall time
(minimum over interleaved repeats), Hessian-vector products and the relative error of λ_max against a
tight reference (scipy ARPACK ``eigsh`` on a float64 copy of the model, tol 1e-12). Then the cost of
one Hessian-vector product each way (the graph prepared, minimum over repeats), and the warm-started
case met inside training: after a few SGD steps, Lanczos started from the previous top vector
against PyHessian, which always starts cold.

Models (``--model``): ``mlp``, a tanh MLP (``--width``, ``--depth``) on ``--batch`` digits; ``conv``, the
example ResNet (width 16, depth 2, BatchNorm in eval mode, as PyHessian puts it) on 256 digit images;
``gpt``, the example GPT (width 64, depth 2, 4 heads) on 16 windows of 64 bytes (attention on its math
backend for both, the fused kernels have no double backward). ``high precision`` rows are
lightning_align with float64 Lanczos vectors and a final Rayleigh-Ritz step with one float64 product
(``Sharpness(high_precision=True)``; the HVP count includes that product).

PyHessian and curvlinops are not project dependencies: ``pip install pyhessian curvlinops-for-pytorch``
into the environment to run this (``--curvlinops`` adds curvlinops' ``HessianLinearOperator`` with scipy's
``eigsh``). PyHessian runs with ``cuda=False`` on CPU and ``cuda=True`` with ``--device cuda``; it puts
the model in eval mode and leaves ``create_graph`` gradients in ``.grad`` (cleared after).

``--device cuda`` runs everything (model, batch, the three solvers, the float64 reference) on the GPU;
every timed region is then bracketed by ``torch.cuda.synchronize()`` so that the wall clock sees the
device's work, and the same interleaved repeats and minimum are taken.

Run::

    OMP_NUM_THREADS=1 python benchmarks/sharpness.py [--model mlp|conv|gpt] [--width 256] [--depth 3]
        [--batch 512] [--repeats 5] [--curvlinops] [--rounds 0] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time

import numpy as np
import torch
from torch import nn

from lightning_align.measure.autodiff import math_attention
from lightning_align.measure.hessian import hessian_eigs
from lightning_align.measure.operators import hessian_operator

F = nn.functional
LOSS = {"mlp": F.cross_entropy, "conv": F.cross_entropy}


def sequence_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


LOSS["gpt"] = sequence_loss


def build(name: str, width: int, depth: int, batch: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The benchmark's model and batch."""
    torch.manual_seed(0)
    if name == "mlp":
        return make_model(width, depth), digits_batch(batch)
    if name == "conv":
        from example_modules import ResNet

        x, y = digits_batch(256)
        return ResNet(width=16, depth=2).eval(), (x.reshape(-1, 1, 8, 8), y)
    if name == "gpt":
        from example_modules import GPT
        from example_modules.data.char_text import stdlib_corpus

        text = torch.tensor(list(stdlib_corpus(16 * 65 * 4)), dtype=torch.long)
        windows = text[: 16 * 65].reshape(16, 65)
        return GPT(width=64, depth=2, heads=4, block_size=64).eval(), (windows[:, :-1], windows[:, 1:])
    raise KeyError(name)


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


def reference_top(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], loss=F.cross_entropy) -> float:
    """λ_max by ARPACK in float64 (independent of our Lanczos)."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    m64 = make_like(model).double()
    b64 = (batch[0].double() if batch[0].is_floating_point() else batch[0], batch[1])
    with math_attention(), hessian_operator(m64, loss, b64, method="double_backward") as op:
        device = next(m64.parameters()).device

        def matvec(v: np.ndarray) -> np.ndarray:
            return op(torch.from_numpy(np.ascontiguousarray(v).ravel()).to(device)).cpu().numpy()

        lin = LinearOperator((op.dim, op.dim), matvec=matvec, dtype=np.float64)
        vals = eigsh(lin, k=1, which="LA", tol=1e-12, return_eigenvectors=False)
    return float(vals[0])


def make_like(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def sync() -> None:
    """Wait for the GPU's queued work (timing only; nothing when CUDA is unused)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), out


def interleaved(fns: dict[str, object], repeats: int) -> dict[str, tuple[float, object]]:
    """Each function once per round, rounds repeated: the minimum time of each and its last output."""
    best: dict[str, float] = {}
    outs: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            outs[name] = fn()
            sync()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    return {name: (best[name], outs[name]) for name in fns}


def pyhessian_top(model: nn.Module, batch, tol: float, seed: int = 0, loss=F.cross_entropy) -> tuple[float, int]:
    from pyhessian import hessian as PyHessian

    torch.manual_seed(seed)
    was_training = model.training
    h = PyHessian(model, loss, data=batch, cuda=batch[0].is_cuda)
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


def ours_top(model: nn.Module, batch, tol: float, init=None, seed: int = 0, loss=F.cross_entropy, precise: bool = False):
    if not precise:
        res = hessian_eigs(model, loss, batch, k=1, tol=tol, max_matvecs=200, init=init,
                           generator=torch.Generator().manual_seed(seed))
        return float(res.values[0]), res.num_matvecs, res.vectors
    from lightning_align.measure.certified import certified_extremes
    from lightning_align.measure.hessian import float64_rayleigh_ritz

    with hessian_operator(model, loss, batch) as op:  # what Sharpness(high_precision=True) runs: certified, float64
        res = certified_extremes(
            op, op.dim, tol=tol, max_matvecs=200, generator=torch.Generator().manual_seed(seed), dtype=torch.float64,
            device=op.device, warm=init, cold=op.gradient if init is None else None,
            refine=lambda vectors: float64_rayleigh_ritz(model, loss, batch, vectors),
        )
    return float(res.top.values[0]), res.num_matvecs, res.top.vectors


def curvlinops_top(model: nn.Module, batch, tol: float, loss=F.cross_entropy) -> tuple[float, int]:
    """curvlinops' HessianLinearOperator with scipy's eigsh (ARPACK), products counted."""
    from curvlinops import HessianLinearOperator
    from scipy.sparse.linalg import eigsh

    class MeanLoss(nn.Module):  # curvlinops reads the loss module's `reduction`
        reduction = "mean"

        def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return loss(out, y)

    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, MeanLoss(), params, [batch], check_deterministic=False)
    scipy_op = op.to_scipy()
    counter = {"n": 0}
    real = scipy_op._matvec

    def counting(v):
        counter["n"] += 1
        return real(v)

    scipy_op._matvec = counting
    vals = eigsh(scipy_op, k=1, which="LA", tol=tol, return_eigenvectors=False, v0=np.ones(scipy_op.shape[0], dtype=scipy_op.dtype))
    return float(vals[0]), counter["n"]


def per_product(model: nn.Module, batch, loss, repeats: int, products: int = 10) -> dict[str, float]:
    """Seconds per Hessian-vector product, graph prepared: ours (double backward) and PyHessian's."""
    from pyhessian import hessian as PyHessian
    from pyhessian.utils import hessian_vector_product

    was_training = model.training
    h = PyHessian(model, loss, data=batch, cuda=batch[0].is_cuda)
    model.train(was_training)
    vs = [torch.randn(p.shape, device=p.device) for p in h.params]
    with hessian_operator(model, loss, batch) as op:
        flat = torch.cat([v.reshape(-1) for v in vs])
        timings = interleaved({
            "lightning_align": lambda: [op(flat) for _ in range(products)],
            "PyHessian": lambda: [hessian_vector_product(h.gradsH, h.params, vs) for _ in range(products)],
        }, repeats)
    model.zero_grad(set_to_none=True)
    return {name: t / products for name, (t, _) in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["mlp", "conv", "gpt"], default="mlp")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--curvlinops", action="store_true", help="add curvlinops + scipy eigsh rows")
    parser.add_argument("--train-steps", type=int, default=20, help="SGD steps between warm-started measurements")
    parser.add_argument("--rounds", type=int, default=5, help="warm-started measurements (0: none)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loss = LOSS[args.model]
    model, batch = build(args.model, args.width, args.depth, args.batch)
    model, batch = model.to(args.device), tuple(t.to(args.device) for t in batch)
    with contextlib.ExitStack() as stack:
        stack.enter_context(math_attention())
        run(args, model, batch, loss)


def run(args: argparse.Namespace, model: nn.Module, batch, loss) -> None:
    # train a little so the spectrum is not that of the initialisation
    opt = torch.optim.SGD(model.parameters(), lr=0.1 if args.model == "mlp" else 0.05)
    for _ in range(50):
        opt.zero_grad()
        loss(model(batch[0]), batch[1]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    n_params = sum(p.numel() for p in model.parameters())
    ref = reference_top(model, batch, loss)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU, 1 thread"
    print(f"model: {args.model} ({n_params} params), batch {tuple(batch[0].shape)}, torch {torch.__version__}, {where}")
    print(f"reference lambda_max (ARPACK on a float64 copy, tol 1e-12): {ref:.8f}\n")

    fns = {}
    for tol in (1e-3, 1e-4, 1e-5):
        fns[("PyHessian", tol)] = lambda tol=tol: pyhessian_top(model, batch, tol, loss=loss)
    if args.curvlinops:
        for tol in (1e-3, 1e-6):
            fns[("curvlinops + eigsh", tol)] = lambda tol=tol: curvlinops_top(model, batch, tol, loss)
    for tol in (1e-1, 3e-2, 1e-2, 1e-3):
        fns[("lightning_align", tol)] = lambda tol=tol: ours_top(model, batch, tol, loss=loss)[:2]
    for tol in (1e-4, 1e-5):
        fns[("high precision", tol)] = lambda tol=tol: ours_top(model, batch, tol, loss=loss, precise=True)[:2]
    results = interleaved(fns, args.repeats)
    print(f"COLD START (minimum of {args.repeats} interleaved repeats)")
    print(f"{'method':<32}{'time [s]':>10}{'HVPs':>7}{'rel. error':>13}")
    rows = []
    for (name, tol), (t, (val, n)) in results.items():
        rows.append((name, tol, t, n, abs(val - ref) / abs(ref)))
        print(f"{name + f' tol={tol:g}':<32}{t:>10.4f}{n:>7d}{rows[-1][4]:>13.2e}")
    print("\nspeed-up at equal or better accuracy (fastest lightning_align setting whose error <= the peer's):")
    for name, tol, t, n, err in rows:
        if name in ("lightning_align", "high precision"):
            continue
        ok = [r for r in rows if r[0] in ("lightning_align", "high precision") and r[4] <= err]
        if ok:
            best = min(ok, key=lambda r: r[2])
            print(f"  {name} tol={tol:g} (err {err:.1e}, {t:.4f} s) vs {best[0]} tol={best[1]:g} "
                  f"(err {best[4]:.1e}, {best[2]:.4f} s): {t / best[2]:.2f}x faster")
        else:
            print(f"  {name} tol={tol:g} (err {err:.1e}): no lightning_align setting as accurate")
    costs = per_product(model, batch, loss, args.repeats)
    print(f"\none Hessian-vector product (graph prepared, min of {args.repeats} x 10): lightning_align "
          f"{costs['lightning_align'] * 1e3:.2f} ms, PyHessian {costs['PyHessian'] * 1e3:.2f} ms "
          f"(ratio {costs['lightning_align'] / costs['PyHessian']:.3f})")
    if args.rounds:
        warm_rounds(args, model, batch, loss, opt)


def warm_rounds(args: argparse.Namespace, model: nn.Module, batch, loss, opt) -> None:
    print(f"\nWARM START inside training ({args.rounds} rounds of {args.train_steps} SGD steps)")
    print(f"{'round':<7}{'ref':>12}{'PyH t [s]':>11}{'PyH HVPs':>9}{'PyH err':>10}"
          f"{'ours t [s]':>11}{'HVPs':>6}{'ours err':>10}{'speed-up':>10}")
    _, _, vectors = ours_top(model, batch, 1e-2, loss=loss)
    speedups = []
    for r in range(args.rounds):
        for _ in range(args.train_steps):
            opt.zero_grad()
            loss(model(batch[0]), batch[1]).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        ref_r = reference_top(model, batch, loss)
        timings = interleaved({
            "p": lambda: pyhessian_top(model, batch, 1e-3, seed=r, loss=loss),
            "o": lambda: ours_top(model, batch, 1e-2, init=vectors, seed=r, loss=loss),
        }, args.repeats)
        (t_p, (v_p, n_p)), (t_o, (v_o, n_o, new_vectors)) = timings["p"], timings["o"]
        vectors = new_vectors
        speedups.append(t_p / t_o)
        print(f"{r:<7}{ref_r:>12.6f}{t_p:>11.4f}{n_p:>9d}{abs(v_p - ref_r) / ref_r:>10.1e}"
              f"{t_o:>11.4f}{n_o:>6d}{abs(v_o - ref_r) / ref_r:>10.1e}{t_p / t_o:>9.2f}x")
    print(f"median warm speed-up vs PyHessian (tol 1e-3, cold by design): {statistics.median(speedups):.2f}x")


if __name__ == "__main__":
    main()
