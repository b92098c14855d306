"""Super consistency: under μP the LR-rescaled sharpness is the same at every width, under NTP it is not.

Claim (Noci, Meterez, Hofmann, Orvieto, "Super Consistency of Neural Network Landscapes and Learning Rate
Transfer", NeurIPS 2024, arXiv 2402.17457, Fig. 1; seed 003 in ``papers.md``): trained with SGD under μP,
the sharpness in learning-rate units, ``λ_max(P·H)`` (``P`` the per-parameter learning rates), follows the
same trajectory at every width (it rises towards the edge of stability ``2``); under the NTK
parametrization the trajectories separate with width (wider is lazier and flatter); and the top NTK
eigenvalue under μP keeps gaining width dependence during training while the sharpness does not.

Command::

    python reproductions/super_consistency.py [--quick] --out DIR [--seed S]

Setting: ``example_modules.MLP`` with one hidden ReLU layer, no biases (cross-entropy) on the embedded 8x8 digits
(full mode: MNIST from ``--data-root`` when given), plain SGD at base LR ``lr``, widths scaled from
``base_width=64`` by :class:`lightning_align.Parametrization` (``scheme="mup"`` and ``scheme="ntk"``; at
width 64 both are the same SP network). Measured on a fixed probe batch every ``every`` steps by
:class:`lightning_align.Sharpness` (``sharpness/max_eig``, and ``sharpness/lr_x_max_eig``, which with
per-group learning rates is ``λ_max(D H D) = λ_max(P H)``, ``D²`` = each parameter's SGD learning rate: under
NTP the readout's LR is ``lr · 64/width`` while the input layer's is ``lr``) and
:class:`lightning_align.NTKSpectrum` (``ntk/max_eig``).

JSON keys (``DIR/super_consistency.json``):

- ``widths``; ``steps`` (the measured steps); ``fixed_step`` (the step of the one-per-width values);
- ``mup_sharpness``, ``ntk_sharpness``: ``λ_max(P·H)`` at ``fixed_step``, one value per width;
- ``curves``: ``{"mup"|"ntk": {width: {"lr_x_max_eig": [...], "max_eig": [...], "ntk_max_eig": [...]}}}``
  over ``steps``;
- ``mup_rel_spread``, ``ntk_rel_spread``: per measured step (after step 0), ``(max - min)/mean`` of
  ``λ_max(P·H)`` over widths;
- ``ntk_monotone_steps``: the fraction of measured steps (after step 0) at which the NTP values are
  monotone in width;
- ``ntk_growth``: ``{"mup"|"ntk": {width: ntk/max_eig at the last step / at step 0}}``: under μP the
  kernel keeps moving at every width (and the growth differs by width: the NTK gains width dependence),
  under NTP it freezes as the width grows (lazy training). ``ntk/max_eig`` is the kernel of the parameters
  as stored (μP/NTP in SP form), not LR-weighted, so only its change relative to init is compared;
- ``lr``, ``batch_size``, ``probe_size``, ``seed``, ``data``.

Quick vs full: quick = widths 64/256/1024, 200 steps, measured every 20 steps; 14 s wall on 2 CPU cores
(up to 40 s when the machine is shared). Full = widths 64/128/256/512/1024/2048, 1500 steps, measured every
50 with a 512-example probe: 102 s measured (μP spread across the six widths: median 12 %, largest 24 %;
NTP monotone in width at every measured step).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lightning.pytorch as pl  # noqa: E402

from example_modules import MLP, DigitsDataModule, TorchvisionDataModule  # noqa: E402
from lightning_align.callbacks.ntk import NTKSpectrum  # noqa: E402
from lightning_align.callbacks.parametrization import Parametrization  # noqa: E402
from lightning_align.callbacks.sharpness import Sharpness  # noqa: E402

NAME = "super_consistency"
SCHEMES = ("mup", "ntk")


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(widths=[64, 256, 1024], steps=200, every=20, batch_size=256, lr=0.2, probe_size=256)
    return dict(widths=[64, 128, 256, 512, 1024, 2048], steps=1500, every=50, batch_size=256, lr=0.2, probe_size=512)


def run(scheme: str, width: int, cfg: dict[str, Any], args: Any, data: pl.LightningDataModule, in_features: int) -> dict[str, list[float]]:
    pl.seed_everything(args.seed, verbose=False)
    model = MLP(in_features=in_features, width=width, depth=1, bias=False, optimizer="sgd", lr=cfg["lr"])
    memory = common.MemoryLogger()
    callbacks = [
        Parametrization(scheme=scheme, base_width=64, verbose=False),
        Sharpness(every_n_steps=cfg["every"], k=1, min_eig=False, probe_size=cfg["probe_size"], tol=1e-3),
        NTKSpectrum(every_n_steps=cfg["every"], k=1, probe_size=32, alignment=False, histograms=False),
    ]
    trainer = common.trainer(args.out, f"{scheme}_w{width}", callbacks, extra_loggers=(memory,), max_steps=cfg["steps"],
                             limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    steps = list(range(0, cfg["steps"] + 1, cfg["every"]))

    def series(key: str) -> list[float]:
        return [memory.by_step(key).get(s, math.nan) for s in steps]

    return {
        "lr_x_max_eig": series("sharpness/lr_x_max_eig"),
        "max_eig": series("sharpness/max_eig"),
        "ntk_max_eig": series("ntk/max_eig"),
    }


def rel_spread(values: list[float]) -> float:
    return (max(values) - min(values)) / (sum(values) / len(values))


def monotone(values: list[float]) -> bool:
    pairs = list(zip(values, values[1:]))
    return all(a < b for a, b in pairs) or all(a > b for a, b in pairs)


def make_figure(cfg: dict[str, Any], results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.cm.viridis([i / max(1, len(cfg["widths"]) - 1) for i in range(len(cfg["widths"]))])
    steps = results["steps"]
    panels = (("mup", "μP: λmax(P·H) (LR units)"), ("ntk", "NTP: λmax(P·H) (LR units)"))
    for ax, (scheme, title) in zip(axes, panels):
        for color, width in zip(colors, cfg["widths"]):
            ax.plot(steps, results["curves"][scheme][str(width)]["lr_x_max_eig"], "o-", ms=3, color=color, label=f"width {width}")
        ax.axhline(2.0, color="gray", ls="--", lw=1, label="2 (edge of stability)")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for color, width in zip(colors, cfg["widths"]):
        for scheme, style in (("mup", "-"), ("ntk", "--")):
            c = results["curves"][scheme][str(width)]["ntk_max_eig"]
            axes[2].plot(steps, [v / c[0] for v in c], style, color=color, label=f"{'μP' if scheme == 'mup' else 'NTP'} width {width}")
    axes[2].set_title("top NTK eigenvalue relative to init (solid μP, dashed NTP)")
    axes[2].set_xlabel("step")
    axes[2].grid(alpha=0.3)
    axes[2].legend(fontsize=7, ncol=2)
    axes[0].set_ylabel("lr × sharpness")
    axes[1].set_ylabel("lr × sharpness")
    axes[1].set_ylim(axes[0].get_ylim())
    axes[2].set_ylabel("ntk/max_eig(t) / ntk/max_eig(0)")
    axes[0].legend()
    fig.suptitle(f"Super consistency (1-hidden-layer MLP on {results['data']}, SGD base lr {cfg['lr']}, base width 64)")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = settings(args.quick)
    if args.data_root and not args.quick:
        data: pl.LightningDataModule = TorchvisionDataModule(name="mnist", root=args.data_root, flatten=True, batch_size=cfg["batch_size"])
        in_features, data_name = 784, "mnist"
    else:
        data, in_features, data_name = DigitsDataModule(batch_size=cfg["batch_size"], seed=args.seed), 64, "digits"
    curves = {s: {str(w): run(s, w, cfg, args, data, in_features) for w in cfg["widths"]} for s in SCHEMES}
    steps = list(range(0, cfg["steps"] + 1, cfg["every"]))
    fixed = len(steps) - 1

    def across(scheme: str, key: str, i: int) -> list[float]:
        return [curves[scheme][str(w)][key][i] for w in cfg["widths"]]

    later = range(1, len(steps))
    results: dict[str, Any] = {
        "widths": cfg["widths"],
        "steps": steps,
        "fixed_step": steps[fixed],
        "mup_sharpness": across("mup", "lr_x_max_eig", fixed),
        "ntk_sharpness": across("ntk", "lr_x_max_eig", fixed),
        "curves": curves,
        "mup_rel_spread": [rel_spread(across("mup", "lr_x_max_eig", i)) for i in later],
        "ntk_rel_spread": [rel_spread(across("ntk", "lr_x_max_eig", i)) for i in later],
        "ntk_monotone_steps": sum(monotone(across("ntk", "lr_x_max_eig", i)) for i in later) / len(later),
        "ntk_growth": {sch: {str(w): curves[sch][str(w)]["ntk_max_eig"][-1] / curves[sch][str(w)]["ntk_max_eig"][0]
                             for w in cfg["widths"]} for sch in SCHEMES},
        "lr": cfg["lr"], "batch_size": cfg["batch_size"], "probe_size": cfg["probe_size"], "seed": args.seed,
        "data": data_name, "quick": args.quick,
    }
    common.write_results(args.out, NAME, results, make_figure(cfg, results))
    print(f"step {steps[fixed]}: mup lr*sharpness {results['mup_sharpness']}, ntk {results['ntk_sharpness']}")
    print(f"max mup spread {max(results['mup_rel_spread']):.3f}, ntk monotone fraction {results['ntk_monotone_steps']:.2f}, "
          f"NTK growth {results['ntk_growth']}")
    return results


if __name__ == "__main__":
    main()
