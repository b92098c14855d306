"""ELR spreads in a deep BatchNorm net: a small LR closes them, an LR above η* flips them, ELRWarmup acts for one step.

Claim (Mehmeti-Göpel & Wand, "On the Weight Dynamics of Deep Normalized Networks", ICML 2024, arXiv
2306.00700; the abstract is what could be read): in a deep normalized network the
effective learning rates ``‖Δw_ℓ‖/‖w_ℓ‖`` (ELRs) of the layers start out spread over orders of magnitude
(gradient explosion towards the input); with any constant LR their ratios converge to 1; beyond a critical LR
the disparities widen (v1 abstract: large LRs overshoot and leave vanishing gradients in the lower layers after
the first step); a hyper-parameter-free warm-up minimises the spread quickly; and the spread is linked to
trainability, most visibly in very deep nets.

What is tested here is *our reconstruction* of the critical LR and of the warm-up (docs/papers.md; the
paper's own formulas could not be read, and no code of the authors was found): ``η* = 1/sqrt(e_max·e_min)``
with ``e_ℓ = ‖g_ℓ‖/‖w_ℓ‖`` (the LR at which the extreme layers end the next SGD step with equal ELRs) and
:class:`lightning_align.ELRWarmup`, ``η_t = min(η_target, η*_t)`` until ``η*_t`` first reaches the target.

Command::

    python reproductions/elr_warmup.py [--quick] --out DIR [--seed S]

Setting: ``example_modules.MLP(norm="batch", bias=False)`` (``depth`` Linear-BatchNorm-ReLU layers, no skips,
width 64) on the embedded 8x8 digits, full-batch plain SGD, three runs from the same initial weights:
``constant`` (LR ``small_lr``, below η*), ``above`` (constant LR ``large_lr``, above η*) and ``warmup`` (target
``large_lr`` with :class:`lightning_align.ELRWarmup`). :class:`lightning_align.EffectiveLR` logs
``elr/spread``, ``elr/critical_lr`` and the per-layer ELRs after every step.

What it shows (quick and full): the spread closes under the small LR, flips and stays wide above η*; the warm-up
scales the first step down to η* and then stops, because η*_t jumps far above the target after that one
step (the first step at η* itself gives the lowest layer an ELR of ``sqrt(spread)`` ≈ 70, so its weight norm
grows ~70x: the overshoot the paper warns of); afterwards its spread reopens, lower than the constant-LR run's on
geometric mean (the share of steps at which it is lower moves with the seed and even the thread count: the net
is chaotic), and the warm-up run does not train (the loss stays at chance, ln 10). See docs/papers.md.

JSON keys (``DIR/elr_warmup.json``):

- ``steps``: the optimizer steps (1-based: the ELR of the update made at that step);
- ``constant``, ``warmup``, ``above``: ``elr/spread`` (max/min ELR over the scale-invariant layers) per step;
- ``critical_lr``: ``elr/critical_lr`` per step of the ``constant`` run; ``critical_lr_init``: its first value;
  ``critical_lr_runs``: the same per run;
- ``warmup_factor``: the factor ELRWarmup applied per step (1 once the warm-up is over); ``warmup_steps``: the
  number of steps it scaled;
- ``loss``: per run, the full-batch training loss before each step (``train/loss``); ``chance_loss``: ln 10;
- ``small_lr``, ``large_lr``, ``depth``, ``width``, ``batch_size``, ``seed``;
- ``summary``: per run, the spread at steps 1 and 2 (``first``, ``second``), its geometric mean over the
  first and the last quarter of the steps (``early_geo_mean``, ``last_quarter_geo_mean``),
  ``steps_to_50x_smaller`` (the first step whose spread is below 1/50 of step 1's) and ``last_quarter_loss``
  (mean training loss over the last quarter);
- ``after_warmup``: over the steps after the warm-up, ``below_fraction`` (the fraction of steps at which the
  warm-up run's spread is below the ``above`` run's) and both runs' geometric-mean spreads;
- ``profile``: per run, ``elr/layers.<i>`` for every hidden layer at steps 1, 2 and the last step;
  ``first_over_last_layer``: ``ELR(layers.0)/ELR(layers.<depth-1>)`` at those steps (> 1: the lower layers
  move faster, the gradient-explosion ordering; < 1: the ordering flipped).

Quick vs full: quick = depth 50, 60 full-batch steps (the 1,437 training digits per step), about 25 s on 2 shared
CPU cores. Full = the same net, 300 steps: about 2.5 min. (At depth 100 the critical LR at init is 0.0045,
below ``small_lr``: choose the LRs from the printed ``critical_lr_init`` when changing the depth.)
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
from lightning_align.callbacks.elr import EffectiveLR  # noqa: E402
from lightning_align.callbacks.warmup import ELRWarmup  # noqa: E402

NAME = "elr_warmup"
RUNS = ("constant", "above", "warmup")


def settings(quick: bool) -> dict[str, Any]:
    steps = 60 if quick else 300
    return dict(depth=50, width=64, steps=steps, batch_size=2048, small_lr=0.01, large_lr=1.0)


def run(kind: str, cfg: dict[str, Any], args: Any) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)  # same init and batch order in every run
    lr = cfg["small_lr"] if kind == "constant" else cfg["large_lr"]
    model = MLP(width=cfg["width"], depth=cfg["depth"], norm="batch", bias=False, optimizer="sgd", lr=lr)
    callbacks: list[pl.Callback] = [ELRWarmup()] if kind == "warmup" else []
    callbacks.append(EffectiveLR(every_n_steps=1, figure_every=max(1, cfg["steps"] // 4)))
    memory = common.MemoryLogger()
    trainer = common.trainer(args.out, kind, callbacks, extra_loggers=(memory,), max_steps=cfg["steps"], limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule(batch_size=cfg["batch_size"], seed=args.seed))
    steps = range(1, cfg["steps"] + 1)

    def series(key: str, default: float = math.nan) -> list[float]:
        return [memory.by_step(key).get(s, default) for s in steps]

    factors = memory.by_step("elr/warmup_factor")
    layers = [f"elr/layers.{i}" for i in range(cfg["depth"])]
    return {
        "profile": {str(s): [memory.by_step(name).get(s, math.nan) for name in layers] for s in (1, 2, cfg["steps"])},
        "spread": series("elr/spread"),
        "critical_lr": series("elr/critical_lr"),
        "lr_over_critical": series("elr/lr_over_critical"),
        # one value per training step, in order: the loss of the weights before update i + 1
        "loss": memory.values("train/loss")[: cfg["steps"]],
        # ELRWarmup logs the factor while warming up and 1.0 once when done; after that it is 1
        "warmup_factor": [factors.get(s, 1.0 if any(k <= s and v >= 1.0 for k, v in factors.items()) else math.nan)
                          for s in steps] if kind == "warmup" else [],
    }


def geo_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(statistics.mean(math.log(v) for v in finite)) if finite else math.nan


def summarize(spread: list[float], loss: list[float], tail: int) -> dict[str, float]:
    """Spread at steps 1 and 2, its geometric mean over the first and last ``tail`` steps (after step 1),
    the first step at which it is below 1/50 of its step-1 value (``null``: never), and the mean loss of the
    last ``tail`` steps."""
    below = next((i + 1 for i, v in enumerate(spread) if math.isfinite(v) and v < spread[0] / 50), math.nan)
    return {"first": spread[0], "second": spread[1], "early_geo_mean": geo_mean(spread[1:tail + 1]),
            "last_quarter_geo_mean": geo_mean(spread[-tail:]), "steps_to_50x_smaller": below,
            "last_quarter_loss": statistics.mean(loss[-tail:])}


def make_figure(cfg: dict[str, Any], results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    (ax, ax2), (ax4, ax3) = axes
    labels = {
        "constant": f"constant lr {cfg['small_lr']} (< η*)",
        "above": f"constant lr {cfg['large_lr']} (> η*)",
        "warmup": f"ELRWarmup, target lr {cfg['large_lr']}",
    }
    colors = {"constant": "tab:blue", "above": "tab:red", "warmup": "tab:green"}
    steps = results["steps"]
    for kind in RUNS:
        ax.plot(steps, results[kind], color=colors[kind], label=labels[kind], lw=1.3)
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("elr/spread (max/min ELR over layers)")
    ax.set_title(f"(a) ELR spread, BN-ReLU MLP depth {cfg['depth']} (no skips)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    used = [cfg["large_lr"] * f for f in results["warmup_factor"]]
    ax2.plot(steps, results["critical_lr_runs"]["warmup"], color="tab:green", ls="-", label="η*_t of the ELRWarmup run")
    ax2.plot(steps, used, color="black", lw=2, drawstyle="steps-post", label="lr used by ELRWarmup")
    ax2.plot(steps, results["critical_lr"], color="tab:blue", ls=":", label="η*_t of the constant small-lr run")
    ax2.axhline(cfg["large_lr"], color="tab:red", ls="--", label=f"target lr {cfg['large_lr']}")
    ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("(b) η* jumps above the target after one step: the warm-up ends")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    for kind in RUNS:
        ax4.plot(range(len(results["loss"][kind])), results["loss"][kind], color=colors[kind], label=labels[kind], lw=1.3)
    ax4.axhline(results["chance_loss"], color="gray", ls="--", lw=1, label="chance (ln 10)")
    ax4.set_xlabel("step")
    ax4.set_ylabel("training loss (cross-entropy, full batch)")
    ax4.set_title("(c) training loss")
    ax4.legend(fontsize=8)
    ax4.grid(alpha=0.3)
    for kind, step, style in (("warmup", "1", "-"), ("warmup", "2", "--"), ("above", "1", ":")):
        ax3.plot(range(cfg["depth"]), results["profile"][kind][step], style, color=colors[kind],
                 label=f"{labels[kind]}, update {step}")
    ax3.axhline(1.0, color="gray", ls="--", lw=1)
    ax3.set_yscale("log")
    ax3.set_xlabel("layer index ℓ (layers.ℓ)")
    ax3.set_ylabel("ELR ‖Δw‖/‖w‖ of the update")
    ax3.set_title("(d) per-layer ELR: update 1 overshoots (ELR ≫ 1) at the bottom")
    ax3.legend(fontsize=8)
    ax3.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = settings(args.quick)
    runs = {kind: run(kind, cfg, args) for kind in RUNS}
    steps = list(range(1, cfg["steps"] + 1))
    tail = max(1, cfg["steps"] // 4)
    factor = runs["warmup"]["warmup_factor"]
    warm = sum(1 for f in factor if math.isfinite(f) and f < 1.0)
    after = range(warm, cfg["steps"])  # indices of the steps after the warm-up
    results: dict[str, Any] = {
        "steps": steps,
        **{kind: runs[kind]["spread"] for kind in RUNS},
        "critical_lr": runs["constant"]["critical_lr"],
        "critical_lr_init": runs["constant"]["critical_lr"][0],
        "critical_lr_runs": {kind: runs[kind]["critical_lr"] for kind in RUNS},
        "warmup_factor": factor,
        "warmup_steps": warm,
        "loss": {kind: runs[kind]["loss"] for kind in RUNS},
        "chance_loss": math.log(10),
        "summary": {kind: summarize(runs[kind]["spread"], runs[kind]["loss"], tail) for kind in RUNS},
        "after_warmup": {
            "below_fraction": sum(runs["warmup"]["spread"][i] < runs["above"]["spread"][i] for i in after) / len(after),
            "warmup_geo_mean": geo_mean([runs["warmup"]["spread"][i] for i in after]),
            "above_geo_mean": geo_mean([runs["above"]["spread"][i] for i in after]),
        },
        "profile": {kind: runs[kind]["profile"] for kind in RUNS},
        "first_over_last_layer": {kind: {step: p[0] / p[-1] for step, p in runs[kind]["profile"].items()} for kind in RUNS},
        **{k: cfg[k] for k in ("small_lr", "large_lr", "depth", "width", "batch_size")},
        "seed": args.seed, "quick": args.quick,
    }
    common.write_results(args.out, NAME, results, make_figure(cfg, results))
    for kind in RUNS:
        s = results["summary"][kind]
        print(f"{kind}: spread {s['first']:.1f} at step 1, {s['second']:.1f} at step 2, early {s['early_geo_mean']:.1f}, "
              f"last quarter {s['last_quarter_geo_mean']:.1f}, loss {s['last_quarter_loss']:.3f}; "
              f"ELR layer 0 / last layer: {results['first_over_last_layer'][kind]}")
    print(f"critical lr at init {results['critical_lr_init']:.3g}; warm-up steps {warm}; η* of the warm-up run at step 2 "
          f"{runs['warmup']['critical_lr'][1]:.3g}; after the warm-up: {results['after_warmup']}")
    return results


if __name__ == "__main__":
    main()
