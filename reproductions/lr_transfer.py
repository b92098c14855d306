"""μTransfer: the best learning rate is the same at every width under μP and drifts under SP.

Claim (Yang et al. 2022, "Tensor Programs V: Tuning Large Neural Networks via Zero-Shot Hyperparameter
Transfer", arXiv 2203.03466; also Noci et al. 2024): with the width scaling of μP applied by
:class:`lightning_align.Parametrization` (``scheme="mup", base_width=64``), the learning rate that minimises
the training loss over a fixed number of Adam steps stays put (within one ×2 step of the grid) from width
64 to 1024, while in the standard parametrization (``scheme="sp"``) it moves to smaller values as the
network widens (Adam's per-coordinate updates make the hidden layers' feature change grow with width).

Command::

    python reproductions/lr_transfer.py [--quick] --out DIR [--seed S]

Setting: ``example_modules.MLP`` (two hidden ReLU layers, cross-entropy) on the embedded 8x8 digits
(``DigitsDataModule``; full mode: MNIST from ``--data-root`` when given), Adam, the same initial weights
for every learning rate at a given width. The criterion is the mean training loss over the ``steps``
steps (the module's logged ``train/loss``, i.e. the area under the training curve: how fast each LR
trains). It is far less noisy than the loss at the last step, whose argmin on this small task wanders by
a grid step from seed to seed near the flat optimum; the last-step loss on the whole training set is
reported too (``final_losses``, ``*_best_lr_final``).

JSON keys (``DIR/lr_transfer.json``):

- ``widths``, ``lrs``: the grid (``lrs`` are the base learning rates, a ×2 grid);
- ``losses``: ``{"mup"|"sp": {width: [mean training loss over the run, per lr]}}`` (``null``: diverged);
- ``mup_best_lr``, ``sp_best_lr``: ``{width: the lr with the smallest loss}``;
- ``final_losses``, ``mup_best_lr_final``, ``sp_best_lr_final``: the same with the loss on the whole
  training set after the last step;
- ``mup_shift_steps``, ``sp_shift_steps``: how many ×2 grid steps the best LR moves from the smallest to
  the largest width (``log2(best_lr(widest) / best_lr(narrowest))``);
- ``steps``, ``batch_size``, ``depth``, ``seed``, ``data``.

Quick vs full: quick = widths 64/256/1024, 8 LRs (2^-10 .. 2^-3), 60 steps, batch 128; 32 s wall on 2
shared CPU cores. Full = widths 64/128/256/512/1024/2048, 12 LRs (2^-13 .. 2^-2), 400 steps, batch 128:
about 20 minutes on 2 CPU cores (an estimate: single 100-step fits take 1.2 s / 2.0 s / 6.2 s at widths
512 / 1024 / 2048, scaled to 400 steps x 12 LRs x 2 schemes; more with MNIST).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from example_modules import MLP, DigitsDataModule, TorchvisionDataModule  # noqa: E402
from lightning_align.callbacks.parametrization import Parametrization  # noqa: E402

NAME = "lr_transfer"
SCHEMES = ("mup", "sp")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(widths=[64, 256, 1024], lrs=[2.0**e for e in range(-10, -2)], steps=60, batch_size=128)
    return dict(widths=[64, 128, 256, 512, 1024, 2048], lrs=[2.0**e for e in range(-13, -1)], steps=400, batch_size=128)


def train_losses(scheme: str, width: int, lr: float, cfg: dict[str, Any], args: Any, data: pl.LightningDataModule,
                 in_features: int) -> tuple[float, float]:
    """Train one width/LR under ``scheme``; (mean logged training loss over the run, full training-set loss at the end)."""
    pl.seed_everything(args.seed, verbose=False)  # same init (and batch order) for every lr at this width
    model = MLP(in_features=in_features, width=width, depth=cfg["depth"], optimizer="adam", lr=lr)
    losses = common.MemoryLogger()
    trainer = common.trainer(
        args.out, f"{scheme}_w{width}_lr{lr:.2e}", [Parametrization(scheme=scheme, base_width=64, verbose=False)],
        extra_loggers=(losses,), max_steps=cfg["steps"], check_val_every_n_epoch=10**6,
    )
    trainer.fit(model, datamodule=data)
    train_losses = losses.values("train/loss")
    mean = sum(train_losses) / len(train_losses) if train_losses else math.nan
    whole_train_set = DataLoader(data.train_set, batch_size=512)  # data.setup() ran in fit
    final = float(trainer.validate(model, dataloaders=whole_train_set, verbose=False)[0]["val/loss"])
    return (mean if math.isfinite(mean) else math.nan), (final if math.isfinite(final) else math.nan)


def best(lrs: list[float], losses: list[float]) -> float:
    finite = [(loss, lr) for lr, loss in zip(lrs, losses) if math.isfinite(loss)]
    return min(finite)[1] if finite else math.nan


def make_figure(cfg: dict[str, Any], results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    colors = plt.cm.viridis([i / max(1, len(cfg["widths"]) - 1) for i in range(len(cfg["widths"]))])
    for ax, scheme, title in zip(axes, SCHEMES, ("μP (Parametrization scheme='mup')", "SP (scheme='sp')")):
        for color, width in zip(colors, cfg["widths"]):
            ys = results["losses"][scheme][str(width)]
            ax.plot(cfg["lrs"], ys, "o-", color=color, label=f"width {width}")
            b = results[f"{scheme}_best_lr"][str(width)]
            if math.isfinite(b):
                ax.plot([b], [min(y for y in ys if math.isfinite(y))], "*", color=color, markersize=16, markeredgecolor="k")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("learning rate (Adam, base width 64)")
        ax.set_title(f"{title}: best LR shifts {results[f'{scheme}_shift_steps']:+.0f} ×2 steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"mean training loss over {cfg['steps']} steps")
    axes[0].set_yscale("log")
    axes[0].legend()
    fig.suptitle("LR transfer across width (MLP on digits; ★ = best LR)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = settings(args.quick) | {"depth": 2}
    if args.data_root and not args.quick:
        data: pl.LightningDataModule = TorchvisionDataModule(name="mnist", root=args.data_root, flatten=True, batch_size=cfg["batch_size"])
        in_features, data_name = 784, "mnist"
    else:
        data, in_features, data_name = DigitsDataModule(batch_size=cfg["batch_size"], seed=args.seed), 64, "digits"
    losses: dict[str, dict[str, list[float]]] = {s: {} for s in SCHEMES}
    finals: dict[str, dict[str, list[float]]] = {s: {} for s in SCHEMES}
    for scheme in SCHEMES:
        for width in cfg["widths"]:
            pairs = [train_losses(scheme, width, lr, cfg, args, data, in_features) for lr in cfg["lrs"]]
            losses[scheme][str(width)] = [p[0] for p in pairs]
            finals[scheme][str(width)] = [p[1] for p in pairs]
    results: dict[str, Any] = {"widths": cfg["widths"], "lrs": cfg["lrs"], "losses": losses, "final_losses": finals}
    for scheme in SCHEMES:
        bests = {str(w): best(cfg["lrs"], losses[scheme][str(w)]) for w in cfg["widths"]}
        results[f"{scheme}_best_lr"] = bests
        results[f"{scheme}_best_lr_final"] = {str(w): best(cfg["lrs"], finals[scheme][str(w)]) for w in cfg["widths"]}
        lo, hi = bests[str(cfg["widths"][0])], bests[str(cfg["widths"][-1])]
        results[f"{scheme}_shift_steps"] = math.log2(hi / lo) if lo > 0 and hi > 0 else math.nan
    results.update(steps=cfg["steps"], batch_size=cfg["batch_size"], depth=cfg["depth"],
                   seed=args.seed, data=data_name, quick=args.quick)
    common.write_results(args.out, NAME, results, make_figure(cfg, results))
    for scheme in SCHEMES:
        print(f"{scheme}: best lr per width {results[f'{scheme}_best_lr']} (shift {results[f'{scheme}_shift_steps']:+.1f} x2 steps)")
    return results


if __name__ == "__main__":
    main()
