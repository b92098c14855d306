"""The paper's depth behaviour of the backward-feature angle at initialization (docs/papers.md).

Setup as in the reference table: width 128 (table: 256), He init, no biases, one input, features are
preactivations, θ measured at ℓ = L, generic backward vector (loss ⟨g, f_L⟩ with g Gaussian), per-layer
learning rates η_k = 1/‖a_{k−1}‖². Averaged over seeds.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_align.measure.alignment import feature_kernel, feature_speed

WIDTH = 128
DEPTHS = (2, 4, 8, 16, 32)
SEEDS = range(4)


class ResBlock(nn.Module):
    """``h + β·W·relu(h)``: the block output is the residual stream."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH, bias=False)
        self.beta = beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.beta * self.lin(torch.relu(h))


def build(kind: str, depth: int) -> nn.Sequential:
    if kind == "mlp":
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.ReLU()] if i else []
            layers.append(nn.Linear(WIDTH, WIDTH, bias=False))
        net = nn.Sequential(*layers)
    else:
        beta = 1 / math.sqrt(depth) if kind == "resnet_sqrt" else 1.0
        net = nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), *[ResBlock(beta) for _ in range(depth)])
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return net.double()


def setup(kind: str, depth: int, seed: int):
    torch.manual_seed(seed)
    net = build(kind, depth)
    x = torch.randn(1, WIDTH, dtype=torch.float64)
    g = torch.randn(1, WIDTH, dtype=torch.float64)
    linears = {n: m for n, m in net.named_modules() if isinstance(m, nn.Linear)}
    sq_norms: dict[str, float] = {}
    hooks = [
        m.register_forward_hook(lambda _m, inp, _o, n=n: sq_norms.__setitem__(n, float(inp[0].detach().square().sum())))
        for n, m in linears.items()
    ]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    lrs = {f"{n}.weight": 1.0 / sq_norms[n] for n in linears}
    return net, (x, g), lrs, str(len(net) - 1)


def inner_loss(out: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (out * g).sum()


def mean_cos(kind: str, depth: int) -> float:
    values = []
    for seed in SEEDS:
        net, batch, lrs, last = setup(kind, depth, seed)
        values.append(feature_speed(net, inner_loss, batch, [last], lrs=lrs)[last].cos_angle)
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def curves() -> dict[str, list[float]]:
    return {kind: [mean_cos(kind, d) for d in DEPTHS] for kind in ("mlp", "resnet_sqrt", "resnet_one")}


def test_relu_mlp_alignment_falls_like_inverse_sqrt_depth(curves):
    cos = curves["mlp"]
    assert all(a > b for a, b in zip(cos, cos[1:])), cos
    assert 0.7 < cos[0] < 0.95 and cos[-1] < 0.35, cos  # table: .82 at L = 2, .24 at L = 32
    scaled = [c * math.sqrt(d) for c, d in zip(cos, DEPTHS)]  # cos·√L roughly constant
    assert max(scaled) / min(scaled) < 1.6, scaled


def test_resnet_with_inverse_sqrt_branches_keeps_alignment(curves):
    assert min(curves["resnet_sqrt"]) > 0.5, curves["resnet_sqrt"]


def test_resnet_with_unit_branches_loses_alignment(curves):
    cos = curves["resnet_one"]
    assert all(a > b for a, b in zip(cos, cos[1:])), cos
    assert cos[-1] < 0.25 and cos[-1] < 0.5 * curves["resnet_sqrt"][-1], cos


def test_kernel_spectrum_predicts_alignment_at_init():
    """mean(λ)/rms(λ) of the backward-to-feature kernel ≈ the measured cos θ (reference: within ~0.05)."""
    spectral, measured = [], []
    for seed in range(3):
        net, batch, lrs, last = setup("mlp", 8, seed)
        spectral.append(feature_kernel(net, inner_loss, batch, last, lrs=lrs).mean_rms_ratio)
        measured.append(feature_speed(net, inner_loss, batch, [last], lrs=lrs)[last].cos_angle)
    assert sum(spectral) / 3 == pytest.approx(sum(measured) / 3, abs=0.07)
