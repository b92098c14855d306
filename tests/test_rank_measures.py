"""Oracles for the rank measures: direct torch.linalg formulas on constructed low-rank matrices."""

import math

import pytest
import torch
from torch import nn

from lightning_align.measure.rank import (
    effective_rank,
    jacobian_rank,
    numerical_rank,
    participation_ratio,
    representation_ranks,
    stable_rank,
    weight_spectrum,
)


def low_rank(n: int, m: int, rank: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, m, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_stable_rank_matches_norm_formula(rank: int) -> None:
    w = low_rank(20, 12, rank)
    expected = torch.linalg.matrix_norm(w, "fro") ** 2 / torch.linalg.matrix_norm(w, 2) ** 2
    assert stable_rank(w) == pytest.approx(float(expected), rel=1e-10)
    assert 1.0 <= stable_rank(w) <= rank + 1e-9


def test_stable_rank_of_known_spectrum() -> None:
    w = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert stable_rank(w) == pytest.approx((4 + 1 + 1) / 4)


@pytest.mark.parametrize("rank", [1, 2, 5])
def test_effective_rank_matches_entropy_of_svdvals(rank: int) -> None:
    w = low_rank(30, 16, rank, seed=rank)
    s = torch.linalg.svdvals(w)
    p = s / s.sum()
    p = p[p > 1e-300]
    expected = math.exp(float(-(p * p.log()).sum()))
    assert effective_rank(w) == pytest.approx(expected, rel=1e-8)
    assert effective_rank(w) <= rank + 1e-6


def test_effective_rank_equal_singular_values_is_the_rank() -> None:
    q, _ = torch.linalg.qr(torch.randn(10, 4, dtype=torch.float64))
    assert effective_rank(q) == pytest.approx(4.0, rel=1e-10)
    assert participation_ratio(q) == pytest.approx(4.0, rel=1e-10)


def test_participation_ratio_formula() -> None:
    w = low_rank(15, 15, 6)
    s2 = torch.linalg.svdvals(w) ** 2
    assert participation_ratio(w) == pytest.approx(float(s2.sum() ** 2 / (s2**2).sum()), rel=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_numerical_rank_of_low_rank_matrix(rank: int) -> None:
    assert numerical_rank(low_rank(40, 20, rank)) == rank
    assert int(torch.linalg.matrix_rank(low_rank(40, 20, rank))) == rank


def test_representation_ranks_center_before_svd() -> None:
    z = low_rank(200, 16, 2) + 5.0  # 2-dimensional variation plus a constant offset
    r = representation_ranks(z)
    assert r.numerical_rank == 2
    centred = z - z.mean(0)
    s = torch.linalg.svdvals(centred)
    p = s / s.sum()
    p = p[p > 0]
    assert r.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-8)
    assert torch.allclose(r.singular_values, s)


def test_weight_spectrum_counts_and_conv_reshape() -> None:
    w = torch.zeros(4, 2, 3, 3, dtype=torch.float64)
    mat = torch.diag(torch.tensor([1.1, 0.9, 0.3, 0.05], dtype=torch.float64))
    flat = torch.zeros(4, 18, dtype=torch.float64)
    flat[:, :4] = mat
    w.copy_(flat.reshape(4, 2, 3, 3))
    spec = weight_spectrum(w, threshold=0.5, near_one_tol=0.25)
    assert torch.allclose(spec.singular_values, torch.tensor([1.1, 0.9, 0.3, 0.05], dtype=torch.float64))
    assert spec.count_above == 2 and spec.count_near_one == 2
    assert spec.frobenius_sq == pytest.approx(1.21 + 0.81 + 0.09 + 0.0025)


def test_zero_matrix_and_bad_shapes() -> None:
    assert stable_rank(torch.zeros(3, 3)) == 0.0
    assert effective_rank(torch.zeros(3, 3)) == 0.0
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        stable_rank(torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 samples"):
        representation_ranks(torch.ones(1, 4))


def test_jacobian_rank_of_a_linear_bottleneck() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 2, bias=False), nn.Linear(2, 5, bias=False)).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    ranks, logdets = jacobian_rank(net, x)
    assert ranks == [2, 2, 2]
    s = torch.linalg.svdvals(net[1].weight @ net[0].weight)
    assert logdets[0] == pytest.approx(float(2 * s[:2].log().sum()), rel=1e-8)
