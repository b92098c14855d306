"""Backward-feature alignment at initialization falls with depth in ReLU MLPs, not in 1/√L ResNets.

Claim (Chizat & Netrapalli, "The Feature Speed Formula", arXiv 2311.18718, NeurIPS 2024):
at random initialization the cosine of the backward-feature angle θ_L between the backward pass
``-b_L = -dF/df_L`` and the first-order feature change ``δf_L`` of one gradient step,

- decays like ``1/√L`` with depth ``L`` in ReLU MLPs with He init,
- stays of order one in ReLU ResNets with branch scale ``β = 1/√L``,
- decays with depth in ResNets with branch scale ``β = 1``.

Everything is measured with :func:`lightning_align.measure.alignment.feature_speed` on
``example_modules.MLP`` / ``example_modules.ResMLP`` (He init ``init="kaiming"``, no biases, float64),
on one standardised digit image, with a generic backward vector (the loss ``⟨g, output⟩`` with ``g``
Gaussian) and the paper's per-layer learning rates ``η_k = 1/‖a_{k−1}‖²`` (``a_{k−1}`` the layer input).
Features: the MLP's last pre-activation (its readout of width ``width``, so ``L`` linear layers in all);
the ResNet's residual stream after the last block (``blocks.{L-1}``).

Command::

    python reproductions/feature_speed.py [--quick] --out runs/feature_speed

JSON keys (``feature_speed.json``):
    depths: the depths ``L``.
    mlp_cos, resnet_sqrt_cos, resnet_one_cos: mean ``cos θ_L`` over seeds, one per depth (ReLU MLP,
        ResNet with ``β = 1/√L``, ResNet with ``β = 1``).
    mlp_cos_std, resnet_sqrt_cos_std, resnet_one_cos_std: standard deviation over seeds.
    mlp_cos_sqrt_depth: ``cos θ_L · √L`` for the MLP (roughly constant if ``cos θ ∝ 1/√L``).
    width, seeds: the settings; reference: this project's own numpy reference computation (docs/papers.md,
        table (a): width 256, 5 seeds). It is *not* a table of the paper: the paper's text was not read, and
        its figures' values are not reproduced here (see docs/papers.md).

Settings: quick: width 128, depths 2-32, 4 seeds (about 7 s on 2 CPU cores, measured); full: width 256,
depths 2-64, 8 seeds (about 17 s, measured). Quick run (seed 0): MLP .82 .58 .45 .34 .25, ResNet 1/√L
.73 .68 .64 .64 .60, ResNet β = 1 .68 .52 .33 .24 .16 at L = 2, 4, 8, 16, 32.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from example_modules import MLP, DigitsDataModule, ResMLP  # noqa: E402
from lightning_align.measure.alignment import feature_speed  # noqa: E402

NAME = "feature_speed"
KINDS = ("mlp", "resnet_sqrt", "resnet_one")
LABELS = {"mlp": "ReLU MLP", "resnet_sqrt": "ResNet, β = 1/√L", "resnet_one": "ResNet, β = 1"}
# Our own numpy reference (docs/papers.md): width 256, He init, 5 seeds, θ at ℓ = L.
# Not numbers from the paper (whose text was not read); the paper's claim is the 1/√L law and its ResNet contrast.
REFERENCE = {
    "depths": [2, 4, 8, 16, 32, 64],
    "mlp": [0.82, 0.60, 0.44, 0.34, 0.24, 0.19],
    "resnet_sqrt": [0.88, 0.79, 0.75, 0.71, 0.68, 0.67],
    "resnet_one": [0.82, 0.57, 0.40, 0.26, 0.16, 0.14],
}


def build(kind: str, depth: int, width: int, in_features: int) -> tuple[nn.Module, str]:
    """The network of ``depth`` layers and the name of the module whose output is the feature ``f_L``."""
    if kind == "mlp":  # depth - 1 hidden layers + a width-wide readout = depth linear layers
        net = MLP(in_features, num_classes=width, width=width, depth=depth - 1, bias=False, init="kaiming")
        return net.double(), "readout"
    beta = None if kind == "resnet_sqrt" else 1.0  # None = 1/sqrt(depth)
    net = ResMLP(in_features, num_classes=width, width=width, depth=depth, branch_multiplier=beta, bias=False, init="kaiming")
    return net.double(), f"blocks.{depth - 1}"


def input_normalized_lrs(net: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """The paper's per-layer learning rates ``η_k = 1/‖a_{k−1}‖²`` (``a_{k−1}``: the input of linear ``k``)."""
    sq: dict[str, float] = {}
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, n=n: sq.__setitem__(n, float(args[0].detach().square().sum())))
        for n, m in linears.items()
    ]
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()
    return {f"{n}.weight": 1.0 / sq[n] for n in linears}


def inner_loss(out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``⟨g, output⟩``: a generic (Gaussian) backward vector at the output."""
    return (out * g).sum()


def alignment(kind: str, depth: int, width: int, x: torch.Tensor, seed: int) -> float:
    """``cos θ_L`` for one fresh network."""
    torch.manual_seed(seed)
    net, feature = build(kind, depth, width, x.shape[1])
    g = torch.randn(1, width, dtype=torch.float64)
    lrs = input_normalized_lrs(net, x)
    return feature_speed(net, inner_loss, (x, g), [feature], lrs=lrs)[feature].cos_angle


def make_figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    colors = {"mlp": "C0", "resnet_sqrt": "C2", "resnet_one": "C3"}
    for kind in KINDS:
        ax.errorbar(results["depths"], results[f"{kind}_cos"], yerr=results[f"{kind}_cos_std"], marker="o",
                    capsize=3, color=colors[kind], label=f"{LABELS[kind]} (measured)")
        ax.plot(REFERENCE["depths"], REFERENCE[kind], ls=":", color=colors[kind], alpha=0.7,
                label=f"{LABELS[kind]} (our numpy reference, width 256)")
    d = results["depths"]
    c = results["mlp_cos"][0] * math.sqrt(d[0])
    ax.plot(d, [c / math.sqrt(L) for L in d], ls="--", color="gray", label="∝ 1/√L")
    ax.set_xscale("log", base=2)
    ax.set_xticks(REFERENCE["depths"], [str(L) for L in REFERENCE["depths"]])
    ax.set_xlabel("depth L")
    ax.set_ylabel("cos θ_L (backward-feature angle)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Backward-feature alignment at init (width {results['width']}, {results['seeds']} seeds)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.grid(alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    width, depths, n_seeds = (128, [2, 4, 8, 16, 32], 4) if args.quick else (256, [2, 4, 8, 16, 32, 64], 8)
    dm = DigitsDataModule(seed=args.seed)
    dm.setup("fit")
    results: dict = {"depths": depths, "width": width, "seeds": n_seeds, "reference": REFERENCE}
    for kind in KINDS:
        means, stds = [], []
        for depth in depths:
            values = []
            for s in range(n_seeds):
                x = dm.train_set[args.seed * n_seeds + s][0].reshape(1, -1).double()
                values.append(alignment(kind, depth, width, x, seed=1000 * args.seed + s))
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
            print(f"{kind:12s} L={depth:3d} cos={means[-1]:.3f} ± {stds[-1]:.3f}", file=sys.stderr)
        results[f"{kind}_cos"], results[f"{kind}_cos_std"] = means, stds
    results["mlp_cos_sqrt_depth"] = [c * math.sqrt(L) for c, L in zip(results["mlp_cos"], depths)]
    common.write_results(args.out, NAME, results, make_figure(results))
    return results


if __name__ == "__main__":
    main()
