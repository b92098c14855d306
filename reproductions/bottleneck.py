"""A deep ReLU net trained with an L2 ridge develops a bottleneck: low-rank middle representations and weights.

Claim (Jacot, "Bottleneck Structure in Learned Features: Low-Dimension vs Regularity Tradeoff",
arXiv 2305.19008, NeurIPS 2023; abstract): for large depth ``L``, at the minimizers of the L2-regularized cost,
"almost all hidden representations are approximately ``R^(0)(f)``-dimensional, and almost all weight matrices
``W_ℓ`` have ``R^(0)(f)`` singular values close to 1 while the others are ``O(L^{-1/2})``", where ``R^(0)(f)`` is
the bottleneck rank of the learned function (the smallest inner dimension ``k`` of a factorisation
``f = h∘g`` through ``R^k``); large learning rates are needed for an ``O(L)`` NTK.

The paper's experiment, as quoted by a third-party reproducibility summary (ri.k117.org; the paper's body
could not be read here): "A depth L = 25 network with a width of 200 trained on the task described in Section
5 with a ridge λ = 0.0002"; data: "we sample a 8-dimensional latent vector z, from which we define
x = g(z_1, …, z_8) ∈ R^20 and y = h(z_1, z_2) ∈ R^20 for two random functions g: R^8 → R^20 and h: R^2 → R^20
given by two shallow networks with random parameters" (optimal rank k = 2).

What is the paper's here and what is ours:

- **Paper's** (as quoted above): depth ``L = 25`` weight matrices (``MLP(depth=24)``: 24 hidden layers plus the
  readout), width 200, ReLU, ridge ``λ = 2e-4`` (the final value of our schedule), 8 latents, inputs
  ``x = g(z) ∈ R^20``, outputs ``y = h(z_1, z_2) ∈ R^20``, ``g`` and ``h`` random shallow networks.
- **Ours** (not read in the paper): the cost ``(1/N) Σ_i ‖f(x_i) − y_i‖² + λ‖θ‖²`` (squared error summed over
  the 20 outputs, averaged over samples; ``λ‖θ‖²`` over every weight and bias, i.e. SGD ``weight_decay = 2λ``);
  biases in every layer (bias-free: see below); He init; ``g``, ``h`` = one hidden tanh layer of width 100,
  weights ``N(0, 1/fan_in)``, hidden biases ``N(0, 1)``; inputs standardised per coordinate; 512 training
  points (plus 256 held out); full-batch gradient descent with heavy-ball momentum 0.95 and LR 0.01 (500
  warm-up steps), at the edge of stability (in a plain-PyTorch exploration run of this setting the top Hessian
  eigenvalue of the data term stayed at 283-410 during the constant-LR phase, against ``2(1+β)/η = 390``); and the
  **ridge schedule**: ``λ = 5e-4`` (2.5× the paper's) for the first 75% of the steps, then geometrically down
  to the paper's ``2e-4`` by 90%, held to the end, while the LR decays to 0 by a cosine over the last 25%.

Why the schedule: directions of ``W_ℓ`` that the data does not use (most of the He-initialised matrix) only
shrink through the ridge, by ``exp(−2 Σ_t λ_t η_t/(1−β))``; their squared norm has to fall ~100× (from
``2·width = 400`` per layer to a few), which at the paper's ``λ`` and this LR takes ~29,000 steps: 15 minutes of
training alone at the 0.032 s per step measured here (2 shared cores). At ``λ = 5e-4`` it takes ~11,500.
Larger ridges fail differently (exploration runs at depth 25, width 200): held at ``1e-3`` (momentum 0.95) the
middle layers collapsed to a rank-1 representation within ~1,000 steps of the start of the anneal; held at
``3e-3`` or ``1e-2`` (momentum 0.9) they collapsed during the hold; the collapsed nets fit the training set
only to 0.2-0.4 and the held-out set to 1.6-2.3 (the target's variance is 5.2) and stayed rank 1 after ``λ``
was lowered to ``2e-4``. Momentum 0.98 (LR 0.01) diverged; a bias-free net at this LR lost every ReLU (output 0) within
1,000 steps.

Training runs in a Lightning Trainer with :class:`lightning_align.RankMonitor` (representations = the outputs of
every Linear, i.e. pre-activations, centred, on all 512 training points). Representation ranks are read back
from the TensorBoard logs (``rank/repr_effective/<layer>``); the final singular values come from
:func:`lightning_align.measure.rank.weight_spectrum` (the function RankMonitor logs as
``rank/singular_values/<layer>``).

Command::

    python reproductions/bottleneck.py [--quick] --out runs/bottleneck

JSON keys (``bottleneck.json``):
    target_rank: the task's latent (bottleneck) dimension, 2.
    layers: the layer names, input to output (``layers.0`` … ``layers.{depth-1}``, ``readout``).
    repr_effective_rank, repr_effective_rank_init: layer → entropy effective rank of the centred
        pre-activations after training / at initialization (``rank/repr_effective/<layer>``).
    repr_effective_rank_hold: the same at the end of the ``λ = ridge_start`` phase (the last measurement before
        the ridge anneal starts; its step is ``hold_step``, the end of the anneal ``anneal_step``).
    singular_values: layer → singular values of the trained weight, largest first (first 16).
    k_near_one: layer → number of singular values with ``|s − 1| ≤ near_one_tol`` (RankMonitor's
        ``rank/weight_near_one/<layer>``; tolerance in ``near_one_tol``).
    k_above: layer → number of singular values above 0.5 (``rank/weight_above/<layer>``).
    middle_layers: the layers counted as "middle": the middle half of the hidden layers.
    middle_repr_effective_rank_mean, middle_k_near_one (list over middle layers), middle_next_singular_value
        (layer → the largest singular value after the top ``target_rank + 1``).
    middle_jacobian_sv_ratios: median over 32 training inputs of ``s_i/s_1`` (i = 1…5) for the Jacobian of the
        pre-activation of ``middle_jacobian_layer`` (``layers.<depth//2>``) with respect to the input (its local
        dimension).
    frobenius_sq: layer → ``‖W_ℓ‖² + ‖b_ℓ‖²`` (at a critical point of the cost, ``‖W_{ℓ+1}‖² = ‖W_ℓ‖² + ‖b_ℓ‖²``).
    target_effective_rank: effective rank of the centred training targets (the output's ceiling).
    train_loss (the data term ``(1/N)Σ‖f−y‖²``), test_loss (on the 256 held-out points), target_variance
        (``(1/N)Σ‖y−ȳ‖²``, the loss of the best constant), ridge_term (``λ‖θ‖²`` at the final ``λ``),
        stationarity (``‖∇C_λ‖ / ‖2λθ‖`` at the final ``λ``: 0 at a critical point of the paper's cost).
    train_seconds: wall time of ``trainer.fit`` (training plus RankMonitor).
    steps, lr, momentum, ridge, ridge_start, hold_fraction, anneal_fraction, warmup, depth, width, n_train,
        quick, seed: the run.

Settings. Full (no ``--quick``): the above, 14,000 steps, RankMonitor every 500. Quick (the test): 12 weight
matrices (11 hidden layers) of width 48 on 256 points, ``λ = 3e-3`` held for 75% of 5,000 steps then down to
``1e-3`` (the larger ridge makes the bulk decay in 5,000 steps; both values are ours), LR 0.02.

Observed, full run (seed 0; 7 min 37 s wall on 2 shared CPU cores, 448 s of it training): the middle
representations fall from effective rank 58-85 at init to 3.05-3.14 (layers 7-18), the first layers and the last
stay higher (13, 38, 15 … 4.9, 6.4, 7.8); every middle weight has exactly 3 singular values near 1 (1.13-1.27), the
next one 0.28-0.36 (still shrinking when the LR reached 0) — **3, not the latent dimension 2**. Locally the middle
representation is 2-dimensional: the Jacobian of layer 13's pre-activation with respect to the input has median
singular-value ratios 1 / 0.46 / 0.004 — a 2-dimensional surface spanning a 3-dimensional linear subspace.
Train loss 0.0008, held-out 0.17 (target variance 5.26); ``‖W_ℓ‖² + ‖b_ℓ‖²`` 8.0-8.3 over the middle layers
(balanced); ``‖∇C_λ‖/‖2λθ‖ = 0.79`` at the paper's ``λ``: not a critical point of the paper's cost — the
structure was formed at ``λ = 5e-4`` (middle ranks 3.16-3.27 at the end of that phase). Quick run (the test;
about 24 s on one core): the same picture at L = 12, width 48: middle ranks 2.87-3.02, 3 singular values at
1.08-1.28 and the 4th at 0.003-0.06 in 5 of the 7 middle layers (0.3 and 1.04 in the two nearest the output),
Jacobian ratios 1 / 0.71 / 0.06.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from example_modules import MLP  # noqa: E402
from example_modules.data.base import SplitDataModule  # noqa: E402
from lightning_align.callbacks.rank import RankMonitor  # noqa: E402
from lightning_align.measure.rank import representation_ranks, weight_spectrum  # noqa: E402

NAME = "bottleneck"
LATENT = 2
NEAR_ONE_TOL = 0.5

#: quick: the test; full: the paper's depth and width (see the module docstring for what is the paper's).
SETTINGS: dict[bool, dict[str, Any]] = {
    True: dict(depth=11, width=48, n_train=256, steps=5000, lr=0.02, momentum=0.95, warmup=300,
               ridge_start=3e-3, ridge=1e-3, hold=0.75, anneal=0.9, every=500),
    False: dict(depth=24, width=200, n_train=512, steps=14000, lr=0.01, momentum=0.95, warmup=500,
                ridge_start=5e-4, ridge=2e-4, hold=0.75, anneal=0.9, every=500),
}


def random_shallow_net(d_in: int, d_out: int, hidden: int, gen: torch.Generator):
    """``z ↦ W_2 tanh(W_1 z + b_1)``: weights ``N(0, 1/fan_in)``, hidden biases ``N(0, 1)`` (our choice of the
    paper's "shallow networks with random parameters")."""
    w1 = torch.randn(hidden, d_in, generator=gen) / d_in**0.5
    b1 = torch.randn(hidden, generator=gen)
    w2 = torch.randn(d_out, hidden, generator=gen) / hidden**0.5
    return lambda z: torch.tanh(z @ w1.T + b1) @ w2.T


class LatentTask(SplitDataModule):
    """The paper's task: ``z ~ N(0, I_8)``, ``x = g(z) ∈ R^20``, ``y = h(z_1, z_2) ∈ R^20`` (bottleneck rank 2).

    Inputs are standardised per coordinate (with the training statistics). The whole training split is one
    batch (full-batch gradient descent); the validation split is the held-out test set.
    """

    def __init__(self, n_train: int = 512, n_test: int = 256, latents: int = 8, active: int = LATENT,
                 dim: int = 20, hidden: int = 100, seed: int = 0) -> None:
        super().__init__(batch_size=n_train)
        self.n_train, self.n_test, self.latents, self.active, self.dim, self.hidden, self.seed = (
            n_train, n_test, latents, active, dim, hidden, seed)

    def build(self) -> tuple[Dataset, Dataset]:
        gen = torch.Generator().manual_seed(1000 + self.seed)
        g = random_shallow_net(self.latents, self.dim, self.hidden, gen)
        h = random_shallow_net(self.active, self.dim, self.hidden, gen)
        z = torch.randn(self.n_train + self.n_test, self.latents, generator=gen)
        x, y = g(z), h(z[:, : self.active])
        n = self.n_train
        x = (x - x[:n].mean(0)) / x[:n].std(0)
        return TensorDataset(x[:n], y[:n]), TensorDataset(x[n:], y[n:])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=len(self.train_set), shuffle=False)


def ridge_at(step: int, cfg: dict[str, Any]) -> float:
    """``λ_t``: ``ridge_start`` until ``hold·steps``, geometric to ``ridge`` by ``anneal·steps``, then ``ridge``."""
    start, end = cfg["hold"] * cfg["steps"], cfg["anneal"] * cfg["steps"]
    frac = min(1.0, max(0.0, (step - start) / (end - start)))
    return math.exp((1 - frac) * math.log(cfg["ridge_start"]) + frac * math.log(cfg["ridge"]))


def lr_factor(step: int, cfg: dict[str, Any]) -> float:
    """Linear warm-up over ``warmup`` steps, constant, then a cosine to 0 from ``hold·steps`` to the end."""
    warm = min(1.0, (step + 1) / cfg["warmup"])
    start = cfg["hold"] * cfg["steps"]
    if step < start:
        return warm
    return warm * 0.5 * (1 + math.cos(math.pi * (step - start) / (cfg["steps"] - start)))


class RidgeMLP(MLP):
    """The MLP with the cost ``(1/N)Σ‖f(x_i) − y_i‖² + λ_t‖θ‖²`` and heavy-ball gradient descent.

    The data term sums the squared error over outputs (``F.mse_loss`` would also average over them); the
    ridge is SGD's coupled ``weight_decay = 2λ_t`` on every parameter, set before each step from
    :func:`ridge_at`, so a fixed point of the optimizer at ``λ`` is a critical point of the cost.
    """

    def __init__(self, schedule: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.schedule = schedule

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - targets) ** 2).sum(-1).mean()

    def configure_optimizers(self) -> Any:
        cfg = self.schedule
        opt = torch.optim.SGD(self.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=2 * cfg["ridge_start"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: lr_factor(t, cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        lam = ridge_at(self.trainer.global_step, self.schedule)
        for group in self.trainer.optimizers[0].param_groups:
            group["weight_decay"] = 2 * lam
        self.log("ridge/lambda", lam)
        self.log("ridge/lr", self.trainer.optimizers[0].param_groups[0]["lr"])


def read_scalars(log_dir: Path, prefixes: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """All scalars whose tag starts with one of ``prefixes``, from the TensorBoard files in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith(prefixes)}


def cost_terms(model: RidgeMLP, x: torch.Tensor, y: torch.Tensor, lam: float) -> dict[str, float]:
    """Data term, ridge term and ``‖∇C_λ‖ / ‖2λθ‖`` (0 at a critical point of ``C_λ``) at the final ``λ``."""
    params = list(model.parameters())
    data = model.loss(model(x), y)
    grads = torch.autograd.grad(data, params)
    total = math.sqrt(sum(float(((g + 2 * lam * p.detach()) ** 2).sum()) for g, p in zip(grads, params)))
    ridge = math.sqrt(sum(float(((2 * lam * p.detach()) ** 2).sum()) for p in params))
    return {"train_loss": float(data), "ridge_term": lam * sum(float((p.detach() ** 2).sum()) for p in params),
            "stationarity": total / ridge}


def middle_jacobian_ratios(model: RidgeMLP, x: torch.Tensor, layer: int, points: int = 32) -> list[float]:
    """Median over ``points`` inputs of ``s_i / s_1`` (i = 1..5), the singular values of the Jacobian of the
    pre-activation of ``layers.<layer>`` with respect to the input: the representation's local dimension."""

    def rep(v: torch.Tensor) -> torch.Tensor:
        h = v
        for i, lin in enumerate(model.layers):
            h = lin(h)
            if i == layer:
                return h
            h = torch.relu(h)
        raise IndexError(layer)

    ratios = []
    for v in x[:points]:
        s = torch.linalg.svdvals(torch.autograd.functional.jacobian(lambda u: rep(u[None])[0], v))
        ratios.append((s[:5] / s[0]).tolist())
    return [statistics.median(r[i] for r in ratios) for i in range(5)]


def make_figure(results: dict, history: dict[str, list[tuple[int, float]]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers, k = results["layers"], results["target_rank"]
    idx = list(range(len(layers)))
    mid = [layers.index(n) for n in results["middle_layers"]]
    ticks = [str(i + 1) for i in idx]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))

    def log_ranks(ax, top):
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_yticks([v for v in (1, 2, 3, 5, 10, 20, 50, 100) if v <= top])

    ax = axes[0, 0]
    ax.plot(idx, [results["repr_effective_rank_init"][n] for n in layers], "o--", color="gray", label="at init")
    ax.plot(idx, [results["repr_effective_rank_hold"][n] for n in layers], "s:", color="C1", ms=4,
            label=f"end of the λ = {results['ridge_start']:g} phase (step {results['hold_step']})")
    ax.plot(idx, [results["repr_effective_rank"][n] for n in layers], "o-", color="C3",
            label=f"final (λ = {results['ridge']:g})")
    ax.axhline(k, ls=":", color="k", label=f"latent dimension {k}")
    ax.axvspan(mid[0] - 0.4, mid[-1] + 0.4, color="C0", alpha=0.08, label="middle layers")
    log_ranks(ax, 100)
    ax.set_xticks(idx, ticks, fontsize=7)
    ax.set_xlabel("layer ℓ (pre-activation of W_ℓ; input → output)")
    ax.set_ylabel("effective rank of centred representation")
    jac = results["middle_jacobian_sv_ratios"]
    ax.text(0.02, 0.03, f"layer {layers.index(results['middle_jacobian_layer']) + 1}: Jacobian w.r.t. the input, "
            "median s_i/s_1 = " + " / ".join(f"{v:.2g}" for v in jac[:3]), transform=ax.transAxes, fontsize=8,
            bbox=dict(facecolor="white", alpha=0.8, edgecolor="0.8"))
    ax.set_title("Representation rank per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[0, 1]
    ax.plot(idx, [results["k_near_one"][n] for n in layers], "o-", color="C3",
            label=f"#{{|s − 1| ≤ {results['near_one_tol']:g}}}")
    ax.plot(idx, [results["k_above"][n] for n in layers], "x--", color="C2", label="#{s > 0.5}")
    ax.axhline(k, ls=":", color="k", label=f"latent dimension {k}")
    ax.axvspan(mid[0] - 0.4, mid[-1] + 0.4, color="C0", alpha=0.08)
    ax.set_xticks(idx, ticks, fontsize=7)
    ax.set_yticks(range(0, max(max(results["k_above"].values()), 6) + 1, 2))
    ax.set_xlabel("layer ℓ (W_ℓ; input → output)")
    ax.set_ylabel("count of singular values of W_ℓ")
    ax.set_title("Weight singular values near 1, per layer (final)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1, 0]
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(layers):
        s = results["singular_values"][n][:10]
        ax.plot(range(1, len(s) + 1), s, ".-", lw=1.2 if i in mid else 0.6, alpha=1.0 if i in mid else 0.35,
                color=cmap(i / max(1, len(layers) - 1)))
    ax.axhline(1.0, ls=":", color="k", label="1")
    depth_L = len(layers)
    ax.axhline(depth_L**-0.5, ls="--", color="C3", lw=0.8, label=f"L^(-1/2) = {depth_L ** -0.5:.2f} (scale only)")
    ax.set_yscale("log")
    lowest = min(min(results["singular_values"][n][:10]) for n in layers)
    ax.set_yticks([v for v in (0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1, 1.5) if v >= 0.7 * lowest])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value s_i of W_ℓ")
    ax.set_title("Final weight spectra (middle layers bold; colour = depth, dark → light)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    steps_r = [s for s, _ in history.get(f"rank/repr_effective/{layers[mid[0]]}", [])]
    mean_rank = [statistics.fmean(dict(history[f"rank/repr_effective/{layers[j]}"])[s] for j in mid) for s in steps_r]
    mean_near = [statistics.fmean(dict(history[f"rank/weight_near_one/{layers[j]}"])[s] for j in mid) for s in steps_r]
    mean_above = [statistics.fmean(dict(history[f"rank/weight_above/{layers[j]}"])[s] for j in mid) for s in steps_r]
    ax.plot(steps_r, mean_rank, "o-", color="C3", ms=3, label="middle repr. effective rank")
    ax.plot(steps_r, mean_near, "s-", color="C0", ms=3, label=f"middle #{{|s − 1| ≤ {results['near_one_tol']:g}}}")
    ax.plot(steps_r, mean_above, "x--", color="C2", ms=3, label="middle #{s > 0.5}")
    ax.axhline(k, ls=":", color="k")
    log_ranks(ax, 200)
    ax.set_xlabel("training step")
    ax.set_ylabel("mean over middle layers")
    ax.axvspan(results["hold_step"], results["anneal_step"], color="C1", alpha=0.1,
               label=f"λ annealed {results['ridge_start']:g} → {results['ridge']:g} (LR: cosine to 0 from here to the end)")
    ax.set_title("During training (RankMonitor)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)

    fig.suptitle(f"Bottleneck structure: L = {depth_L} weight matrices, width {results['width']}, "
                 f"{results['n_train']} points, ridge λ = {results['ridge_start']:g} → {results['ridge']:g}, "
                 f"{results['steps']} full-batch steps (momentum {results['momentum']:g})")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    cfg = dict(SETTINGS[args.quick])
    depth, width, steps = cfg["depth"], cfg["width"], cfg["steps"]
    dm = LatentTask(n_train=cfg["n_train"], seed=args.seed)
    dm.setup()
    torch.manual_seed(args.seed)
    pl.seed_everything(args.seed, verbose=False)
    model = RidgeMLP(schedule=cfg, in_features=20, num_classes=20, width=width, depth=depth, bias=True,
                     init="kaiming", loss="mse", optimizer="sgd", lr=cfg["lr"], momentum=cfg["momentum"])
    monitor = RankMonitor(every_n_steps=cfg["every"], probe_size=cfg["n_train"], probe_seed=args.seed,
                          threshold=0.5, near_one_tol=NEAR_ONE_TOL)
    warnings.filterwarnings("ignore", message="The number of training batches")  # full batch: 1 batch per epoch
    trainer = common.trainer(args.out, f"{NAME}_seed{args.seed}", [monitor], max_steps=steps, limit_val_batches=0,
                             log_every_n_steps=50)
    start = time.time()
    trainer.fit(model, datamodule=dm)
    train_seconds = time.time() - start

    layers = [f"layers.{i}" for i in range(depth)] + ["readout"]
    history = read_scalars(Path(trainer.logger.log_dir), ("rank/", "ridge/"))
    hold_step = int(cfg["hold"] * steps)
    hold_at = max(s for s, _ in history[f"rank/repr_effective/{layers[0]}"] if s <= hold_step)
    repr_init = {n: history[f"rank/repr_effective/{n}"][0][1] for n in layers}
    repr_hold = {n: dict(history[f"rank/repr_effective/{n}"])[hold_at] for n in layers}
    metrics = trainer.callback_metrics
    repr_end = {n: float(metrics[f"rank/repr_effective/{n}"]) for n in layers}
    modules = dict(model.named_modules())
    spectra = {n: weight_spectrum(modules[n].weight, threshold=0.5, near_one_tol=NEAR_ONE_TOL) for n in layers}
    middle = layers[depth // 4 : depth - depth // 4]  # the middle half of the hidden layers
    (x, y), (x_test, y_test) = dm.train_set.tensors, dm.val_set.tensors
    terms = cost_terms(model, x, y, cfg["ridge"])
    with torch.no_grad():
        test_loss = float(model.loss(model(x_test), y_test))
    jac_ratios = middle_jacobian_ratios(model, x, depth // 2)
    results = {
        "target_rank": LATENT,
        "layers": layers,
        "repr_effective_rank": repr_end,
        "repr_effective_rank_init": repr_init,
        "repr_effective_rank_hold": repr_hold,
        "hold_step": hold_at,
        "anneal_step": int(cfg["anneal"] * steps),
        "singular_values": {n: [float(v) for v in spectra[n].singular_values[:16]] for n in layers},
        "k_near_one": {n: int(metrics[f"rank/weight_near_one/{n}"]) for n in layers},
        "k_above": {n: int(metrics[f"rank/weight_above/{n}"]) for n in layers},
        "near_one_tol": NEAR_ONE_TOL,
        "middle_layers": middle,
        "middle_repr_effective_rank_mean": statistics.fmean(repr_end[n] for n in middle),
        "middle_k_near_one": [int(metrics[f"rank/weight_near_one/{n}"]) for n in middle],
        "middle_next_singular_value": {n: float(spectra[n].singular_values[LATENT + 1]) for n in middle},
        "middle_jacobian_sv_ratios": jac_ratios,
        "middle_jacobian_layer": f"layers.{depth // 2}",
        "frobenius_sq": {n: float((modules[n].weight.detach() ** 2).sum() + (modules[n].bias.detach() ** 2).sum())
                         for n in layers},
        "target_effective_rank": representation_ranks(y).effective_rank,
        "target_variance": float(((y - y.mean(0)) ** 2).sum(-1).mean()),
        **terms,
        "test_loss": test_loss,
        "train_seconds": train_seconds,
        "steps": steps,
        "lr": cfg["lr"],
        "momentum": cfg["momentum"],
        "ridge": cfg["ridge"],
        "ridge_start": cfg["ridge_start"],
        "hold_fraction": cfg["hold"],
        "anneal_fraction": cfg["anneal"],
        "warmup": cfg["warmup"],
        "depth": depth,
        "width": width,
        "n_train": cfg["n_train"],
        "quick": args.quick,
        "seed": args.seed,
    }
    print({n: round(v, 2) for n, v in repr_end.items()}, results["k_near_one"], file=sys.stderr)
    common.write_results(args.out, NAME, results, make_figure(results, history))
    return results


if __name__ == "__main__":
    main()
