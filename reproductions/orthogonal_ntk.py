"""NTK fluctuations grow with depth for Gaussian tanh nets at criticality and saturate for orthogonal ones.

Claim (Day, Kahn & Roberts, "Feature Learning and Generalization in Deep Networks with Orthogonal
Weights", arXiv 2310.07765; papers.md 001): at finite width ``n`` the NTK at initialization fluctuates
over random draws of the weights. For Gaussian weights at tanh criticality (``W ~ N(0, 1/n)``, zero
biases) the normalised fluctuation ``n·Var(Θ)/E[Θ]²`` grows linearly with depth ``ℓ`` (the ``ℓ/n``
expansion of the Principles of Deep Learning Theory); for orthogonal weights (gain 1) it stays small
and saturates.

The numbers come from :func:`lightning_align.measure.ntk_fluctuation.ntk_fluctuation` (PDLT NTK:
``1/fan_in`` on weights, 1 on biases) over ``n_inits`` fresh ``example_modules.MLP(activation="tanh",
init="normal")`` networks of ``ℓ`` linear layers (``ℓ - 1`` hidden layers of width ``n`` and an
8-unit readout); the orthogonal networks re-draw every weight with ``nn.init.orthogonal_(gain=1)``.
Probe: one standardised digit image scaled to ``‖x‖² = n_0`` (64 pixels).

Command::

    python reproductions/orthogonal_ntk.py [--quick] --out runs/orthogonal_ntk

JSON keys (``orthogonal_ntk.json``):
    depths: the depths ``ℓ`` (number of linear layers).
    gaussian, orthogonal: ``n·Var(Θ_aa)/E[Θ_aa]²`` per depth (the paper's ``(A + 2B)/H²``).
    gaussian_offdiag, orthogonal_offdiag: ``n·E[Θ_ab²]/E[Θ_aa]²``, ``a ≠ b`` (the paper's ``B/H²``).
    gaussian_slope: least-squares slope of ``gaussian`` against ``ℓ`` (reference: about 0.4-0.6).
    width, n_inits: ``n`` and the number of initialisations per point.
    by_width: (full mode) the same ratios for every width, ``{width: {"gaussian": [...], "orthogonal": [...]}}``.
    reference: papers.md 001 numbers (numpy, 300 inits).

Settings: quick: width 32, depths 2-32, 100 inits (about 15 s on 2 CPU cores, measured); full: widths 32
and 64, depths 4-48, 300 inits (about 85 s, measured). Quick run (seed 0): Gaussian 0.49 1.4 3.4 6.9 10.2
15.0, orthogonal 0.21 0.21 0.17 0.10 0.08 0.06 at ℓ = 2, 4, 8, 16, 24, 32 (slope 0.47); full run at
n = 32: Gaussian 1.4 3.3 7.4 11.5 16.4 29.9, orthogonal 0.21 0.16 0.10 0.08 0.06 0.05 at ℓ = 4-48, and
n = 64 within 10 % of n = 32 up to ℓ = 32 (the ratio is width-independent, as the 1/n expansion predicts).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from example_modules import MLP, DigitsDataModule  # noqa: E402
from lightning_align.measure.ntk_fluctuation import ntk_fluctuation  # noqa: E402

NAME = "orthogonal_ntk"
OUTPUTS = 8
REFERENCE = {  # papers.md 001: n·Var(Θ)/Θ², numpy, 300 inits, ‖x‖²/n = 1
    "depths": [4, 8, 16, 24, 32, 48],
    "gaussian_n32": [1.2, 2.7, 6.5, 10.5, 14, 26],
    "gaussian_n64": [1.5, 2.8, 6.2, 11.1, 13, 20],
    "orthogonal": [0.2, 0.15, 0.10, 0.08, 0.06, 0.05],
}


def critical_tanh(depth: int, width: int, in_features: int, init: str, seed: int) -> nn.Module:
    """``depth`` linear layers with tanh between, at criticality: gain 1, zero biases."""
    torch.manual_seed(seed)
    net = MLP(in_features, num_classes=OUTPUTS, width=width, depth=depth - 1, activation="tanh", init="normal")
    if init == "orthogonal":
        with torch.no_grad():
            for m in net.modules():
                if isinstance(m, nn.Linear):
                    nn.init.orthogonal_(m.weight, gain=1.0)
    return net


def probe_input(seed: int) -> torch.Tensor:
    """One digit image with ``‖x‖² = n_0``."""
    dm = DigitsDataModule(seed=seed)
    dm.setup("fit")
    x = dm.train_set[0][0].reshape(1, -1).float()
    return x / x.norm() * x.shape[1] ** 0.5


def make_figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    d = results["depths"]
    ax.plot(d, results["gaussian"], "o-", color="C3", label=f"Gaussian (measured, n = {results['width']})")
    ax.plot(d, results["orthogonal"], "s-", color="C0", label=f"orthogonal (measured, n = {results['width']})")
    for w, row in (results.get("by_width") or {}).items():
        if int(w) != results["width"]:
            ax.plot(d, row["gaussian"], "o--", color="C1", label=f"Gaussian (measured, n = {w})")
            ax.plot(d, row["orthogonal"], "s--", color="C9", label=f"orthogonal (measured, n = {w})")
    ax.plot(REFERENCE["depths"], REFERENCE["gaussian_n32"], ":", color="C3", alpha=0.7, label="Gaussian (reference, n = 32)")
    ax.plot(REFERENCE["depths"], REFERENCE["orthogonal"], ":", color="C0", alpha=0.7, label="orthogonal (reference)")
    ax.plot(d, [results["gaussian_slope"] * L + results["gaussian_intercept"] for L in d], "--", color="gray",
            label=f"linear fit, slope {results['gaussian_slope']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("depth ℓ (linear layers)")
    ax.set_ylabel("n · Var(Θ) / E[Θ]²")
    ax.set_title(f"NTK fluctuations at tanh criticality ({results['n_inits']} inits per point)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    if args.quick:
        widths, depths, n_inits = [32], [2, 4, 8, 16, 24, 32], 100
    else:
        widths, depths, n_inits = [32, 64], [4, 8, 16, 24, 32, 48], 300
    x = probe_input(args.seed)
    by_width: dict[int, dict[str, list[float]]] = {}
    for width in widths:
        row: dict[str, list[float]] = {}
        for init in ("gaussian", "orthogonal"):
            ratios, offdiag = [], []
            for depth in depths:
                res = ntk_fluctuation(
                    lambda s, depth=depth, init=init, width=width: critical_tanh(depth, width, x.shape[1], init, s),
                    x, n_inits=n_inits, seed=100_000 * args.seed + 1000 * depth,
                )
                ratios.append(res.diag_ratio)
                offdiag.append(res.offdiag_ratio)
                print(f"n={width} {init:10s} depth={depth:3d} n·Var/E² = {res.diag_ratio:.3f}", file=sys.stderr)
            row[init], row[f"{init}_offdiag"] = ratios, offdiag
        by_width[width] = row
    main_row = by_width[widths[0]]
    slope, intercept = statistics.linear_regression(depths, main_row["gaussian"])
    results = {
        "depths": depths,
        "gaussian": main_row["gaussian"],
        "orthogonal": main_row["orthogonal"],
        "gaussian_offdiag": main_row["gaussian_offdiag"],
        "orthogonal_offdiag": main_row["orthogonal_offdiag"],
        "gaussian_slope": slope,
        "gaussian_intercept": intercept,
        "width": widths[0],
        "n_inits": n_inits,
        "reference": REFERENCE,
    }
    if len(widths) > 1:
        results["by_width"] = {str(w): by_width[w] for w in widths}
    common.write_results(args.out, NAME, results, make_figure(results))
    return results


if __name__ == "__main__":
    main()
