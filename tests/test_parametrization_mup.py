"""Parity with microsoft/mup 1.0.0: learning rates, weight decay, init and network function.

For each model we build the same architecture twice from the same seed: ours with a plain ``nn.Linear``
readout parametrized by :func:`auto_parametrize`, mup's with ``MuReadout`` and ``set_base_shapes``. Both
draw the same numbers, so init must agree exactly; per-parameter LR / weight decay must equal what
MuAdam / MuAdamW / MuSGD give; outputs must agree on the same weights.
"""

from __future__ import annotations

import math

import pytest
import torch
from mup import MuAdam, MuAdamW, MuSGD, set_base_shapes
from param_nets import MLPNet, TinyGPT

from lightning_align.parametrize.auto import auto_parametrize

BASE = 16


def _pair(cls, width, base=BASE, seed=0, **kw):
    torch.manual_seed(seed)
    ours = cls(width=width, **kw)
    torch.manual_seed(seed)
    theirs = cls(width=width, mu=True, **kw)
    with torch.device("meta"):
        base_m, delta_m = cls(width=base, mu=True, **kw), cls(width=2 * base, mu=True, **kw)
    set_base_shapes(theirs, base_m, delta=delta_m)
    return ours, theirs


def _per_param(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            out[names[id(p)]] = (g["lr"], g["weight_decay"], g.get("eps"))
    return out


def _groups(model, split_bias):
    if not split_bias:
        return list(model.parameters())
    named = list(model.named_parameters())
    return [
        {"params": [p for n, p in named if n.endswith("weight")]},
        {"params": [p for n, p in named if not n.endswith("weight")], "weight_decay": 0.0, "lr": 3e-3},
    ]


OPTIMIZERS = [
    (MuAdam, torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-3, "eps": 1e-8}),
    (MuAdamW, torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (MuSGD, torch.optim.SGD, {"lr": 0.1, "weight_decay": 1e-4, "momentum": 0.9}),
]


@pytest.mark.parametrize("net", ["mlp", "gpt"])
@pytest.mark.parametrize("width", [BASE, 48, 128])
@pytest.mark.parametrize("mu_opt,torch_opt,kw", OPTIMIZERS, ids=["adam", "adamw", "sgd"])
@pytest.mark.parametrize("split_bias", [False, True])
def test_learning_rates_equal_mup_exactly(net, width, mu_opt, torch_opt, kw, split_bias):
    cls = MLPNet if net == "mlp" else TinyGPT
    ours, theirs = _pair(cls, width)
    p = auto_parametrize(ours, "mup", base_width=BASE)
    opt = p.rewrite_optimizer(torch_opt(_groups(ours, split_bias), **kw))
    ref = mu_opt(_groups(theirs, split_bias), **kw)
    got, want = _per_param(ours, opt), _per_param(theirs, ref)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == want[name], f"{name}: ours {got[name]} vs mup {want[name]}"
    if width == 128 and not split_bias:  # the check has power: some LRs really differ from the base LR
        assert {v[0] for v in got.values()} != {kw["lr"]}


@pytest.mark.parametrize("width", [BASE, 64])
@pytest.mark.parametrize("output_mult", [1.0, 2.5])
def test_mlp_init_and_function_equal_mureadout(width, output_mult):
    ours, theirs = _pair(MLPNet, width, output_mult=output_mult)
    auto_parametrize(ours, "mup", base_width=BASE, output_mult=output_mult)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    for k in sd_theirs:  # init: set_base_shapes's rescaling, exactly
        assert torch.equal(sd_ours[k], sd_theirs[k]), k
    x = torch.randn(7, 20)
    assert torch.equal(ours(x), theirs(x))


def test_readout_zero_init_matches_mup():
    ours, theirs = _pair(MLPNet, 64, zero=False)
    torch.manual_seed(0)
    theirs_zero = MLPNet(width=64, mu=True, zero=True)
    with torch.device("meta"):
        set_base_shapes(theirs_zero, MLPNet(width=BASE, mu=True), delta=MLPNet(width=2 * BASE, mu=True))
    auto_parametrize(ours, "mup", base_width=BASE, readout_zero_init=True)
    assert torch.count_nonzero(ours.readout.weight) == 0 and torch.count_nonzero(ours.readout.bias) == 0
    assert torch.equal(ours.fc2.weight, theirs_zero.fc2.weight)


def test_gpt_function_equals_mup_model_on_same_weights():
    width = 64
    ours, theirs = _pair(TinyGPT, width)
    p = auto_parametrize(ours, "mup", base_width=BASE)
    d, d0 = width // 2, BASE // 2
    for block in theirs.blocks:  # mup's attention convention: attn_mult / d with attn_mult = sqrt(d0)
        block.attn.attn_scale = math.sqrt(d0) / d
    assert sorted(p.attention) == ["blocks.0.attn", "blocks.1.attn"]
    theirs.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 32, (3, 8))
    torch.testing.assert_close(ours(idx), theirs(idx), rtol=1e-6, atol=1e-6)
    # without our hooks the outputs differ: the check has power
    p.remove_hooks()
    assert not torch.allclose(ours(idx), theirs(idx), atol=1e-4)


def test_init_std_within_sampling_error_for_orthogonal_and_normal():
    width = 256
    _, theirs = _pair(MLPNet, width, seed=1)
    for init in ("normal", "orthogonal"):
        torch.manual_seed(2)
        ours = MLPNet(width=width)
        auto_parametrize(ours, "mup", base_width=BASE, init=init)
        for name in ("fc1.weight", "fc2.weight", "readout.weight"):
            a = dict(ours.named_parameters())[name].std().item()
            b = dict(theirs.named_parameters())[name].std().item()
            assert abs(a / b - 1) < 0.1, f"{init} {name}: std {a} vs mup {b}"
        if init == "orthogonal":  # orthogonal directions: the hidden weight is a scaled orthogonal matrix
            w = ours.fc2.weight.detach()
            gram = w @ w.T / (w.pow(2).sum() / width)
            torch.testing.assert_close(gram, torch.eye(width), atol=1e-4, rtol=0)


def test_base_width_is_sp_bit_exact():
    torch.manual_seed(0)
    sp = TinyGPT(width=32)
    torch.manual_seed(0)
    model = TinyGPT(width=32)
    p = auto_parametrize(model, "mup", base_width=32)
    assert not p.handles and not p.attention
    for k, v in sp.state_dict().items():
        assert torch.equal(model.state_dict()[k], v)
    opt = p.rewrite_optimizer(torch.optim.Adam(model.parameters(), lr=1e-3))
    assert [g["lr"] for g in opt.param_groups] == [1e-3]
    idx = torch.randint(0, 32, (2, 8))
    assert torch.equal(model(idx), sp(idx))


def test_input_mult_and_decoupled_wd():
    torch.manual_seed(0)
    plain = MLPNet(width=64)
    torch.manual_seed(0)
    model = MLPNet(width=64)
    p = auto_parametrize(model, "mup", base_width=BASE, input_mult=3.0, decoupled_wd=True)
    x = torch.randn(5, 20)
    torch.testing.assert_close(model.fc1(x), 3.0 * plain.fc1(x))
    opt = p.rewrite_optimizer(torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1))
    per = _per_param(model, opt)
    assert per["fc2.weight"][:2] == (1e-2 / 4.0, 0.1)  # LR scaled, weight decay not
    with pytest.raises(ValueError, match="ASGD|LBFGS is not supported"):
        p.rewrite_optimizer(torch.optim.LBFGS(model.parameters()))
