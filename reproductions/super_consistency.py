"""Super consistency: under μP the LR-rescaled sharpness climbs to the edge of stability at every width; under NTP it depends on width.

Claim (Noci, Meterez, Hofmann, Orvieto, "Super Consistency of Neural Network Landscapes and Learning Rate
Transfer", NeurIPS 2024, arXiv 2402.17457, Fig. 1): trained with SGD under μP, the
sharpness in learning-rate units rises (progressive sharpening) to the edge of stability ``2/η`` and stays
there, the same at every width, for a sustained period; under the NTK parametrization the sharpness
dynamics change with width (wider is lazier: less sharpening, flatter).

The measure is the authors' (``figure1_jax_reproduction/reproduce_jax.py`` in
``lorenzonoci/nn_large_depth_width_landscape``: top Hessian eigenvalue of the training loss on a fixed batch,
times the LR multiplier, against ``2/η``). Here it is ``sharpness/lr_x_max_eig`` of
:class:`lightning_align.Sharpness`, ``λ_max(D H D)`` with ``D²`` each parameter's SGD learning rate, which
equals the authors' quantity times ``η`` and is the same in every equivalent form of the parametrization;
the threshold is ``sharpness/threshold`` (2 for plain SGD).

Command::

    python reproductions/super_consistency.py [--quick] --out DIR [--seed S]

Setting: ``example_modules.MLP`` with ``depth`` hidden ReLU layers, no biases, ``init="normal"``
(``N(0, 1/fan_in)``, as the authors' ``N(0,1)`` weights times ``1/sqrt(fan_in)``), MSE on one-hot targets
(``F.mse_loss``, the mean over samples and classes), full-batch gradient descent (plain SGD, batch = the whole
training split: ``DigitsDataModule(val_fraction=...)`` leaves ``n_train`` digits) at base LR ``lr``, widths
scaled from ``base_width=64`` by :class:`lightning_align.Parametrization` (``scheme="mup"``/``"ntk"``; at
width 64 both are the same network). Sharpness is measured on the whole training split (the fixed probe) every
``every`` steps; :class:`lightning_align.NTKSpectrum` logs the top NTK eigenvalue on 32 samples.

Differences from the paper's Fig. 1 (a 2-layer ConvNet on CIFAR-10, SGD batch 128, cross-entropy): digits
instead of CIFAR-10 and an MLP of depth 4 (CPU); MSE and full batch, because with cross-entropy on the easy
digits the loss goes to zero and the sharpness falls away from the edge after ~100 steps (measured: the
previous setting, a 1-hidden-layer MLP with CE at LR 0.2, peaked at 0.8-1.2 and fell).

JSON keys (``DIR/super_consistency.json``):

- ``widths``, ``steps`` (measured steps), ``threshold`` (2), ``window`` (first and last step of the window in
  which the edge-of-stability claim is checked), ``band`` (0.15);
- ``curves``: ``{"mup"|"ntk": {width: {"lr_x_max_eig": [...], "ntk_max_eig": [...], "loss": [...]}}}`` over ``steps``
  (``loss``: the full-batch training loss at that step);
- ``mup_in_band``: per width, the fraction of measured steps in the window with ``|lr·λ_max/2 - 1| <= band``;
  ``mup_max_dev``: per width, the largest ``|lr·λ_max/2 - 1|`` in the window;
- ``window_mean``: ``{"mup"|"ntk": {width: mean lr·λ_max over the window}}``;
  ``mup_rel_spread``, ``ntk_rel_spread``: per measured step in the window, ``(max - min)/mean`` over widths;
- ``ntk_monotone``: whether the NTP window means decrease strictly with width;
- ``init``: ``{"mup"|"ntk": {width: lr·λ_max at step 0}}`` (the climb starts below the threshold);
- ``ntk_growth``: ``{"mup"|"ntk": {width: ntk/max_eig at the last step / at step 0}}``;
- ``lr``, ``depth``, ``n_train``, ``seed``, ``quick``.

Quick vs full: quick = widths 64/128/256, 160 steps, ``n_train`` 180, window steps 80-160 (the test; 16 s CPU,
22 s wall on 2 shared cores). Full = widths 64/128/256/512/1024, 400 steps, ``n_train`` 539, measured every 20 steps,
window steps 100-400, plus the top NTK eigenvalue: 11 min wall (451 s CPU) on 2 shared CPU cores, measured; width
1024 is most of it. Full run (seed 0): μP window means 2.02 / 2.00 / 1.99 / 1.99 / 2.00, every measured step in
the window within ±15% of 2 at every width except one point at width 256 (+16%); NTP window means 2.02 / 1.91 /
1.59 / 1.23 / 1.25 (widths 512 and 1024 both stay near their initial value: lazy).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lightning.pytorch as pl  # noqa: E402

from example_modules import MLP, DigitsDataModule  # noqa: E402
from lightning_align.callbacks.ntk import NTKSpectrum  # noqa: E402
from lightning_align.callbacks.parametrization import Parametrization  # noqa: E402
from lightning_align.callbacks.sharpness import Sharpness  # noqa: E402

NAME = "super_consistency"
SCHEMES = ("mup", "ntk")
BAND = 0.15


def settings(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(widths=[64, 128, 256], depth=4, steps=160, every=20, window_start=80, lr=0.4, val_fraction=0.9, ntk=False)
    return dict(widths=[64, 128, 256, 512, 1024], depth=4, steps=400, every=20, window_start=100, lr=0.4, val_fraction=0.7, ntk=True)


def run(scheme: str, width: int, cfg: dict[str, Any], args: Any, n_train: int) -> dict[str, list[float]]:
    pl.seed_everything(args.seed, verbose=False)
    model = MLP(width=width, depth=cfg["depth"], bias=False, init="normal", loss="mse", optimizer="sgd", lr=cfg["lr"])
    data = DigitsDataModule(batch_size=n_train, val_fraction=cfg["val_fraction"], seed=args.seed)
    memory = common.MemoryLogger()
    callbacks = [
        Parametrization(scheme=scheme, base_width=64, verbose=False),
        Sharpness(every_n_steps=cfg["every"], k=1, min_eig=False, probe_size=n_train, tol=1e-3),
    ]
    if cfg["ntk"]:
        callbacks.append(NTKSpectrum(every_n_steps=cfg["every"], k=1, probe_size=32, alignment=False, histograms=False))
    trainer = common.trainer(args.out, f"{scheme}_w{width}", callbacks, extra_loggers=(memory,), max_steps=cfg["steps"],
                             limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    steps = list(range(0, cfg["steps"] + 1, cfg["every"]))
    # train/loss is logged at the step it was computed on, before that step's update: Lightning's step index is then
    # the number of updates done *after* it, so the loss of the weights after k updates has index k + 1 (and k = 0 is 1)
    losses = memory.by_step("train/loss")

    def series(key: str) -> list[float]:
        return [memory.by_step(key).get(s, math.nan) for s in steps]

    return {
        "lr_x_max_eig": series("sharpness/lr_x_max_eig"),
        "threshold": series("sharpness/threshold"),
        "ntk_max_eig": series("ntk/max_eig"),
        "loss": [losses.get(s + 1, losses.get(s, math.nan)) for s in steps],
    }


def rel_spread(values: list[float]) -> float:
    return (max(values) - min(values)) / (sum(values) / len(values))


def make_figure(cfg: dict[str, Any], results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    colors = plt.cm.viridis([i / max(1, len(cfg["widths"]) - 1) for i in range(len(cfg["widths"]))])
    steps, thr = results["steps"], results["threshold"]
    top = max(max(results["curves"][s][str(w)]["lr_x_max_eig"]) for s in SCHEMES for w in cfg["widths"])
    for ax, scheme, title in ((axes[0, 0], "mup", "μP"), (axes[0, 1], "ntk", "NTP")):
        ax.axhspan(thr * (1 - BAND), thr * (1 + BAND), color="gray", alpha=0.15, label="±15% of 2/η")
        ax.axvspan(results["window"][0], results["window"][1], color="tab:orange", alpha=0.06)
        ax.axhline(thr, color="black", ls="--", lw=1, label="edge of stability (η·λ = 2)")
        for color, width in zip(colors, cfg["widths"]):
            ax.plot(steps, results["curves"][scheme][str(width)]["lr_x_max_eig"], "o-", ms=2.5, lw=1.3, color=color,
                    label=f"width {width}")
        ax.set_ylim(0, max(2.6, 1.05 * top))
        ax.set_title(f"{title}: sharpness in LR units, η·λmax (sharpness/lr_x_max_eig)")
        ax.set_xlabel("step (full-batch GD)")
        ax.set_ylabel("η · λmax(H)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower right")
    ax = axes[1, 0]
    for scheme, marker, label in (("mup", "o-", "μP"), ("ntk", "s--", "NTP")):
        ax.plot(cfg["widths"], [results["window_mean"][scheme][str(w)] for w in cfg["widths"]], marker, label=label)
    ax.axhline(thr, color="black", ls="--", lw=1)
    ax.axhspan(thr * (1 - BAND), thr * (1 + BAND), color="gray", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 2.6)
    ax.set_xlabel("width")
    ax.set_ylabel("mean η·λmax over the shaded window")
    ax.set_title(f"mean over steps {results['window'][0]}–{results['window'][1]} (orange window above)")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1, 1]
    for color, width in zip(colors, cfg["widths"]):
        for scheme, style in (("mup", "-"), ("ntk", "--")):
            ax.plot(steps, results["curves"][scheme][str(width)]["loss"], style, color=color,
                    label=f"{'μP' if scheme == 'mup' else 'NTP'} {width}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (MSE, full batch)")
    ax.set_title("training loss (solid μP, dashed NTP)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Super consistency: depth-{cfg['depth']} ReLU MLP, {results['n_train']} digits, full-batch GD, "
                 f"base LR η = {cfg['lr']:g} at base width 64")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = settings(args.quick)
    probe_data = DigitsDataModule(batch_size=1, val_fraction=cfg["val_fraction"], seed=args.seed)
    probe_data.setup()
    n_train = len(probe_data.train_set)
    curves = {s: {str(w): run(s, w, cfg, args, n_train) for w in cfg["widths"]} for s in SCHEMES}
    steps = list(range(0, cfg["steps"] + 1, cfg["every"]))
    thresholds = {v for s in SCHEMES for w in cfg["widths"] for v in curves[s][str(w)]["threshold"] if math.isfinite(v)}
    assert len(thresholds) == 1, thresholds  # plain SGD: 2 in every run
    thr = thresholds.pop()
    window = [i for i, s in enumerate(steps) if s >= cfg["window_start"]]

    def at(scheme: str, width: int) -> list[float]:
        return [curves[scheme][str(width)]["lr_x_max_eig"][i] for i in window]

    def across(scheme: str, i: int) -> list[float]:
        return [curves[scheme][str(w)]["lr_x_max_eig"][i] for w in cfg["widths"]]

    window_mean = {s: {str(w): statistics.mean(at(s, w)) for w in cfg["widths"]} for s in SCHEMES}
    ntp_means = [window_mean["ntk"][str(w)] for w in cfg["widths"]]
    results: dict[str, Any] = {
        "widths": cfg["widths"],
        "steps": steps,
        "threshold": thr,
        "window": [steps[window[0]], steps[window[-1]]],
        "band": BAND,
        "curves": {s: {w: {k: v for k, v in c.items() if k != "threshold"} for w, c in curves[s].items()} for s in SCHEMES},
        "mup_in_band": {str(w): sum(abs(v / thr - 1) <= BAND for v in at("mup", w)) / len(window) for w in cfg["widths"]},
        "mup_max_dev": {str(w): max(abs(v / thr - 1) for v in at("mup", w)) for w in cfg["widths"]},
        "window_mean": window_mean,
        "mup_rel_spread": [rel_spread(across("mup", i)) for i in window],
        "ntk_rel_spread": [rel_spread(across("ntk", i)) for i in window],
        "ntk_monotone": all(b < a for a, b in zip(ntp_means, ntp_means[1:])),
        "init": {s: {str(w): curves[s][str(w)]["lr_x_max_eig"][0] for w in cfg["widths"]} for s in SCHEMES},
        "ntk_growth": {s: {str(w): curves[s][str(w)]["ntk_max_eig"][-1] / curves[s][str(w)]["ntk_max_eig"][0]
                           for w in cfg["widths"]} for s in SCHEMES} if cfg["ntk"] else None,
        "lr": cfg["lr"], "depth": cfg["depth"], "n_train": n_train, "seed": args.seed, "quick": args.quick,
    }
    common.write_results(args.out, NAME, results, make_figure(cfg, results))
    for s in SCHEMES:
        print(f"{s}: init {[round(v, 2) for v in results['init'][s].values()]}, "
              f"mean over steps {results['window'][0]}-{results['window'][1]}: {[round(v, 2) for v in window_mean[s].values()]}")
    print(f"mup: in ±{BAND:.0%} band {results['mup_in_band']}, largest deviation {results['mup_max_dev']}")
    print(f"ntk window means decrease with width: {results['ntk_monotone']}; NTK growth {results['ntk_growth']}")
    return results


if __name__ == "__main__":
    main()
