"""Host-device synchronisations of one Sharpness estimate on a GPU, counted and located.

``torch.cuda.set_sync_debug_mode("warn")`` makes every synchronising CUDA call (``.item()``, ``.tolist()``,
``float(t)``, ``bool(t)``, a blocking copy to or from the host) emit a warning; each one is counted here with
the innermost ``lightning_align`` frame that caused it (file and line), so the per-product syncs of the
Lanczos loop show apart from the once-per-estimate ones. Counted:

* ``hessian_eigs`` (what ``Sharpness`` runs: the operator's set-up, then Lanczos), cold and warm-started,
  on the models of ``benchmarks/sharpness.py`` (``--models mlp conv gpt``);
* the ``Sharpness`` callback itself (its ``_run``: probe, operator, Lanczos, logging) at its defaults in a
  short Lightning fit of the quickstart MLP, cold at step 0 and warm at step ``--every``.

Also printed: the wall time of each estimate (synchronised) and its products, so the cost of the syncs can be
read against one product; the products the Lanczos loop made (``made``: one more than reported when a product
queued ahead of a stop was dropped); and, first, a plain matrix at three tolerances on the GPU and on the CPU
(values and products side by side, and the syncs of the GPU runs, which should not grow with the products).

The debug mode does not see ``torch.cuda.Event.synchronize``: the loop's reads that wait on an event while the
next product is already queued show only in the profiler's ``cudaEventSynchronize`` count (solver estimates). Needs CUDA (on CPU there is nothing to count; ``--device cpu`` only checks that the
script runs).

Run by hand on a GPU machine::

    python benchmarks/gpu_syncs.py [--models mlp conv gpt] [--every 5]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch


@contextlib.contextmanager
def counting_syncs(sites: Counter) -> Iterator[None]:
    """Count synchronising CUDA calls into ``sites[(file:line, code)]`` while inside (CUDA only)."""
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        yield
        return

    def record(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "synchronizing CUDA operation" not in str(message):
            return
        frames = traceback.extract_stack()[:-1]
        ours = [f for f in frames if "/lightning_align/" in f.filename and "/benchmarks/" not in f.filename]
        frame = ours[-1] if ours else frames[-1]
        path = Path(frame.filename).as_posix()
        name = path[path.rindex("lightning_align/"):] if "lightning_align/" in path else Path(path).name
        sites[(f"{name}:{frame.lineno}", (frame.line or "").strip())] += 1

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        saved = warnings.showwarning
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = saved


def profiled_syncs(fn: Callable[[], Any]) -> dict[str, int]:
    """A second count, independent of the debug mode: CUDA runtime calls that block the host, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    blocking = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")
    sync()
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync()
        counts: Counter = Counter(e.name for e in prof.events() if e.name in blocking)
    except Exception as err:  # the profiler is a second opinion only
        return {f"profiler failed: {type(err).__name__}: {err}"[:200]: 0}
    counts["cudaDeviceSynchronize"] -= 1  # the sync() closing the region
    return dict(counts)


def self_check() -> None:
    """One ``.item()`` must count as one sync, or the counts below mean nothing."""
    x = torch.ones(1, device="cuda")
    sites: Counter = Counter()
    with counting_syncs(sites):
        x.item()
    print(f"self-check: one .item() counted as {sum(sites.values())} sync(s); "
          f"profiler: {profiled_syncs(lambda: x.item())}")
    event, sites = torch.cuda.Event(), Counter()
    with counting_syncs(sites):
        event.record()
        event.synchronize()
    print(f"self-check: one Event.synchronize() counted as {sum(sites.values())} sync(s) by the debug mode")


@contextlib.contextmanager
def counting_products(made: list[int]) -> Iterator[None]:
    """Count the products the Lanczos loop makes (``lanczos._product``) into ``made[0]``."""
    from lightning_align.measure import lanczos

    plain = lanczos._product

    def counted(*args: Any) -> Any:
        made[0] += 1
        return plain(*args)

    lanczos._product = counted
    try:
        yield
    finally:
        lanczos._product = plain


def matrix(device: str) -> None:
    """lanczos_eigs on a fixed symmetric matrix, cold at three tolerances and warm, on ``device`` and on the CPU."""
    from lightning_align.measure.lanczos import lanczos_eigs

    gen = torch.Generator().manual_seed(0)
    n = 2000
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    lam = torch.cat([torch.tensor([10.0, 9.0]), torch.rand(n - 2, generator=gen, dtype=torch.float64) * 8 - 3])
    a_cpu = (q * lam) @ q.T
    a_dev = a_cpu.to(device)
    print(f"\nlanczos_eigs on a {n} x {n} float64 matrix (top 10, 9): {device} against cpu")
    for tol, warm, split in ((1e-2, False, False), (1e-4, False, False), (1e-8, False, False), (1e-2, True, False),
                             (1e-8, False, True)):
        out = {}
        for where, a in (("cpu", a_cpu), (device, a_dev)):
            init = q[:, 0].to(where) + 1e-3 * torch.randn(n, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(where) if warm else None
            sites: Counter = Counter()
            made = [0]
            with counting_syncs(sites) if where != "cpu" else contextlib.nullcontext(), counting_products(made):
                res = lanczos_eigs(lambda v: a @ v, n, tol=tol, max_matvecs=200, init=init, init_noise=2.5e-3,
                                   generator=torch.Generator().manual_seed(2), dtype=torch.float64, device=where,
                                   all_reduce=(lambda t: t.clone()) if split else None)
                sync()
            out[where] = (float(res.values[0]), res.num_matvecs, made[0], sum(sites.values()))
        (v0, p0, _, _), (v1, p1, m1, s1) = out["cpu"], out[device]
        print(f"  {'warm' if warm else 'cold'}{' split (one rank)' if split else ''} tol {tol:g}: cpu {v0:.15g} ({p0} products); {device} {v1:.15g} "
              f"({p1} products, {m1} made, {s1} syncs); |difference| {abs(v0 - v1):.2g}")


def report(title: str, sites: Counter, products: int, seconds: float, made: int | None = None) -> None:
    total = sum(sites.values())
    lanczos = sum(n for (where, _), n in sites.items() if where.startswith("lightning_align/measure/lanczos.py"))
    made_text = "" if made is None else f" ({made} made in the Lanczos loop)"
    print(f"\n{title}: {products} products{made_text}, {seconds * 1e3:.1f} ms, {total} syncs "
          f"({lanczos} in lanczos.py; {total / max(products, 1):.2f} per product)")
    for (where, code), n in sorted(sites.items(), key=lambda kv: -kv[1]):
        print(f"  {n:>4}  {where:<48} {code[:90]}")


def solver(models: list[str], device: str) -> None:
    """hessian_eigs cold and warm on the models of benchmarks/sharpness.py."""
    import sharpness as bench  # benchmarks/sharpness.py, beside this file

    from lightning_align.measure.autodiff import math_attention
    from lightning_align.measure.hessian import hessian_eigs

    for name in models:
        loss = bench.LOSS[name]
        model, batch = bench.build(name, 256, 3, 512)
        model, batch = model.to(device), tuple(t.to(device) for t in batch)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def estimate(init: torch.Tensor | None, tol: float) -> Any:
            return hessian_eigs(model, loss, batch, k=1, tol=tol, max_matvecs=200, init=init,
                                generator=torch.Generator().manual_seed(0))

        with math_attention():
            estimate(None, 1e-2)  # warm-up: kernels, handles, allocator
            for tol in (1e-2, 1e-3):
                sites: Counter = Counter()
                made = [0]
                with counting_syncs(sites), counting_products(made):
                    start = time.perf_counter()
                    res = estimate(None, tol)
                    sync()
                    seconds = time.perf_counter() - start
                report(f"{name}: hessian_eigs cold, tol {tol:g}", sites, res.num_matvecs, seconds, made[0])
                if device == "cuda":
                    print(f"  profiler, blocking runtime calls in the same estimate: {profiled_syncs(lambda: estimate(None, tol))}")
            cpu_model, cpu_batch = bench.build(name, 256, 3, 512)
            on_cpu = hessian_eigs(cpu_model, loss, cpu_batch, k=1, tol=1e-3, max_matvecs=200, generator=torch.Generator().manual_seed(0))
            print(f"  cold tol 1e-3, λ: {float(res.values[0]):.7g} on {device} ({res.num_matvecs} products), "
                  f"{float(on_cpu.values[0]):.7g} on the CPU ({on_cpu.num_matvecs} products)")
            for _ in range(5):
                opt.zero_grad()
                loss(model(batch[0]), batch[1]).backward()
                opt.step()
            opt.zero_grad(set_to_none=True)
            sites = Counter()
            made = [0]
            with counting_syncs(sites), counting_products(made):
                start = time.perf_counter()
                warm = estimate(res.vectors, 1e-2)
                sync()
                seconds = time.perf_counter() - start
            report(f"{name}: hessian_eigs warm (5 SGD steps later), tol 0.01", sites, warm.num_matvecs, seconds, made[0])
            if device == "cuda":
                print(f"  profiler, blocking runtime calls in the same estimate: {profiled_syncs(lambda: estimate(res.vectors, 1e-2))}")


def callback(device: str, every: int) -> None:
    """The Sharpness callback at its defaults on the quickstart MLP: cold (step 0) and warm (step ``every``)."""
    import lightning.pytorch as pl

    from example_modules import MLP, DigitsDataModule
    from lightning_align import Sharpness

    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    records: list[tuple[int, Counter, int, float]] = []

    class Counted(Sharpness):
        def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            sites: Counter = Counter()
            with counting_syncs(sites):
                start = time.perf_counter()
                super()._run(trainer, pl_module)
                sync()
                seconds = time.perf_counter() - start
            records.append((trainer.global_step, sites, int(trainer.callback_metrics["sharpness/matvecs"]), seconds))

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        max_steps=every + 1, accelerator="gpu" if device == "cuda" else "cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[Counted(every_n_steps=every)],
    )
    trainer.fit(MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9), DigitsDataModule(batch_size=64))
    for step, sites, products, seconds in records:
        report(f"Sharpness() callback on the quickstart MLP, step {step} ({'cold' if step == 0 else 'warm'})",
               sites, products, seconds)


def sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["mlp", "conv", "gpt"], choices=["mlp", "conv", "gpt"])
    parser.add_argument("--every", type=int, default=5, help="callback: steps between the cold and the warm estimate")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    torch.set_num_threads(1)
    where = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (nothing to count)"
    print(f"torch {torch.__version__}, {where}; synchronising CUDA calls per Sharpness estimate")
    if args.device == "cuda":
        self_check()
    steps: list[Callable[[], None]] = [
        lambda: matrix(args.device), lambda: solver(args.models, args.device), lambda: callback(args.device, args.every),
    ]
    for step in steps:
        step()


if __name__ == "__main__":
    main()
