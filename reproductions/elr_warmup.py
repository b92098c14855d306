"""ELR spreads in deep BatchNorm nets: a small constant LR closes them, an LR above η* widens them, ELRWarmup closes them fastest.

Claim (Mehmeti-Göpel & Wand, "On the Weight Dynamics of Deep Normalized Networks", ICML 2024, arXiv
2306.00700; seed 004 in ``papers.md``): in a deep BatchNorm-ReLU network without skip connections, the
effective learning rates ``‖Δw_ℓ‖/‖w_ℓ‖`` of the scale-invariant layers start out spread over orders of
magnitude (gradient explosion towards the input). Under a constant learning rate below the critical LR
``η* = 1/sqrt(e_max·e_min)`` the spread (max/min over layers) shrinks towards 1; at a constant learning rate
far above ``η*`` the ordering flips after the first step and the spread stays large; the
hyper-parameter-free warm-up ``η_t = min(η_target, η*_t)`` (:class:`lightning_align.ELRWarmup`) at that same
large target closes it fastest.

Command::

    python reproductions/elr_warmup.py [--quick] --out DIR [--seed S]

Setting: ``example_modules.MLP(norm="batch", bias=False)`` (``depth`` Linear-BatchNorm-ReLU layers, no skips,
width 64) on the embedded 8x8 digits, plain SGD, three runs from the same initial weights and batches:
``constant`` (LR ``small_lr``, below η*), ``above`` (LR ``large_lr``, far above η*) and ``warmup`` (target
``large_lr`` with :class:`lightning_align.ELRWarmup`). :class:`lightning_align.EffectiveLR` logs
``elr/spread`` and ``elr/critical_lr`` after every step (read back from the logger).

JSON keys (``DIR/elr_warmup.json``):

- ``steps``: the optimizer steps (1-based: the ELR of the update made at that step);
- ``constant``, ``warmup``, ``above``: ``elr/spread`` (max/min ELR over the scale-invariant layers) per step;
- ``critical_lr``: ``elr/critical_lr`` per step of the ``constant`` run (η* from that step's gradients);
  ``critical_lr_init``: its first value;
- ``warmup_factor``: the factor ELRWarmup applied per step (1 once the warm-up is over);
- ``small_lr``, ``large_lr``, ``depth``, ``width``, ``batch_size``, ``seed``;
- ``summary``: per run, the spread at steps 1 and 2 (``first``, ``second``), its geometric mean over the
  first and the last quarter of the steps (``early_geo_mean``, ``last_quarter_geo_mean``) and
  ``steps_to_50x_smaller`` (the first step whose spread is below 1/50 of step 1's);
- ``profile``: per run, ``elr/layers.<i>`` for every hidden layer at steps 1, 2 and the last step;
  ``first_over_last_layer``: ``ELR(layers.0)/ELR(layers.<depth-1>)`` at those steps (> 1: the lower layers
  move faster, the gradient-explosion ordering; < 1: the ordering flipped).

Quick vs full: quick = depth 50, 60 full-batch steps (the 1,437 training digits per step); 18 s wall on 2
shared CPU cores. Full = the same net, 500 full-batch steps: 94 s measured. (At depth 100 the critical LR at
init is 0.0045, below ``small_lr``: choose the LRs from the printed ``critical_lr_init`` when changing the depth.)
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
    if quick:
        return dict(depth=50, width=64, steps=60, batch_size=2048, small_lr=0.01, large_lr=1.0)
    return dict(depth=50, width=64, steps=500, batch_size=2048, small_lr=0.01, large_lr=1.0)


def run(kind: str, cfg: dict[str, Any], args: Any) -> dict[str, list[float]]:
    pl.seed_everything(args.seed, verbose=False)  # same init and batch order in every run
    lr = cfg["small_lr"] if kind == "constant" else cfg["large_lr"]
    model = MLP(width=cfg["width"], depth=cfg["depth"], norm="batch", bias=False, optimizer="sgd", lr=lr)
    callbacks: list[pl.Callback] = [ELRWarmup()] if kind == "warmup" else []
    callbacks.append(EffectiveLR(every_n_steps=1, figure_every_n_steps=max(1, cfg["steps"] // 4)))
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
        # ELRWarmup logs the factor while warming up and 1.0 once when done; after that it is 1
        "warmup_factor": [factors.get(s, 1.0 if any(k <= s and v >= 1.0 for k, v in factors.items()) else math.nan)
                          for s in steps] if kind == "warmup" else [],
    }


def geo_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v) and v > 0]
    return math.exp(statistics.mean(math.log(v) for v in finite)) if finite else math.nan


def summarize(spread: list[float], tail: int) -> dict[str, float]:
    """Spread at steps 1 and 2, its geometric mean over the first and last ``tail`` steps (after step 1),
    and the first step at which it is below 1/50 of its step-1 value (``null``: never)."""
    below = next((i + 1 for i, v in enumerate(spread) if math.isfinite(v) and v < spread[0] / 50), math.nan)
    return {"first": spread[0], "second": spread[1], "early_geo_mean": geo_mean(spread[1:tail + 1]),
            "last_quarter_geo_mean": geo_mean(spread[-tail:]), "steps_to_50x_smaller": below}


def make_figure(cfg: dict[str, Any], results: dict[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax3, ax2) = plt.subplots(1, 3, figsize=(16, 4.4))
    labels = {
        "constant": f"constant lr {cfg['small_lr']} (< η*)",
        "above": f"constant lr {cfg['large_lr']} (> η*)",
        "warmup": f"ELRWarmup, target lr {cfg['large_lr']}",
    }
    for kind, color in zip(RUNS, ("tab:blue", "tab:red", "tab:green")):
        ax.plot(results["steps"], results[kind], color=color, label=labels[kind])
    ax.axhline(1.0, color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("elr/spread (max/min ELR over layers)")
    ax.set_title(f"ELR spread, BN-ReLU MLP depth {cfg['depth']} (no skips)")
    ax.legend()
    ax.grid(alpha=0.3)
    for kind, color in zip(RUNS, ("tab:blue", "tab:red", "tab:green")):
        ax3.plot(range(cfg["depth"]), results["profile"][kind]["2"], color=color, label=labels[kind])
    ax3.set_yscale("log")
    ax3.set_xlabel("layer index ℓ (layers.ℓ)")
    ax3.set_ylabel("ELR ‖Δw‖/‖w‖ at step 2")
    ax3.set_title("per-layer ELR after the first update (elr/<layer>)")
    ax3.grid(alpha=0.3)
    ax2.plot(results["steps"], results["critical_lr"], color="tab:blue", label="η* (elr/critical_lr, constant run)")
    ax2.axhline(cfg["small_lr"], color="tab:blue", ls=":", label=f"small lr {cfg['small_lr']}")
    ax2.axhline(cfg["large_lr"], color="tab:red", ls=":", label=f"large lr {cfg['large_lr']}")
    used = [cfg["large_lr"] * f for f in results["warmup_factor"]]
    ax2.plot(results["steps"], used, color="tab:green", label="lr used by ELRWarmup")
    ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("step")
    ax2.set_ylabel("learning rate")
    ax2.set_title("critical LR and the warm-up")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = settings(args.quick)
    runs = {kind: run(kind, cfg, args) for kind in RUNS}
    steps = list(range(1, cfg["steps"] + 1))
    tail = max(1, cfg["steps"] // 4)
    results: dict[str, Any] = {
        "steps": steps,
        **{kind: runs[kind]["spread"] for kind in RUNS},
        "critical_lr": runs["constant"]["critical_lr"],
        "critical_lr_init": runs["constant"]["critical_lr"][0],
        "warmup_factor": runs["warmup"]["warmup_factor"],
        "summary": {kind: summarize(runs[kind]["spread"], tail) for kind in RUNS},
        "profile": {kind: runs[kind]["profile"] for kind in RUNS},
        "first_over_last_layer": {kind: {step: p[0] / p[-1] for step, p in runs[kind]["profile"].items()} for kind in RUNS},
        **{k: cfg[k] for k in ("small_lr", "large_lr", "depth", "width", "batch_size")},
        "seed": args.seed, "quick": args.quick,
    }
    common.write_results(args.out, NAME, results, make_figure(cfg, results))
    for kind in RUNS:
        s = results["summary"][kind]
        print(f"{kind}: spread {s['first']:.1f} at step 1, {s['second']:.1f} at step 2, early {s['early_geo_mean']:.1f}, "
              f"last quarter {s['last_quarter_geo_mean']:.1f}; ELR layer 0 / last layer: {results['first_over_last_layer'][kind]}")
    print(f"critical lr at init {results['critical_lr_init']:.3g}")
    return results


if __name__ == "__main__":
    main()
