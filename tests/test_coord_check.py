"""Offline coordinate check: μP flat in width, depth-μP/CompleteP flat in depth, SP fails both (negative control)."""

from __future__ import annotations

import math

import pytest
import torch
from param_nets import DepthNet, MLPNet
from torch import nn
from torch.nn import functional as F

from lightning_align.parametrize.auto import auto_parametrize
from lightning_align.parametrize.coord_check import CoordCheckResult, coord_check

WIDTHS = [128, 512, 2048]


def _batch(n=16, d=20, c=10):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, d, generator=g), torch.randint(0, c, (n,), generator=g)


def _width_factory(scheme, optimizer, lr):
    def make(width):
        model = MLPNet(width=width)
        p = auto_parametrize(model, scheme, base_width=WIDTHS[0], readout_zero_init=scheme == "mup")
        opt = torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam" else torch.optim.SGD(model.parameters(), lr=lr)
        return model, p.rewrite_optimizer(opt)

    return make


def _max_spread(result, stat, x="width"):
    return max(v for steps in result.spread(stat, x=x).values() for v in steps.values())


@pytest.mark.parametrize("optimizer,lr", [("adam", 1e-2), ("sgd", 0.5)])
def test_mup_is_flat_in_width_and_sp_is_not(optimizer, lr):
    mup = coord_check(_width_factory("mup", optimizer, lr), WIDTHS, _batch(), loss_fn=F.cross_entropy, steps=3)
    sp = coord_check(_width_factory("sp", optimizer, lr), WIDTHS, _batch(), loss_fn=F.cross_entropy, steps=3)
    assert mup.modules == ["fc1", "fc2", "readout"]
    for stat in ("l1", "delta_rms"):
        assert _max_spread(mup, stat) <= 1.3, mup.spread(stat)
    # features and outputs really move under μP (the flat curves are not flat zeros)
    for module in ("fc2", "readout"):
        assert min(mup.values("delta_rms", step=3)[module][3].values()) > 1e-3
    assert _max_spread(sp, "l1") > 2.0  # negative control: SP blows up with width after one step
    assert max(sp.slopes("l1")["readout"][t] for t in (2, 3)) > 0.4
    assert all(abs(s) < 0.1 for t, s in mup.slopes("l1")["fc2"].items())


def _depth_factory(scheme, lr=1e-2):
    def make(width, depth):
        model = DepthNet(width=width, depth=depth)
        p = auto_parametrize(model, scheme, base_width=width, base_depth=2)
        return model, p.rewrite_optimizer(torch.optim.Adam(model.parameters(), lr=lr))

    return make


def test_depth_schemes_are_depth_stable_and_sp_grows():
    kwargs = dict(depths=[2, 4, 8, 16], loss_fn=F.cross_entropy, steps=3, seeds=2, modules=["stream", "readout"])
    for scheme in ("depth_mup", "completep"):
        result = coord_check(_depth_factory(scheme), [64], _batch(), **kwargs)
        for stat in ("l1", "delta_rms"):
            assert _max_spread(result, stat, x="depth") <= 1.3, (scheme, stat, result.spread(stat, x="depth"))
    sp = coord_check(_depth_factory("sp"), [64], _batch(), **kwargs)
    assert _max_spread(sp, "l1", x="depth") > 2.5
    assert sp.slopes("l1", x="depth")["stream"][2] > 0.5


def test_statistics_match_a_hand_computation():
    x, y = _batch(8, 5, 3)
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    h1 = ref[0](x).detach()
    out1 = ref(x).detach()
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()
    h2 = ref[0](x).detach()

    def make(width):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, width), nn.Tanh(), nn.Linear(width, 3))
        return model, torch.optim.SGD(model.parameters(), lr=0.3)

    rng_before = torch.random.get_rng_state()
    result = coord_check(make, [4], (x, y), loss_fn=F.cross_entropy, steps=2)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    rec = {(r["module"], r["step"]): r for r in result.records}
    assert rec[("0", 1)]["l1"] == pytest.approx(h1.abs().mean().item(), rel=1e-6)
    assert rec[("0", 1)]["rms"] == pytest.approx(h1.pow(2).mean().sqrt().item(), rel=1e-6)
    assert rec[("2", 1)]["l1"] == pytest.approx(out1.abs().mean().item(), rel=1e-6)
    assert rec[("0", 2)]["delta_rms"] == pytest.approx((h2 - h1).pow(2).mean().sqrt().item(), rel=1e-5)
    assert rec[("0", 1)]["delta_rms"] == 0.0


def test_slopes_spread_and_plot_on_synthetic_records():
    result = CoordCheckResult(modules=["a"])
    for w in (10, 100, 1000):
        for seed, noise in ((0, 0.9), (1, 1.1)):
            result.records.append({"width": w, "depth": None, "seed": seed, "step": 1, "module": "a",
                                   "l1": noise * w**0.5, "rms": 1.0, "delta_rms": 0.0, "loss": 0.0})  # fmt: skip
    assert result.slopes("l1")["a"][1] == pytest.approx(0.5)
    assert result.spread("l1")["a"][1] == pytest.approx(10.0)
    assert math.isnan(result.slopes("delta_rms")["a"][1])
    fig = result.plot("l1")
    assert len(fig.axes) == 1
    with pytest.raises(ValueError, match="unknown statistic"):
        result.values("l3")


def test_errors():
    with pytest.raises(ValueError, match="at least one width"):
        coord_check(lambda w: nn.Linear(2, w), [], _batch())
    with pytest.raises(ValueError, match="matches no module"):
        coord_check(lambda w: nn.Sequential(nn.Linear(20, w)), [4], _batch(), modules=["nope"],
                    loss_fn=lambda o, t: o.mean(), optimizer_factory=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))  # fmt: skip
    with pytest.raises(ValueError, match="optimizer_factory"):
        coord_check(lambda w: nn.Sequential(nn.Linear(20, w)), [4], _batch(), loss_fn=lambda o, t: o.mean())
