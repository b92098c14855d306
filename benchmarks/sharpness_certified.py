"""Products per Sharpness estimate with the certificate, against the committed uncertified path, during training.

For the quickstart MLP, the example ResNet and the example GPT, a Lightning fit with ``Sharpness`` at its defaults
(``tol=1e-2``, ``k=1``, ``max_matvecs=50``) except ``every_n_steps`` and ``probe_size``. At every measurement the
same Hessian is also solved the way Sharpness did before certification ("old": Lanczos from the previous top vector
perturbed by ``tol/4``, or from the loss gradient perturbed by 1%, stopped when the residual is within ``tol``
times the largest ``|θ|``), with its own warm vector, so both see the same training run. Products of the ``λ_max``
solve only (the Adam-preconditioned one, when there is one, is not counted); "check" is the part of the new
products spent in checks; "old low" counts estimates where the old value is more than ``tol`` below the certified
one (a silent miss of the old path).

Run by hand::

    OMP_NUM_THREADS=1 python benchmarks/sharpness_certified.py [--models mlp resnet gpt] [--every 100 100 25]
        [--steps 500 500 50] [--probe 256 256 32] [--max-matvecs 50]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_align import Sharpness  # noqa: E402
from lightning_align.measure.lanczos import lanczos_eigs  # noqa: E402

MODELS = ("mlp", "resnet", "gpt")


def build(name: str) -> tuple[pl.LightningModule, pl.LightningDataModule]:
    from example_modules import GPT, MLP, CharTextDataModule, DigitsDataModule, ResNet

    if name == "mlp":  # configs/quickstart.yaml
        return MLP(width=128, depth=3, norm="batch", lr=0.1, momentum=0.9), DigitsDataModule(batch_size=64)
    if name == "resnet":  # configs/resnet.yaml
        return ResNet(width=16, depth=2, lr=0.05, momentum=0.9), DigitsDataModule(batch_size=64, as_images=True)
    if name == "gpt":  # the GPT of benchmarks/sharpness_warm.py
        return GPT(width=128, depth=4, heads=4, block_size=64, lr=3e-3), CharTextDataModule(block_size=64, batch_size=32, max_bytes=500_000)
    raise KeyError(name)


class Compared(Sharpness):
    """Sharpness that also runs the committed uncertified solve on each measurement's operator."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rows: list[dict[str, Any]] = []
        self._old: torch.Tensor | None = None

    def _eigs(self, trainer: pl.Trainer, op: Any, generator: torch.Generator) -> dict[str, Any]:
        before = op.num_matvecs
        warm = self._old is not None
        old = lanczos_eigs(op, op.dim, k=1, tol=self.tol, max_matvecs=self.max_matvecs, init=self._old if warm else op.gradient,
                           init_noise=min(0.01, self.tol / 4) if warm else 0.01, dtype=op.dtype, device=op.device,
                           generator=torch.Generator().manual_seed(trainer.global_step + 1))
        self._old = old.vectors.detach() if old.converged else self._old
        old_products, start = op.num_matvecs - before, time.perf_counter()
        self._solves: list[Any] = []
        metrics = super()._eigs(trainer, op, generator)
        main = self._solves[0]  # the λmax solve (then the preconditioned one, if any)
        self.rows.append({
            "step": trainer.global_step, "old": old_products, "new": main.num_matvecs, "check": main.check_matvecs,
            "old_value": float(old.values[0]), "new_value": float(metrics["sharpness/max_eig"]),
            "certified": main.certified, "seconds": time.perf_counter() - start,
        })
        return metrics

    def _solve(self, *args: Any, **kwargs: Any) -> Any:
        res = super()._solve(*args, **kwargs)
        self._solves.append(res)
        return res


def run(name: str, every: int, steps: int, probe: int, max_matvecs: int = 50) -> list[dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    model, data = build(name)
    callback = Compared(every_n_steps=every, probe_size=probe, min_eig=False, max_matvecs=max_matvecs)
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[callback],
    )
    trainer.fit(model, data)
    return callback.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--every", nargs="+", type=int, default=[100, 100, 25])
    parser.add_argument("--steps", nargs="+", type=int, default=[500, 500, 50])
    parser.add_argument("--probe", nargs="+", type=int, default=[256, 256, 32])
    parser.add_argument("--max-matvecs", type=int, default=50, help="Sharpness(max_matvecs=...), both paths")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, 1 thread; Sharpness(tol=1e-2, k=1, max_matvecs={args.max_matvecs}); products of the λmax solve")
    table = []
    for i, name in enumerate(args.models):
        pick = lambda xs: xs[min(i, len(xs) - 1)]  # noqa: E731
        rows = run(name, pick(args.every), pick(args.steps), pick(args.probe), args.max_matvecs)
        print(f"\n{name}: every {pick(args.every)} steps, {pick(args.steps)} steps, probe {pick(args.probe)}")
        print(f"{'step':>6}{'old':>6}{'new':>6}{'check':>7}{'old λmax':>12}{'new λmax':>12}{'certified':>11}{'new [s]':>9}")
        for r in rows:
            print(f"{r['step']:>6}{r['old']:>6}{r['new']:>6}{r['check']:>7}{r['old_value']:>12.5g}{r['new_value']:>12.5g}"
                  f"{str(r['certified']):>11}{r['seconds']:>9.2f}")
        cold, warm = rows[0], rows[1:]
        low = sum(1 for r in rows if math.isfinite(r["new_value"]) and r["old_value"] < r["new_value"] - 1e-2 * abs(r["new_value"]))
        table.append((name, cold["old"], cold["new"], statistics.median(r["old"] for r in warm) if warm else math.nan,
                      statistics.median(r["new"] for r in warm) if warm else math.nan,
                      statistics.median(r["check"] for r in warm) if warm else math.nan,
                      sum(not r["certified"] for r in rows), low, len(rows)))
    print("\n| model | cold old → new | warm median old → new (check) | uncertified | old low | estimates |")
    print("|---|---|---|---|---|---|")
    for name, c_old, c_new, w_old, w_new, w_check, nan, low, n in table:
        print(f"| {name} | {c_old} → {c_new} | {w_old:g} → {w_new:g} ({w_check:g}) | {nan} | {low} | {n} |")


if __name__ == "__main__":
    main()
