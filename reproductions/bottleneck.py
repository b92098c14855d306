"""A deep bias-free ReLU net with a small L2 penalty develops a bottleneck at the latent dimension.

Claim (Jacot, "Bottleneck Structure in Learned Features: Low-Dimension vs Regularity Tradeoff",
arXiv 2305.19008, NeurIPS 2023): trained with weight decay to convergence on a task
whose target factors through a low-dimensional latent (``f* = g∘h``, ``h: R^16 → R^2``), a deep ReLU
network without biases develops a *bottleneck*: the middle layers' representations become nearly
latent-dimensional while the first and last layers stay higher-dimensional, and the middle weights'
spectra concentrate on a few directions (a few singular values of order one, the rest near zero).

Training: ``example_modules.MLP(bias=False, init="kaiming", loss="mse")``, full-batch gradient
descent with weight decay on ``TeacherDataModule(latent_dim=2)`` (16 inputs, 16 regression outputs),
in a Lightning Trainer with :class:`lightning_align.RankMonitor` (representations = the outputs of
every Linear, centred, on a fixed probe batch of 256 training points). Representation ranks are read
back from the TensorBoard logs (``rank/repr_effective/<layer>`` at the first and last measurement);
the final singular values come from :func:`lightning_align.measure.rank.weight_spectrum` (the same
function RankMonitor logs as the histograms ``rank/singular_values/<layer>``).

Observed (quick mode, several seeds): middle representations settle at an effective rank of about 3
and middle weights keep 3 singular values of order one, the rest about 0.25 (0.06 in full mode): the 2 latent
dimensions plus, we believe, one direction that a bias-free (positively homogeneous) network needs
to stand in for the teacher's biases. The first layer stays near the input dimension (about 15) and
the output layer above the middle (about 3.2-3.8; the target itself has effective rank about 5).

Command::

    python reproductions/bottleneck.py [--quick] --out runs/bottleneck

JSON keys (``bottleneck.json``):
    target_rank: the latent dimension of the task (2).
    layers: the layer names, input to output (``layers.0`` … ``layers.{depth-1}``, ``readout``).
    repr_effective_rank, repr_effective_rank_init: layer → entropy effective rank of the centred
        representation after training / at initialization (``rank/repr_effective/<layer>``).
    singular_values: layer → singular values of the trained weight, largest first (first 16).
    k_near_one: layer → number of singular values with ``|s − 1| ≤ near_one_tol`` (RankMonitor's
        ``rank/weight_near_one/<layer>``; tolerance in ``near_one_tol``).
    k_above: layer → number of singular values above 0.5 (``rank/weight_above/<layer>``).
    middle_layers: the layers counted as "middle": the middle half of the hidden layers.
    middle_repr_effective_rank_mean: mean of ``repr_effective_rank`` over ``middle_layers``.
    target_effective_rank: effective rank of the centred training targets (the output's ceiling).
    train_loss, steps, lr, weight_decay, depth, width: the run.

Targets are scaled to unit standard deviation. Settings: quick: 8 hidden layers of width 64, lr 0.1,
weight decay 4e-3 (larger than the 1e-3-1e-4 that our notes suggest -- its design, not a number read in the
paper -- so that the L2 term acts within a few thousand
steps), 6,000 full-batch steps (about 35 s on 2 CPU cores, measured). It reaches the bottleneck in the
representations, but not full convergence: the small singular values of the middle weights are still
about 0.25 (not near 0) and the layers next to the output keep a 4th direction. Full: 12 hidden layers
of width 100, lr 0.1, weight decay 1e-3 (our notes' suggested range; the paper's own experiment, per issue 16 and
not verified here, is depth 25, width 200, ridge ~2e-4), 40,000 steps (about 6 min, measured on 2
shared cores). Full run (seed 0): representation ranks 14.6, 17.7, 4.9, then 3.6 → 2.8 → 3.0 in the middle,
3.9 and 4.4 at the last hidden layer and the output; middle weights keep 3 singular values about 1.4, a
fourth one still decaying (about 0.5) and the rest about 0.06.
"""

from __future__ import annotations

import statistics
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset, TensorDataset  # noqa: E402

from example_modules import MLP, TeacherDataModule  # noqa: E402
from lightning_align.callbacks.rank import RankMonitor  # noqa: E402
from lightning_align.measure.rank import representation_ranks, weight_spectrum  # noqa: E402

NAME = "bottleneck"
LATENT = 2
NEAR_ONE_TOL = 0.5


class FullBatchTeacher(TeacherDataModule):
    """The teacher task with targets scaled to unit standard deviation and the whole training split as one
    batch (full-batch gradient descent)."""

    def build(self) -> tuple[Dataset, Dataset]:
        train, val = super().build()
        scale = train.tensors[1].std()
        return TensorDataset(train.tensors[0], train.tensors[1] / scale), TensorDataset(val.tensors[0], val.tensors[1] / scale)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=len(self.train_set), shuffle=False)


def read_scalars(log_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars under ``prefix`` from the TensorBoard event files in ``log_dir``: tag → [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"] if t.startswith(prefix)}


def make_figure(results: dict, history: dict[str, list[tuple[int, float]]]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = results["layers"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ax = axes[0]
    idx = range(len(layers))
    ax.plot(idx, [results["repr_effective_rank_init"][n] for n in layers], "o--", color="gray", label="at init")
    ax.plot(idx, [results["repr_effective_rank"][n] for n in layers], "o-", color="C3", label="after training")
    ax.axhline(results["target_rank"], ls=":", color="k", label=f"latent dimension {results['target_rank']}")
    mid = [layers.index(n) for n in results["middle_layers"]]
    ax.axvspan(mid[0] - 0.3, mid[-1] + 0.3, color="C0", alpha=0.08, label="middle layers")
    ax.set_xticks(list(idx), [n.replace("layers.", "h") for n in layers], rotation=45)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([1, 2, 3, 5, 10, 20, 40])
    ax.set_xlabel("layer (input → output)")
    ax.set_ylabel("effective rank of representation")
    ax.set_title("Representation rank per layer")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    cmap = plt.get_cmap("viridis")
    for i, n in enumerate(layers):
        s = results["singular_values"][n]
        ax.plot(range(1, len(s) + 1), s, ".-", color=cmap(i / max(1, len(layers) - 1)), label=n)
    ax.axhline(1.0, ls=":", color="k")
    ax.set_xlabel("index i")
    ax.set_ylabel("singular value s_i of W")
    ax.set_title("Trained weight spectra")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)

    ax = axes[2]
    for i, n in enumerate(layers):
        points = history.get(f"rank/repr_effective/{n}", [])
        ax.plot([p[0] for p in points], [p[1] for p in points], color=cmap(i / max(1, len(layers) - 1)), label=n)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([2, 3, 5, 10, 20, 40])
    ax.set_xlabel("training step")
    ax.set_ylabel("effective rank of representation")
    ax.set_title("RankMonitor during training")
    ax.legend(fontsize=6, ncol=2)
    ax.grid(alpha=0.3)
    fig.suptitle(f"Bottleneck structure: {results['depth']} hidden ReLU layers, width {results['width']}, "
                 f"weight decay {results['weight_decay']:g}, {results['steps']} GD steps")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    if args.quick:
        depth, width, lr, wd, steps, every = 8, 64, 0.1, 4e-3, 6000, 500
    else:
        depth, width, lr, wd, steps, every = 12, 100, 0.1, 1e-3, 40000, 2000
    dm = FullBatchTeacher(in_features=16, out_features=16, latent_dim=LATENT, n_samples=512, seed=args.seed)
    torch.manual_seed(args.seed)
    model = MLP(in_features=16, num_classes=16, width=width, depth=depth, bias=False, init="kaiming",
                loss="mse", optimizer="sgd", lr=lr, weight_decay=wd)
    monitor = RankMonitor(every_n_steps=every, probe_size=256, probe_seed=args.seed, threshold=0.5, near_one_tol=NEAR_ONE_TOL)
    warnings.filterwarnings("ignore", message="The number of training batches")  # full batch: 1 batch per epoch
    run_name = f"{NAME}_seed{args.seed}"
    trainer = common.trainer(args.out, run_name, [monitor], max_steps=steps, limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(model, datamodule=dm)

    layers = [f"layers.{i}" for i in range(depth)] + ["readout"]
    history = read_scalars(Path(trainer.logger.log_dir), "rank/")
    metrics = trainer.callback_metrics
    repr_init = {n: history[f"rank/repr_effective/{n}"][0][1] for n in layers}
    repr_end = {n: float(metrics[f"rank/repr_effective/{n}"]) for n in layers}
    modules = dict(model.named_modules())
    spectra = {n: weight_spectrum(modules[n].weight, threshold=0.5, near_one_tol=NEAR_ONE_TOL) for n in layers}
    middle = layers[depth // 4 : depth - depth // 4]  # the middle half of the hidden layers
    results = {
        "target_rank": LATENT,
        "layers": layers,
        "repr_effective_rank": repr_end,
        "repr_effective_rank_init": repr_init,
        "singular_values": {n: [float(v) for v in spectra[n].singular_values[:16]] for n in layers},
        "k_near_one": {n: int(metrics[f"rank/weight_near_one/{n}"]) for n in layers},
        "k_above": {n: int(metrics[f"rank/weight_above/{n}"]) for n in layers},
        "near_one_tol": NEAR_ONE_TOL,
        "middle_layers": middle,
        "middle_repr_effective_rank_mean": statistics.fmean(repr_end[n] for n in middle),
        "target_effective_rank": representation_ranks(dm.train_set.tensors[1]).effective_rank,
        "train_loss": float(metrics["train/loss"]),
        "steps": steps,
        "lr": lr,
        "weight_decay": wd,
        "depth": depth,
        "width": width,
    }
    print({n: round(v, 2) for n, v in repr_end.items()}, results["k_near_one"], file=sys.stderr)
    common.write_results(args.out, NAME, results, make_figure(results, history))
    return results


if __name__ == "__main__":
    main()
