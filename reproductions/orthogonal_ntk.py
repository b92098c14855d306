"""NTK fluctuations grow with depth for Gaussian tanh nets at criticality and saturate for orthogonal ones.

Claim (Day, Kahn & Roberts, "Feature Learning and Generalization in Deep Networks with Orthogonal
Weights", arXiv 2310.07765): at finite width ``n`` the NTK at initialization fluctuates
over random draws of the weights. For Gaussian weights at tanh criticality (``W ~ N(0, 1/n)``, zero
biases) the normalised fluctuation ``n·Var(Θ)/E[Θ]²`` grows linearly with depth ``ℓ`` (the ``ℓ/n``
expansion of the Principles of Deep Learning Theory); for orthogonal weights (gain 1) it stays small
and saturates.

The numbers come from :func:`lightning_align.measure.ntk_fluctuation.ntk_fluctuation` (PDLT NTK:
``1/fan_in`` on weights, 1 on biases) over ``n_inits`` fresh ``example_modules.MLP(activation="tanh",
init="normal")`` networks of ``ℓ`` linear layers (``ℓ - 1`` hidden layers of width ``n`` and an
8-unit readout); the orthogonal networks re-draw every weight with ``nn.init.orthogonal_(gain=1)``.
Probe: one standardised digit image scaled to ``‖x‖² = n_0`` (64 pixels).

Per-layer correlators at the authors' conventions (``ykahn/OrthogonalInits``,
``MeasureAllCorrelators_OrthogonalPaper.ipynb``, the sampling code of the paper's Fig. 3): an ensemble of
networks of ``depth`` square tanh layers of width ``n`` (input width ``n`` too), one input ``x ~ U[0,1)^n``,
weights ``N(0, 1/n)`` or Haar-orthogonal (gain 1), zero biases, and the NTK of the preactivations ``z^(ℓ)`` of
*every* layer with learning rates ``λ_W/n_{ℓ-1}`` on weights and ``λ_b^(ℓ) = 1/ℓ`` on the biases of layer ``ℓ``
(their tanh convention, ``λ_W = 1``). The per-layer kernels ``Ĥ^(ℓ)`` come from one
:func:`lightning_align.measure.ntk.empirical_ntk` call per network with those learning rates, on a module that
outputs all preactivations (the blocks ``(ℓ, ℓ)`` of that kernel are the layer NTKs, since later layers'
parameters do not move ``z^(ℓ)``); the test checks them against the PDLT forward recursion (eq. 8.12). From the
ensemble, over pairs of distinct units ``i ≠ j`` (``Δ`` = minus the ensemble mean, ``Θ = E[tr Ĥ]/n``,
``K = E[z_i²]``): ``A = n E[ΔĤ_ii ΔĤ_jj]``, ``B = n E[ΔĤ_ij²]``, ``D = n E[z_i² ΔĤ_jj]``,
``F = n E[z_i z_j ΔĤ_ij]``, plotted as ``A/Θ²``, ``B/Θ²``, ``D/(ΘK)``, ``F/(ΘK)`` per layer, as the authors do.
Not computed: the dNTK and ddNTK correlators (``P, Q, R, S, T, U``).

Command::

    python reproductions/orthogonal_ntk.py [--quick] --out runs/orthogonal_ntk

JSON keys (``orthogonal_ntk.json``):
    depths: the depths ``ℓ`` (number of linear layers).
    gaussian, orthogonal: ``n·Var(Θ_aa)/E[Θ_aa]²`` per depth (the paper's ``(A + 2B)/H²``).
    gaussian_offdiag, orthogonal_offdiag: ``n·E[Θ_ab²]/E[Θ_aa]²``, ``a ≠ b`` (the paper's ``B/H²``).
    gaussian_slope: least-squares slope of ``gaussian`` against ``ℓ`` (our numpy reference: about 0.4-0.6).
    width, n_inits: ``n`` and the number of initialisations per point.
    by_width: (full mode) the same ratios for every width, ``{width: {"gaussian": [...], "orthogonal": [...]}}``.
    reference: this project's own numpy reference (docs/papers.md, 300 inits), not the paper's numbers.
    per_layer: the authors'-convention correlators: ``layers`` (1 … depth), ``width``, ``n_nets``, and for
        ``gaussian`` / ``orthogonal``: ``A``, ``B``, ``D``, ``F`` (normalised, per layer), ``slope`` (least-squares
        slope of each against ``ℓ``) and ``late_over_20`` (each one's largest ``|value|`` over ``ℓ >= 20``
        divided by ``|value|`` at ``ℓ = 20``: about 1 when it has saturated).

Settings: quick: width 32, depths 2-32, 100 inits (about 15 s on 2 CPU cores, measured); full: widths 32
and 64, depths 4-48, 300 inits (about 85 s, measured). Quick run (seed 0): Gaussian 0.49 1.4 3.4 6.9 10.2
15.0, orthogonal 0.21 0.21 0.17 0.10 0.08 0.06 at ℓ = 2, 4, 8, 16, 24, 32 (slope 0.47); full run at
n = 32: Gaussian 1.4 3.3 7.4 11.5 16.4 29.9, orthogonal 0.21 0.16 0.10 0.08 0.06 0.05 at ℓ = 4-48, and
n = 64 within 10 % of n = 32 up to ℓ = 32 (the ratio is width-independent, as the 1/n expansion predicts).
Per-layer part: quick 60 networks, full 300 networks, both width 20 and 30 layers (the authors' 100 networks
of width 20 and 30 hidden layers). With it the whole quick run takes about 22 s and the full run 151 s wall
(124 s CPU) on 2 shared cores, measured. Full run, per layer (ℓ = 5 / 10 / 20 / 30): Gaussian A/Θ² 0.17 / 0.92
/ 3.7 / 8.6, B/Θ² 1.5 / 3.6 / 8.6 / 15.9 (slope 0.50 per layer), F/(ΘK) 1.05 / 2.3 / 5.2 / 7.7; orthogonal A/Θ²
0.011 / 0.017 / 0.022 / 0.022, B/Θ² 0.100 / 0.095 / 0.074 / 0.062, F/(ΘK) -0.43 / -0.52 / -0.57 / -0.59 (flat
past ℓ ≈ 20: largest |value| over ℓ >= 20 within 4% of its value at 20).
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
from lightning_align.measure.ntk import empirical_ntk  # noqa: E402
from lightning_align.measure.ntk_fluctuation import ntk_fluctuation  # noqa: E402

NAME = "orthogonal_ntk"
OUTPUTS = 8
REFERENCE = {  # our own numpy reference (docs/papers.md), not the paper's: n·Var(Θ)/Θ², 300 inits, ‖x‖²/n = 1
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


class AllPreactivations(nn.Module):
    """``depth`` square tanh layers ``z^(1) = W^(1) x + b^(1)``, ``z^(ℓ+1) = W^(ℓ+1) tanh(z^(ℓ)) + b^(ℓ+1)``, returning
    every ``z^(ℓ)``, concatenated: ``(batch, depth · width)``."""

    def __init__(self, width: int, depth: int, init: str) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        with torch.no_grad():
            for m in self.layers:
                if init == "orthogonal":
                    nn.init.orthogonal_(m.weight, gain=1.0)  # Haar-distributed, as scipy's ortho_group
                else:
                    nn.init.normal_(m.weight, std=width ** -0.5)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        zs, h = [], x
        for i, m in enumerate(self.layers):
            h = m(h if i == 0 else torch.tanh(h))
            zs.append(h)
        return torch.cat(zs, dim=-1)


def authors_learning_rates(depth: int, width: int) -> dict[str, float]:
    """``λ_W / n_{ℓ-1}`` on weights (``λ_W = 1``, every fan-in is ``width``), ``λ_b^(ℓ) = 1/ℓ`` on the biases of layer ℓ."""
    lrs = {}
    for i in range(depth):
        lrs[f"layers.{i}.weight"] = 1.0 / width
        lrs[f"layers.{i}.bias"] = 1.0 / (i + 1)
    return lrs


def layer_kernels(init: str, width: int, depth: int, n_nets: int, x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-layer NTKs ``Ĥ`` ``(n_nets, depth, width, width)`` and preactivations ``z`` ``(n_nets, depth, width)``."""
    torch.manual_seed(seed)
    lrs = authors_learning_rates(depth, width)
    kernels, preacts = [], []
    for _ in range(n_nets):
        net = AllPreactivations(width, depth, init).double()
        k = empirical_ntk(net, x, learning_rates=lrs)[0, 0].reshape(depth, width, depth, width)
        kernels.append(torch.stack([k[l, :, l, :] for l in range(depth)]))
        with torch.no_grad():
            preacts.append(net(x)[0].reshape(depth, width))
    return torch.stack(kernels), torch.stack(preacts)


def correlators(h: torch.Tensor, z: torch.Tensor) -> dict[str, list[float]]:
    """``A/Θ², B/Θ², D/(ΘK), F/(ΘK)`` per layer from an ensemble (pairs of distinct units, ensemble-centred ``Ĥ``)."""
    n = h.shape[-1]
    pairs = n * (n - 1)
    dh = h - h.mean(0)
    d = dh.diagonal(dim1=-2, dim2=-1)
    off = dh - torch.diag_embed(d)
    theta = h.diagonal(dim1=-2, dim2=-1).mean((0, 2))
    k = (z**2).mean((0, 2))
    a = n * ((d.sum(-1) ** 2 - (d**2).sum(-1)) / pairs).mean(0)
    b = n * ((off**2).sum((-1, -2)) / pairs).mean(0)
    dd = n * (((z**2).sum(-1) * d.sum(-1) - ((z**2) * d).sum(-1)) / pairs).mean(0)
    f = n * (torch.einsum("sli,slj,slij->sl", z, z, off) / pairs).mean(0)
    return {"A": (a / theta**2).tolist(), "B": (b / theta**2).tolist(), "D": (dd / (theta * k)).tolist(),
            "F": (f / (theta * k)).tolist()}


def per_layer(width: int, depth: int, n_nets: int, seed: int) -> dict:
    """The authors'-convention correlators for Gaussian and orthogonal ensembles, with slopes and saturation ratios."""
    x = torch.rand(1, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layers = list(range(1, depth + 1))
    out: dict = {"layers": layers, "width": width, "n_nets": n_nets}
    for i, init in enumerate(("gaussian", "orthogonal")):
        c = correlators(*layer_kernels(init, width, depth, n_nets, x, seed=10_000 * seed + i))
        c["slope"] = {k: statistics.linear_regression(layers, v)[0] for k, v in c.items()}
        at20 = layers.index(20)
        c["late_over_20"] = {k: max(abs(u) for u in v[at20:]) / abs(v[at20]) for k, v in c.items() if k != "slope"}
        out[init] = c
        print(f"{init:10s} per layer, ℓ = 5/10/20/30: " + ", ".join(
            f"{k} " + "/".join(f"{c[k][l - 1]:.2f}" for l in (5, 10, 20, depth)) for k in ("A", "B", "D", "F")), file=sys.stderr)
    return out


def make_figure(results: dict):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2, ax3) = plt.subplots(1, 3, figsize=(17, 4.6))
    d = results["depths"]
    ax.plot(d, results["gaussian"], "o-", color="C3", label=f"Gaussian (measured, n = {results['width']})")
    ax.plot(d, results["orthogonal"], "s-", color="C0", label=f"orthogonal (measured, n = {results['width']})")
    for w, row in (results.get("by_width") or {}).items():
        if int(w) != results["width"]:
            ax.plot(d, row["gaussian"], "o--", color="C1", label=f"Gaussian (measured, n = {w})")
            ax.plot(d, row["orthogonal"], "s--", color="C9", label=f"orthogonal (measured, n = {w})")
    ax.plot(REFERENCE["depths"], REFERENCE["gaussian_n32"], ":", color="C3", alpha=0.7, label="Gaussian (our numpy reference, n = 32)")
    ax.plot(REFERENCE["depths"], REFERENCE["orthogonal"], ":", color="C0", alpha=0.7, label="orthogonal (our numpy reference)")
    ax.plot(d, [results["gaussian_slope"] * L + results["gaussian_intercept"] for L in d], "--", color="gray",
            label=f"linear fit, slope {results['gaussian_slope']:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("depth ℓ (linear layers)")
    ax.set_ylabel("n · Var(Θ) / E[Θ]²")
    ax.set_title(f"(a) readout NTK, λ_b = 1 ({results['n_inits']} inits per point)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    pl = results["per_layer"]
    layers = pl["layers"]
    for init, color in (("gaussian", "C3"), ("orthogonal", "C0")):
        ax2.plot(layers, pl[init]["A"], "o-", ms=3, color=color, label=f"{init}: A/Θ²")
        ax2.plot(layers, pl[init]["B"], "s--", ms=3, color=color, alpha=0.7, label=f"{init}: B/Θ²")
        ax3.plot(layers, pl[init]["D"], "o-", ms=3, color=color, label=f"{init}: D/(ΘK)")
        ax3.plot(layers, pl[init]["F"], "s--", ms=3, color=color, alpha=0.7, label=f"{init}: F/(ΘK)")
    ax2.set_yscale("log")
    ax2.set_title(f"(b) per-layer NTK correlators, authors' conventions (n = {pl['width']}, {pl['n_nets']} nets)")
    ax3.set_title("(c) NTK–preactivation cross-correlators, same ensembles")
    ax3.axhline(0, color="gray", lw=0.8)
    for a_ in (ax2, ax3):
        a_.set_xlabel("hidden layer ℓ")
        a_.set_ylabel("normalised correlator")
        a_.axvline(20, color="gray", ls=":", lw=1)
        a_.legend(fontsize=7)
        a_.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict:
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv)
    if args.quick:
        widths, depths, n_inits, n_nets = [32], [2, 4, 8, 16, 24, 32], 100, 60
    else:
        widths, depths, n_inits, n_nets = [32, 64], [4, 8, 16, 24, 32, 48], 300, 300
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
    results["per_layer"] = per_layer(width=20, depth=30, n_nets=n_nets, seed=args.seed)
    if len(widths) > 1:
        results["by_width"] = {str(w): by_width[w] for w in widths}
    common.write_results(args.out, NAME, results, make_figure(results))
    return results


if __name__ == "__main__":
    main()
