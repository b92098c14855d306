"""NTKSpectrum at its defaults on the example GPT, a Hugging Face GPT-2 and the example ResNet: memory and time.

Each model runs in its own process (so that peak memory is its own): a short Lightning fit with
``NTKSpectrum(every_n_steps=E)`` and every other argument at its default (probe 32, k 10, tol 1e-4,
``sequence_output="mean"``, ``max_memory_gb=4``), so there is a cold measurement at step 0 and warm ones
after. Around each measurement: wall time, the products used, and the extra memory: on CPU the peak
resident set above the resident set just before (``VmHWM`` reset through ``/proc/self/clear_refs``), on
CUDA ``torch.cuda.max_memory_allocated`` above the allocation before. The estimate the guard compares with
``max_memory_gb`` is printed next to it. One training step's time (from the same fit, measurements
excluded) converts a measurement to training steps.

``--products`` adds the cost of one kernel-vector product on the GPT three ways, interleaved, minimum over
repeats: a ``torch.func.jvp`` per product (the forward re-run each time: what NTKSpectrum did before),
``torch.func.linearize`` (traced once per measurement, then replayed) and the kept graph used now.

Run by hand (one thread on a shared CPU; add ``--device cuda`` on a GPU)::

    OMP_NUM_THREADS=1 python benchmarks/ntk_memory.py [--models gpt hf_gpt2 resnet] [--steps 5] [--products]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import time
from typing import Any

import torch

MODELS = ("gpt", "hf_gpt2", "resnet")


def _status() -> dict[str, int]:
    text = open("/proc/self/status").read()
    return {k: 1024 * int(re.search(rf"{k}:\s+(\d+)", text).group(1)) for k in ("VmRSS", "VmHWM")}


def _build(name: str) -> tuple[Any, Any]:
    from example_modules import GPT, CharTextDataModule, DigitsDataModule, HFCausalLM, ResNet

    if name == "gpt":
        return GPT(width=128, depth=4, heads=4, block_size=64), CharTextDataModule(block_size=64, batch_size=32, max_bytes=500_000)
    if name == "hf_gpt2":
        model = HFCausalLM(model_type="gpt2", width=128, depth=4, heads=4, block_size=64)
        return model, CharTextDataModule(block_size=64, batch_size=32, max_bytes=500_000, batch_format="hf")
    if name == "resnet":
        return ResNet(width=16, depth=2, lr=0.05, momentum=0.9), DigitsDataModule(batch_size=64, as_images=True)
    raise KeyError(name)


def run_model(name: str, steps: int, device: str) -> dict[str, Any]:
    """One fit with NTKSpectrum at its defaults (every ``steps`` steps); per measurement: time, products, memory."""
    import lightning.pytorch as pl

    from lightning_align import NTKSpectrum
    from lightning_align.measure.sequence import SequenceReduced
    from lightning_align.measure import ntk as ntk_mod

    torch.set_num_threads(1)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    pl.seed_everything(0, verbose=False)
    model, data = _build(name)
    records: list[dict[str, Any]] = []
    cuda = device == "cuda"

    class Timed(NTKSpectrum):
        def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                before = _status()["VmRSS"]
            start = time.perf_counter()
            super()._run(trainer, pl_module)
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            peak = torch.cuda.max_memory_allocated() if cuda else _status()["VmHWM"]
            metrics = trainer.callback_metrics
            with self.probe_context(pl_module):
                plan = ntk_mod._Plan.build(SequenceReduced(self.probe_outputs_model(pl_module), self.sequence_output),
                                           self.probe_batch, None, None, True, owner="bench")
            size = plan.n * plan.c
            records.append({
                "step": trainer.global_step, "seconds": wall, "extra_mb": (peak - before) / 2**20,
                "matvecs": int(metrics["ntk/matvecs"]) if "ntk/matvecs" in metrics else 0,
                "rows": size, "path": "lanczos" if "ntk/matvecs" in metrics else "exact",
                "estimate_mb": (plan.lanczos_bytes(size, min(self.max_matvecs, size)) if "ntk/matvecs" in metrics
                                else plan.exact_bytes(plan.auto_chunk(self.max_memory_gb * 2**30 / 4), size)) / 2**20,
                "graph_mb_per_sample": plan.graph_bytes / 2**20,
                "max_eig": float(metrics["ntk/max_eig"]), "trace": float(metrics["ntk/trace"]),
                "trace_stderr": float(metrics.get("ntk/trace_stderr", torch.tensor(0.0))),
            })

    starts: list[float] = []

    class StepClock(pl.Callback):
        def on_train_batch_start(self, *args: Any) -> None:
            starts.append(time.perf_counter())

    callback = Timed(every_n_steps=steps)
    trainer = pl.Trainer(
        max_steps=2 * steps, accelerator="gpu" if cuda else "cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[StepClock(), callback],
    )
    trainer.fit(model, data)
    intervals = sorted(b - a for a, b in zip(starts, starts[1:]))
    step = intervals[len(intervals) // 4]  # a low quantile: intervals with a measurement are the longest
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"model": name, "params": params, "step_seconds": step, "records": records}


def product_costs(repeats: int, device: str = "cpu") -> None:
    """One kernel-vector product on the example GPT (probe 32, mean over positions): three ways."""
    from torch.func import jvp, linearize

    from example_modules import GPT
    from lightning_align.measure import ntk as ntk_mod
    from lightning_align.measure.autodiff import call_with_fresh_buffers, math_attention

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(width=128, depth=4, heads=4, block_size=64).eval().to(device)
    x = torch.randint(0, 256, (32, 64)).to(device)

    def now() -> float:  # the clock after the GPU's queued work (timing only)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    class Mean(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.m(t).mean(1)

    wrapped = Mean()
    plan = ntk_mod._Plan.build(wrapped, x, None, None, True, owner="bench")
    n, c = plan.n, plan.c
    primals = {k: p.detach() for k, p in plan.selected.items()}

    def f(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return call_with_fresh_buffers(wrapped, p, (x,)).reshape(n, c)

    v = torch.randn(n * c).to(device)
    best: dict[str, float] = {}
    setups: dict[str, float] = {}
    for _ in range(repeats):
        # (a) torch.func: vjp once, then vjp + jvp per product (jvp re-runs the forward)
        with math_attention():
            t0 = now()
            _, vjp_fn = torch.func.vjp(f, primals)
            setup = now() - t0
            t0 = now()
            (u,) = vjp_fn(v.reshape(n, c))
            jvp(f, (primals,), (u,))
            best["torch.func vjp + jvp (before)"] = min(best.get("torch.func vjp + jvp (before)", 1e9), now() - t0)
            setups["torch.func vjp + jvp (before)"] = min(setups.get("torch.func vjp + jvp (before)", 1e9), setup)
            # (b) linearize once, then vjp + linearised jvp
            t0 = now()
            _, jvp_fn = linearize(f, primals)
            setup = now() - t0
            t0 = now()
            (u,) = vjp_fn(v.reshape(n, c))
            jvp_fn(u)
            best["torch.func.linearize"] = min(best.get("torch.func.linearize", 1e9), now() - t0)
            setups["torch.func.linearize"] = min(setups.get("torch.func.linearize", 1e9), setup + setups["torch.func vjp + jvp (before)"])
        # (c) ours: kept graph + graph of the symbolic VJP
        t0 = now()
        op = plan.operator(x, False)
        op(v)  # the first product builds the symbolic VJP's graph: part of the set-up
        setup = now() - t0
        t0 = now()
        op(v)
        best["kept graph (now)"] = min(best.get("kept graph (now)", 1e9), now() - t0)
        setups["kept graph (now)"] = min(setups.get("kept graph (now)", 1e9), setup - best["kept graph (now)"])
        del op
    print(f"\nOne kernel-vector product, example GPT (width 128, depth 4, 64 tokens), probe 32, c = {c} "
          f"({n * c} rows); min of {repeats}, interleaved")
    print(f"{'method':<34}{'set-up per measurement [s]':>28}{'per product [s]':>17}")
    for name in best:
        print(f"{name:<34}{setups[name]:>28.3f}{best[name]:>17.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=MODELS)
    parser.add_argument("--steps", type=int, default=5, help="training steps between measurements (2 warm after the cold one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--products", action="store_true", help="also time one product three ways on the GPT")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_model(args.child, args.steps, args.device)))
        return
    where = f"cuda ({torch.cuda.get_device_name()})" if args.device == "cuda" else "cpu"
    print(f"torch {torch.__version__}, 1 thread, device {where}; NTKSpectrum at its defaults except every_n_steps={args.steps}")
    print(f"{'model':<9}{'params':>10}{'rows':>7}{'path':>9}{'step':>6}{'products':>9}{'time [s]':>10}{'[train steps]':>14}"
          f"{'extra MB':>10}{'estimate MB':>12}{'max_eig':>11}{'trace ± stderr':>22}")
    for name in args.models:
        out = subprocess.run([sys.executable, __file__, "--child", name, "--steps", str(args.steps), "--device", args.device],
                             capture_output=True, text=True)
        if out.returncode:
            print(f"{name:<9} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        for r in res["records"]:
            trace = f"{r['trace']:.4g} ± {r['trace_stderr']:.2g}"
            print(f"{name:<9}{res['params']:>10}{r['rows']:>7}{r['path']:>9}{r['step']:>6}{r['matvecs']:>9}{r['seconds']:>10.2f}"
                  f"{r['seconds'] / res['step_seconds']:>14.1f}{r['extra_mb']:>10.0f}{r['estimate_mb']:>12.0f}"
                  f"{r['max_eig']:>11.4g}{trace:>22}")
        print(f"{'':<9}one training step {res['step_seconds'] * 1e3:.0f} ms; per-sample saved-for-backward "
              f"{res['records'][0]['graph_mb_per_sample']:.2f} MB")
    if args.products:
        product_costs(args.repeats, args.device)


if __name__ == "__main__":
    main()
