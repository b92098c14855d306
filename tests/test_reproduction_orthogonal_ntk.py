"""reproductions/orthogonal_ntk.py --quick: Gaussian NTK fluctuations grow with depth, orthogonal ones saturate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))

import orthogonal_ntk  # noqa: E402


@pytest.mark.slow  # a whole --quick reproduction run (tens of seconds); `./run test` and CI still run it
def test_quick_run_shows_the_claim(tmp_path: Path) -> None:
    orthogonal_ntk.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "orthogonal_ntk.json").read_text())
    assert (tmp_path / "orthogonal_ntk.png").stat().st_size > 0
    depths, g, o = res["depths"], res["gaussian"], res["orthogonal"]
    assert res["width"] == 32 and res["n_inits"] >= 50 and len(depths) == len(g) == len(o) >= 5
    # Gaussian: grows about linearly in depth (PDLT: slope 0.4-0.5, width-independent).
    assert all(a < b for a, b in zip(g, g[1:])), g
    assert 0.3 < res["gaussian_slope"] < 0.8, res["gaussian_slope"]
    assert g[-1] > 10 * g[0], g
    # Orthogonal: bounded and not growing past depth 16 (docs/papers.md), far below Gaussian.
    deep = [v for d, v in zip(depths, o) if d >= 16]
    assert max(o) < 0.5 and max(deep) < 2 * o[depths.index(16)], o
    assert all(gv > 5 * ov for gv, ov in zip(g[1:], o[1:])), (g, o)
    # Per-layer correlators at the authors' conventions (ykahn/OrthogonalInits: width 20, 30 layers, λ_b = 1/ℓ).
    pl = res["per_layer"]
    layers, gauss, orth = pl["layers"], pl["gaussian"], pl["orthogonal"]
    assert pl["width"] == 20 and layers[-1] == 30 and pl["n_nets"] >= 50
    at = {ell: layers.index(ell) for ell in (5, 10, 20, 30)}
    # Gaussian: the NTK variance and the NTK-preactivation correlator grow about linearly with depth
    assert gauss["slope"]["B"] > 0.3 and gauss["B"][at[30]] > 5 * gauss["B"][at[5]], gauss["B"]
    assert gauss["slope"]["A"] > 0.2 and gauss["A"][at[30]] > 10 * gauss["A"][at[5]], gauss["A"]
    assert gauss["slope"]["F"] > 0.1 and gauss["F"][at[30]] > 4 * gauss["F"][at[5]], gauss["F"]
    # orthogonal: small and saturated past depth 20 (not growing), far below Gaussian from layer 10 on
    for key in ("A", "B", "F"):
        assert orth["late_over_20"][key] < 1.25, (key, orth[key])
    assert max(orth["A"]) < 0.1 and max(orth["B"]) < 0.2, (orth["A"], orth["B"])
    assert all(g > 10 * o for g, o in zip(gauss["B"][at[10]:], orth["B"][at[10]:])), (gauss["B"], orth["B"])


def test_per_layer_kernels_match_the_pdlt_forward_recursion() -> None:
    """Oracle: the blocks of ``empirical_ntk`` on all preactivations are the layer NTKs of the recursion (PDLT eq. 8.12),
    ``Ĥ1 = (λ_b1 + λ_W |x|²/n0) I``, ``Ĥ_{ℓ+1} = (λ_b,ℓ+1 + λ_W Σ tanh(z_ℓ)²/n) I + W diag(σ') Ĥ_ℓ diag(σ') Wᵀ``."""
    import torch

    from lightning_align.measure.ntk import empirical_ntk

    width, depth = 6, 5
    x = torch.rand(1, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for init in ("gaussian", "orthogonal"):
        torch.manual_seed(7)
        net = orthogonal_ntk.AllPreactivations(width, depth, init).double()
        with torch.no_grad():  # non-zero biases, so that the check does not rely on them vanishing
            for m in net.layers:
                m.bias.normal_()
        k = empirical_ntk(net, x, learning_rates=orthogonal_ntk.authors_learning_rates(depth, width))[0, 0]
        k = k.reshape(depth, width, depth, width)
        with torch.no_grad():
            z = net(x)[0].reshape(depth, width)
        eye = torch.eye(width, dtype=torch.float64)
        h = (1.0 + float((x**2).sum()) / width) * eye
        for ell in range(depth):
            if ell > 0:
                w = net.layers[ell].weight.detach()
                s = 1 - torch.tanh(z[ell - 1]) ** 2
                h = (1.0 / (ell + 1) + float((torch.tanh(z[ell - 1]) ** 2).sum()) / width) * eye + w @ (s[:, None] * h * s[None, :]) @ w.T
            torch.testing.assert_close(k[ell, :, ell, :], h, rtol=1e-10, atol=1e-12)
