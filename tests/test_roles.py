"""Role detection against mup's infshapes, regex overrides, and the clear errors of auto_parametrize."""

from __future__ import annotations

import pytest
import torch
from mup import set_base_shapes
from param_nets import LitMLP, MLPNet, TinyGPT
from torch import nn

from lightning_align.parametrize.auto import auto_parametrize
from lightning_align.parametrize.roles import infer_roles
from lightning_align.parametrize.rules import branch_multiplier, optimizer_rule


def _meta(cls, **kw):
    with torch.device("meta"):
        return cls(**kw)


def test_roles_of_gpt_agree_with_mup_infshapes():
    model = TinyGPT(width=64)
    infos = infer_roles(model, _meta(TinyGPT, width=16), _meta(TinyGPT, width=32))
    ref = TinyGPT(width=64, mu=True)
    set_base_shapes(ref, _meta(TinyGPT, width=16, mu=True), delta=_meta(TinyGPT, width=32, mu=True))
    for name, p in ref.named_parameters():
        info = infos[name]
        assert info.ninf == p.infshape.ninf(), name
        assert info.width_mult == p.infshape.width_mult(), name
        if info.ninf == 2:
            assert info.fanin_fanout_ratio == p.infshape.fanin_fanout_mult_ratio(), name
    roles = {n: i.role for n, i in infos.items()}
    assert roles["tok_emb.weight"] == roles["pos_emb.weight"] == "input"
    assert roles["blocks.0.attn.qkv.weight"] == roles["blocks.1.mlp.2.weight"] == "hidden"
    assert roles["blocks.0.ln1.weight"] == roles["blocks.0.mlp.0.bias"] == "vector"
    assert roles["lm_head.weight"] == "output"
    assert roles["lm_head.bias"] == "fixed"


def test_role_overrides_and_their_errors():
    model = MLPNet(width=64)
    base, delta = _meta(MLPNet, width=16), _meta(MLPNet, width=32)
    infos = infer_roles(model, base, delta, {r"fc1\..*": "vector"})
    assert infos["fc1.weight"].role == infos["fc1.bias"].role == "vector"
    with pytest.raises(ValueError, match="role 'bogus'"):
        infer_roles(model, base, delta, {"fc1.weight": "bogus"})
    with pytest.raises(ValueError, match=r"pattern 'nope\\\\..\*' matches no parameter|matches no parameter"):
        infer_roles(model, base, delta, {r"nope\..*": "hidden"})


def test_branch_multipliers_and_depth_factors():
    assert branch_multiplier("depth_mup", 16 / 2) == pytest.approx(8**-0.5)
    assert branch_multiplier("completep", 8.0) == pytest.approx(1 / 8)
    assert branch_multiplier("mup", 8.0) == 1.0
    model = LitMLP(width=64, depth=4)
    p = auto_parametrize(model, "completep", base_width=16, base_depth=2, branch_pattern=r"layers\.[123]")
    hidden = p.infos["layers.1.weight"]
    assert hidden.in_branch and not p.infos["layers.0.weight"].in_branch
    adam = optimizer_rule(hidden, "completep", "adam", depth_mult=2.0)
    assert adam.lr.value == pytest.approx(1 / 4)  # η/m, no depth factor at α = 1
    assert adam.eps.value == pytest.approx(1 / 4 / 2)  # ε·m^-1·m_L^-α
    dmup = optimizer_rule(hidden, "depth_mup", "adam", depth_mult=4.0)
    assert dmup.lr.value == pytest.approx(1 / 4 / 2)  # η/m · m_L^-1/2
    assert optimizer_rule(hidden, "depth_mup", "sgd", depth_mult=4.0).lr.value == pytest.approx(1.0)
    assert optimizer_rule(hidden, "completep", "sgd", depth_mult=4.0).lr.value == pytest.approx(4.0)
    ntk = optimizer_rule(hidden, "ntk", "sgd")
    assert ntk.lr.value == pytest.approx(1 / 4)


class _Broken(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        if width != 64:
            raise RuntimeError("only width 64 is supported")
        self.hparams = {"width": width}
        self.fc = nn.Linear(width, 2)


class _NoHparams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)


@pytest.mark.parametrize(
    "make,kwargs,match",
    [
        (lambda: MLPNet(width=64), {"scheme": "mupp"}, "unknown scheme 'mupp'"),
        (lambda: MLPNet(width=64), {"width_keys": ["d_model"]}, r"width key\(s\) \['d_model'\]"),
        (lambda: MLPNet(width=64), {"base_width": 24, "width_keys": ["width", "in_features"]}, "non-integer base 'in_features'"),
        (lambda: MLPNet(width=64), {"base_width": 0}, "base_width must be a positive int"),
        (lambda: _Broken(), {"base_width": 16}, "cannot re-instantiate _Broken"),
        (lambda: _NoHparams(), {}, "save_hyperparameters"),
        (lambda: MLPNet(width=64), {"scheme": "depth_mup"}, "needs the residual branches"),
        (lambda: MLPNet(width=64), {"branch_pattern": r"blocks\.\d+"}, "matches no module of MLPNet"),
        (lambda: TinyGPT(width=64), {"scheme": "completep", "depth_keys": ["n_layer"]}, "depth key 'n_layer'"),
    ],
)
def test_clear_errors(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        auto_parametrize(make(), **kwargs)
