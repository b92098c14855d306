"""NTK fluctuations over initialisations (Day, Kahn & Roberts): Gaussian tanh nets grow with depth, orthogonal ones do not."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_align.measure.ntk import empirical_ntk
from lightning_align.measure.ntk_fluctuation import ntk_fluctuation

WIDTH = 32


def critical_tanh(depth: int, init: str, seed: int, width: int = WIDTH, outputs: int = 8) -> nn.Module:
    """``depth`` linear layers of width ``width`` with tanh between, gain 1 (criticality) and zero biases."""
    g = torch.Generator().manual_seed(seed)
    dims = [width] * depth + [outputs]
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(width, dims[i + 1])
        with torch.no_grad():
            if init == "gaussian":
                lin.weight.normal_(0.0, width**-0.5, generator=g)
            else:
                nn.init.orthogonal_(lin.weight, gain=1.0, generator=g)
            lin.bias.zero_()
        layers += [lin, nn.Tanh()] if i < depth - 1 else [lin]
    return nn.Sequential(*layers)


def unit_input(width: int = WIDTH) -> torch.Tensor:
    x = torch.randn(1, width, generator=torch.Generator().manual_seed(123))
    return x / x.norm() * width**0.5  # ‖x‖²/n = 1


def test_gaussian_grows_with_depth_orthogonal_does_not() -> None:
    x = unit_input()
    ratios = {
        (init, depth): ntk_fluctuation(lambda s: critical_tanh(depth, init, s), x, n_inits=60)
        for init in ("gaussian", "orthogonal")
        for depth in (2, 8, 16)
    }
    g = [ratios["gaussian", d].diag_ratio for d in (2, 8, 16)]
    o = [ratios["orthogonal", d].diag_ratio for d in (2, 8, 16)]
    # PDLT: Gaussian n·Var(Θ)/Θ² ≈ 0.4-0.5·ℓ (paper table at n = 32: 2.7 at ℓ = 8, 6.5 at ℓ = 16).
    assert g[0] < g[1] < g[2]
    assert g[2] > 4 * g[0] and 3.5 < g[2] < 13
    # Orthogonal: bounded (paper: 0.15 at ℓ = 8, 0.10 at ℓ = 16), and far below Gaussian.
    assert max(o) < 0.4 and o[2] < 1.5 * o[0]
    assert g[2] > 15 * o[2]
    off_g = [ratios["gaussian", d].offdiag_ratio for d in (2, 16)]
    off_o = [ratios["orthogonal", d].offdiag_ratio for d in (2, 16)]
    assert off_g[1] > 4 * off_g[0] and off_o[1] < 1.5 * off_o[0]


def test_statistics_by_hand() -> None:
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))

    def factory(seed: int) -> nn.Module:
        return critical_tanh(3, "gaussian", seed, width=6, outputs=3)

    res = ntk_fluctuation(factory, x, n_inits=5, seed=10)
    diags, offs = [], []
    for s in range(10, 15):
        model = factory(s)
        lrs = {n: 1.0 / p.shape[1] for n, p in model.named_parameters() if n.endswith("weight")}
        k = empirical_ntk(model, x, learning_rates=lrs).double()
        blocks = torch.stack([k[i, i] for i in range(2)])  # (m, c, c)
        diags.append(blocks.diagonal(dim1=1, dim2=2))
        offs.append(torch.cat([blocks[:, a, b] for a in range(3) for b in range(3) if a != b]))
    d = torch.stack(diags)
    mean = d.mean()
    assert res.width == 6 and res.n_inits == 5
    torch.testing.assert_close(res.diagonals, d)
    assert res.mean == pytest.approx(float(mean))
    assert res.diag_ratio == pytest.approx(float(6 * d.var(0).mean() / mean**2))
    assert res.offdiag_ratio == pytest.approx(float(6 * (torch.stack(offs) ** 2).mean() / mean**2))
    plain = ntk_fluctuation(factory, x, n_inits=5, seed=10, lr_scaling="none", width=4)
    assert plain.width == 4 and plain.mean > res.mean


def test_errors() -> None:
    with pytest.raises(ValueError, match="n_inits"):
        ntk_fluctuation(lambda s: nn.Linear(2, 2), torch.randn(1, 2), n_inits=1)
    with pytest.raises(TypeError, match="model_factory returned int"):
        ntk_fluctuation(lambda s: 3, torch.randn(1, 2), n_inits=2)  # type: ignore[arg-type,return-value]
    with pytest.raises(ValueError, match="pass `width=`"):
        ntk_fluctuation(lambda s: nn.Sequential(nn.Conv1d(1, 1, 1), nn.Flatten()), torch.randn(1, 1, 2), n_inits=2)
