"""Oracle tests of lightning_align.measure.elr: ELRs, spread, critical LR, scale-invariance detection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_align.measure.elr import (
    critical_lr,
    detect_scale_invariance,
    effective_lrs,
    elr_spread,
    grad_weight_ratios,
    next_elr,
    weight_group,
)


# --------------------------------------------------------------------------------------------------
# Small models
# --------------------------------------------------------------------------------------------------
def bn_mlp(depth: int = 3, width: int = 8, d_in: int = 4, d_out: int = 3, bias: bool = True, eps: float = 1e-5) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = d_in
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=bias), nn.BatchNorm1d(width, eps=eps), nn.ReLU()]
        d = width
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class PostNormBlock(nn.Module):
    """``x + BN(W x)``: the skip goes around the whole branch, so ``W`` stays scale-invariant."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.norm(self.linear(x))


class SkipAroundNorm(nn.Module):
    """``BN(W x) + W x``: a path around the norm, so ``W`` is not scale-invariant."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.linear(x)
        return self.norm(z) + z


class Noisy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + torch.randn(x.shape[0], 2)


def invariant(found: dict) -> dict[str, bool]:
    return {n: r.scale_invariant for n, r in found.items()}


# --------------------------------------------------------------------------------------------------
# effective_lrs, ratios, spread, critical LR
# --------------------------------------------------------------------------------------------------
def test_effective_lrs_match_hand_computed() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(5, 3, generator=g), torch.randn(5, generator=g)
    dw, db = 0.01 * torch.randn(5, 3, generator=g), 0.01 * torch.randn(5, generator=g)
    out = effective_lrs({"w": w, "wb": [w, b]}, {"w": w + dw, "wb": (w + dw, b + db)})
    assert out["w"] == pytest.approx(float(dw.norm() / w.norm()), rel=1e-6)
    joint = math.sqrt(float(dw.pow(2).sum() + db.pow(2).sum())) / math.sqrt(float(w.pow(2).sum() + b.pow(2).sum()))
    assert out["wb"] == pytest.approx(joint, rel=1e-6)


def test_effective_lrs_edge_cases_and_errors() -> None:
    z = torch.zeros(3)
    assert effective_lrs({"a": z}, {"a": z + 1})["a"] == math.inf
    assert math.isnan(effective_lrs({"a": z}, {"a": z})["a"])
    assert effective_lrs({"a": torch.ones(3)}, {"a": torch.ones(3)})["a"] == 0.0
    with pytest.raises(ValueError, match="same weights"):
        effective_lrs({"a": z}, {"b": z})
    with pytest.raises(ValueError, match="'a' has different shapes"):
        effective_lrs({"a": z}, {"a": torch.zeros(4)})


def test_grad_weight_ratios_spread_and_critical_lr_by_hand() -> None:
    w = {"a": torch.tensor([3.0, 4.0]), "b": [torch.tensor([1.0]), torch.tensor([0.0])]}
    g = {"a": torch.tensor([0.0, 20.0]), "b": [torch.tensor([0.5]), None]}
    e = grad_weight_ratios(w, g)
    assert e == pytest.approx({"a": 4.0, "b": 0.5})
    assert critical_lr(e) == pytest.approx(1 / math.sqrt(2.0))
    assert critical_lr({**e, "dead": 0.0}) == pytest.approx(1 / math.sqrt(2.0))  # no gradient: LR-independent
    assert critical_lr({"dead": 0.0}) == math.inf
    # per-layer LRs: critical common factor s* with s*·η_ℓ·e_ℓ balanced
    assert critical_lr(e, {"a": 0.1, "b": 0.2}) == pytest.approx(1 / math.sqrt(0.4 * 0.1))
    s = elr_spread({"x": 0.01, "y": 0.04, "z": 0.02})
    logs = [math.log(v) for v in (0.01, 0.04, 0.02)]
    mean = sum(logs) / 3
    assert (s.ratio, s.max_layer, s.min_layer, s.count) == (pytest.approx(4.0), "y", "x", 3)
    assert s.log_std == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in logs) / 3))
    assert elr_spread({"x": 0.0, "y": 1.0}).ratio == math.inf
    with pytest.raises(ValueError, match="no layers"):
        elr_spread({})


def test_critical_lr_equalizes_extremes_of_the_one_step_map() -> None:
    """Brute force: bisect for the LR at which E_max and E_min are equal after one step of the map."""
    e = {"l0": 40.0, "l1": 9.0, "l2": 2.5, "l3": 0.7}
    hi, lo = 40.0, 0.7

    def gap(eta: float) -> float:  # log(E_hi / E_lo) after one step
        return math.log(next_elr(eta * hi) / next_elr(eta * lo))

    a, b = 1e-4, 1e2
    for _ in range(200):
        mid = math.sqrt(a * b)
        a, b = (mid, b) if gap(mid) > 0 else (a, mid)
    assert critical_lr(e) == pytest.approx(a, rel=1e-9)

    def spread_after(eta: float) -> float:
        return elr_spread({k: next_elr(eta * v) for k, v in e.items()}).ratio

    eta = critical_lr(e)
    assert spread_after(eta) < min(spread_after(eta * 1.1), spread_after(eta / 1.1))
    # beyond η* the order flips: the fastest layer becomes the slowest
    assert next_elr(4 * eta * hi) < next_elr(4 * eta * lo)
    assert next_elr(eta / 4 * hi) > next_elr(eta / 4 * lo)


# --------------------------------------------------------------------------------------------------
# Scale-invariance detection
# --------------------------------------------------------------------------------------------------
def test_detection_on_models_with_and_without_norms() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 4)
    plain = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    assert invariant(detect_scale_invariance(plain, x)) == {"0": False, "2": False, "4": False}

    found = detect_scale_invariance(bn_mlp(), x)
    assert invariant(found) == {"0": True, "3": True, "6": True, "9": False}
    assert found["0"].params == ("weight",)  # a bias before BatchNorm is cancelled by the mean
    assert found["0"].relative_change < 1e-4 < found["9"].relative_change

    ln = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    found = detect_scale_invariance(ln, x)
    assert invariant(found) == {"0": True, "3": False}
    assert found["0"].params == ("weight", "bias")  # a bias before LayerNorm must scale with the weight

    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    assert invariant(detect_scale_invariance(conv, torch.randn(8, 1, 8, 8))) == {"0": True, "4": False}


def test_detection_with_skip_connections() -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    post = nn.Sequential(nn.Linear(6, 6), PostNormBlock(6), nn.Linear(6, 2))
    # the block's W is invariant; the first layer feeds the skip path, so it is not
    assert invariant(detect_scale_invariance(post, x)) == {"0": False, "1.linear": True, "2": False}
    around = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), SkipAroundNorm(6), nn.Linear(6, 2))
    assert invariant(detect_scale_invariance(around, x)) == {"0": True, "2.linear": False, "3": False}


def test_detection_uses_batch_statistics_and_changes_nothing() -> None:
    torch.manual_seed(0)
    net = bn_mlp()
    x = torch.randn(32, 4)
    net(x)  # non-trivial running statistics
    net.eval()
    params = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    found = detect_scale_invariance(net, x, {"0": net[0], "9": net[9]})
    assert invariant(found) == {"0": True, "9": False}
    assert not any(m.training for m in net.modules())
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in params.items())
    assert torch.equal(rng, torch.get_rng_state())
    # with running statistics (what the test deliberately does not use) the scale would show
    with torch.no_grad():
        scaled = torch.func.functional_call(net, {"0.weight": 2 * net[0].weight}, (x,))
        assert (scaled - net(x)).norm() > 1e-2 * net(x).norm()


def test_detection_on_example_modules() -> None:
    import example_modules as examples
    torch.manual_seed(0)
    x = torch.randn(32, 64)
    mlp = examples.MLP(width=16, depth=3, norm="batch", dropout=0.1)
    assert invariant(detect_scale_invariance(mlp, x)) == {"layers.0": True, "layers.1": True, "layers.2": True, "readout": False}
    ln = examples.MLP(width=16, depth=2, norm="layer")
    found = detect_scale_invariance(ln, x)
    assert invariant(found) == {"layers.0": True, "layers.1": True, "readout": False}
    assert found["layers.0"].params == ("weight", "bias")
    # pre-norm residual blocks: every weight has a path around the norms
    res = examples.ResMLP(width=16, depth=2, norm="layer")
    assert not any(invariant(detect_scale_invariance(res, x)).values())


def test_tiny_weights_are_still_detected() -> None:
    """Weights so small that the pre-norm variance is near BatchNorm's eps: the test ignores eps."""
    torch.manual_seed(0)
    net = bn_mlp()
    with torch.no_grad():
        net[3].weight.mul_(1e-4)
    assert invariant(detect_scale_invariance(net, torch.randn(32, 4)))["3"]
    assert net[1].eps == 1e-5  # put back


def test_detection_errors() -> None:
    net = bn_mlp()
    x = torch.randn(16, 4)
    with pytest.raises(ValueError, match="module 'relu'.*no `weight`"):
        detect_scale_invariance(net, x, {"relu": net[2]})
    with pytest.raises(ValueError, match="factor"):
        detect_scale_invariance(net, x, factor=1.0)
    with pytest.raises(ValueError, match="Noisy gives different outputs"):
        detect_scale_invariance(Noisy(), x)


# --------------------------------------------------------------------------------------------------
# Dynamics on a BatchNorm net
# --------------------------------------------------------------------------------------------------
def _loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(net(x), y)


def test_norm_growth_identity_under_plain_sgd() -> None:
    """‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖² for detected scale-invariant weights (and not for the readout)."""
    torch.manual_seed(0)
    net = bn_mlp(depth=4, eps=1e-12).double()
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    found = detect_scale_invariance(net, x)
    modules = dict(net.named_modules())
    si = [n for n, r in found.items() if r.scale_invariant]
    assert si == ["0", "3", "6", "9"]
    eta = 0.7
    opt = torch.optim.SGD(net.parameters(), lr=eta)
    for _ in range(4):
        opt.zero_grad()
        _loss(net, x, y).backward()
        before = {n: [t.detach().clone() for t in weight_group(modules[n], found[n])] for n in found}
        grads = {n: [t.grad.clone() for t in weight_group(modules[n], found[n])] for n in found}
        opt.step()
        for n in found:
            w0 = sum(float(t.pow(2).sum()) for t in before[n])
            w1 = sum(float(t.detach().pow(2).sum()) for t in weight_group(modules[n], found[n]))
            g2 = sum(float(t.pow(2).sum()) for t in grads[n])
            err = abs(w1 - (w0 + eta**2 * g2)) / w1
            if found[n].scale_invariant:
                assert err < 1e-9, (n, err)
            else:
                assert err > 1e-3, (n, err)


def test_critical_lr_on_a_deep_bn_net() -> None:
    """One SGD step at η* nearly equalizes the extremes; far above it the order flips and the spread widens."""
    torch.manual_seed(0)
    depth = 20
    net = bn_mlp(depth=depth, width=32, d_in=8).double()
    x, y = torch.randn(64, 8, dtype=torch.float64), torch.randint(0, 3, (64,))
    si = [str(3 * i) for i in range(depth)]
    params = {n: p.detach() for n, p in net.named_parameters()}

    def grads(p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = {k: v.clone().requires_grad_() for k, v in p.items()}
        loss = nn.functional.cross_entropy(torch.func.functional_call(net, p, (x,)), y)
        return dict(zip(p, torch.autograd.grad(loss, list(p.values()))))

    g = grads(params)
    e = grad_weight_ratios({n: params[f"{n}.weight"] for n in si}, {n: g[f"{n}.weight"] for n in si})
    hi, lo = max(e, key=e.get), min(e, key=e.get)
    assert e[hi] / e[lo] > 10  # gradient explosion at init: a large spread to start from
    assert int(hi) < int(lo)  # ... with the lower layers fastest
    eta_star = critical_lr(e)

    def after_one_step(eta: float) -> dict[str, float]:
        new = {k: v - eta * g[k] for k, v in params.items()}
        g2 = grads(new)
        return {n: eta * float(g2[f"{n}.weight"].norm() / new[f"{n}.weight"].norm()) for n in si}

    at, below, above = after_one_step(eta_star), after_one_step(eta_star / 4), after_one_step(eta_star * 4)
    assert 0.4 < at[hi] / at[lo] < 2.5
    assert below[hi] / below[lo] > 2  # order kept, spread still large
    assert above[hi] / above[lo] < 0.25  # order flipped
    spread = {k: elr_spread(v).ratio for k, v in (("at", at), ("below", below), ("above", above))}
    assert spread["at"] < spread["below"] and spread["at"] < spread["above"]
