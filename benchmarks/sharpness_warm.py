"""Warm Sharpness estimates along real training runs: products per measurement, residual and true error.

For the quickstart MLP, the example ResNet and the example GPT, a Lightning fit with ``Sharpness`` at its
defaults (probe 256, ``tol=1e-2``, ``k=1``) except ``every_n_steps``. Each measurement records the
Hessian-vector products of the ``λ_max`` run (the Adam-preconditioned run of the GPT, when there is one,
separately), the reported Ritz residual relative to ``λ_max`` (the error bound) and, with a reference,
the true relative error: a float64-basis Lanczos run to ``tol=1e-6`` on the same probe and objective,
started from a random vector (``--reference cold``) or, cheaper, from the measured vector with the default
1% perturbation (``--reference warm``). Warm measurements are all but the first (cold) one.

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/sharpness_warm.py [--models mlp resnet gpt] [--every 1000 1000 100]
        [--steps 5000 5000 500] [--reference cold] [--lr-scale 1] [--gradient-check]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_align import Sharpness
from lightning_align.measure.lanczos import lanczos_eigs
from lightning_align.measure.operators import hessian_operator

MODELS = ("mlp", "resnet", "gpt")


def build(name: str, lr_scale: float = 1.0) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    from example_modules import GPT, MLP, CharTextDataModule, DigitsDataModule, ResNet

    if name == "mlp":  # configs/quickstart.yaml
        return MLP(width=128, depth=3, norm="batch", lr=0.1 * lr_scale, momentum=0.9), DigitsDataModule(batch_size=64)
    if name == "resnet":  # configs/resnet.yaml
        return ResNet(width=16, depth=2, lr=0.05 * lr_scale, momentum=0.9), DigitsDataModule(batch_size=64, as_images=True)
    if name == "gpt":  # the GPT of benchmarks/ntk_memory.py (configs/gpt.yaml at width 128, depth 4)
        model = GPT(width=128, depth=4, heads=4, block_size=64, lr=3e-3 * lr_scale)
        return model, CharTextDataModule(block_size=64, batch_size=32, max_bytes=500_000)
    raise KeyError(name)


class Recorded(Sharpness):
    """Sharpness that records, per measurement, the products of each Lanczos run, the residual and a reference."""

    def __init__(self, reference: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reference = reference
        self.rows: list[dict[str, Any]] = []
        self._pre_products = 0

    def _preconditioned(self, trainer: pl.Trainer, op: Any, d: Any, generator: torch.Generator) -> float | None:
        before = op.num_matvecs
        out = super()._preconditioned(trainer, op, d, generator)
        self._pre_products = op.num_matvecs - before
        return out

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        self._pre_products = 0
        start = time.perf_counter()
        metrics = super().measure(trainer, pl_module, batch)
        seconds = time.perf_counter() - start
        lam = float(metrics["sharpness/max_eig"])
        row = {
            "step": trainer.global_step, "seconds": seconds, "max_eig": lam,
            "products": int(metrics["sharpness/matvecs"]) - self._pre_products, "pre_products": self._pre_products,
            "residual": float(metrics["sharpness/max_eig_residual"]) / abs(lam), "error": float("nan"),
        }
        if self.reference != "none":
            loss_model = self.probe_loss_model(pl_module)
            with hessian_operator(loss_model, lambda out, _t: out, (batch, None)) as op:
                init = None if self.reference == "cold" else self._warm.vectors
                ref = lanczos_eigs(op, op.dim, tol=1e-6, max_matvecs=400, init=init, dtype=torch.float64,
                                   generator=torch.Generator().manual_seed(123))
            row["error"] = abs(lam - float(ref.values[0])) / abs(float(ref.values[0]))
        self.rows.append(row)
        print(f"  measured step {row['step']}: {row['products']} HVPs (+{row['pre_products']} preconditioned), "
              f"residual/λ {row['residual']:.1e}, error {row['error']:.1e}, {seconds:.2f} s", flush=True)
        return metrics


def run(
    name: str, every: int, steps: int, reference: str, lr_scale: float = 1.0, gradient_check: bool = False
) -> list[dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    model, data = build(name, lr_scale)
    callback = Recorded(reference, every_n_steps=every, gradient_check=gradient_check)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(model, data)
    return callback.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--every", nargs="+", type=int, default=[1000, 1000, 100], help="every_n_steps per model")
    parser.add_argument("--steps", nargs="+", type=int, default=[5000, 5000, 500], help="training steps per model")
    parser.add_argument("--reference", choices=["cold", "warm", "none"], default="cold")
    parser.add_argument("--lr-scale", type=float, default=1.0, help="multiply each model's learning rate (smaller: smoother)")
    parser.add_argument("--gradient-check", action="store_true", help="Sharpness(gradient_check=True)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, 1 thread; Sharpness defaults (probe 256, tol 1e-2, k 1), "
          f"gradient_check={args.gradient_check}, lr x {args.lr_scale:g}, reference: {args.reference}")
    for i, name in enumerate(args.models):
        every, steps = args.every[min(i, len(args.every) - 1)], args.steps[min(i, len(args.steps) - 1)]
        rows = run(name, every, steps, args.reference, args.lr_scale, args.gradient_check)
        print(f"\n{name}: every {every} steps, {steps} steps")
        print(f"{'step':>6}{'λ_max':>12}{'HVPs':>6}{'precond. HVPs':>15}{'residual/λ':>12}{'true rel. error':>17}{'time [s]':>10}")
        for r in rows:
            print(f"{r['step']:>6}{r['max_eig']:>12.5g}{r['products']:>6}{r['pre_products']:>15}{r['residual']:>12.1e}"
                  f"{r['error']:>17.1e}{r['seconds']:>10.3f}")
        warm = rows[1:]
        if warm:
            print(f"warm: median {statistics.median(r['products'] for r in warm)} HVPs (λ_max run), "
                  f"max true error {max(r['error'] for r in warm):.1e}, max residual/λ {max(r['residual'] for r in warm):.1e}")


if __name__ == "__main__":
    main()
