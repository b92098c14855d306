"""Parametrization on every example module: roles, attention and branch multipliers, a short fit."""

from __future__ import annotations

import math

import example_modules
import pytest
import torch
from helpers import fit
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.coord_check import CoordCheck
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.parametrize.auto import auto_parametrize


def _loader(kind: str, n: int = 32) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if kind == "gpt":
        x = torch.randint(0, 256, (n, 9), generator=g)
        return DataLoader(TensorDataset(x[:, :-1], x[:, 1:]), batch_size=8)
    shape = (n, 1, 8, 8) if kind in ("resnet", "vit") else (n, 64)
    return DataLoader(TensorDataset(torch.randn(*shape, generator=g), torch.randint(0, 10, (n,), generator=g)), batch_size=8)


CASES = {
    "mlp": (lambda w, d: example_modules.MLP(width=w, depth=d, optimizer="adam", lr=1e-3), "mup",
            {"layers.0.weight": "input", "layers.1.weight": "hidden", "readout.weight": "output", "readout.bias": "fixed"}),
    "resmlp": (lambda w, d: example_modules.ResMLP(width=w, depth=d), "depth_mup",
               {"embed.weight": "input", "blocks.0.branch.linear.weight": "hidden", "readout.weight": "output"}),
    "resnet": (lambda w, d: example_modules.ResNet(width=w, depth=d), "completep",
               {"stem.weight": "input", "blocks.0.branch.conv1.weight": "hidden", "readout.weight": "output"}),
    "vit": (lambda w, d: example_modules.ViT(width=w, depth=d, heads=2), "completep",
            {"patch_embed.weight": "input", "pos_emb": "input", "blocks.0.mlp.fc1.weight": "hidden", "readout.weight": "output"}),
    "gpt": (lambda w, d: example_modules.GPT(width=w, depth=d, heads=2, block_size=8), "depth_mup",
            {"tok_emb.weight": "input", "blocks.1.attn.attn.qkv.weight": "hidden", "lm_head.weight": "output",
             "ln_f.weight": "vector"}),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(CASES))
def test_roles_and_multipliers(kind):
    make, scheme, roles = CASES[kind]
    model = make(64, 4)
    p = auto_parametrize(model, scheme, base_width=16, base_depth=1)
    for name, role in roles.items():
        assert p.infos[name].role == role, name
    branches = getattr(model, "residual_branches", [])
    assert p.branches == (branches if scheme != "mup" else [])
    assert all(p.infos[n].in_branch == any(n.startswith(b + ".") for b in p.branches) for n in p.infos)
    if kind in ("vit", "gpt"):  # head_dim 32 vs base 8: logits 1/d, equal to SP at the base
        assert set(p.attention) == {f"blocks.{i}.attn.attn" for i in range(4)}
        attn = dict(model.named_modules())["blocks.0.attn.attn"]
        assert attn.attn_scale == pytest.approx(math.sqrt(8) / 32)


@pytest.mark.parametrize("kind", list(CASES))
def test_short_fit_with_coord_check(kind):
    make, scheme, _ = CASES[kind]
    torch.manual_seed(0)
    module = make(32, 2)
    cb = Parametrization(scheme, base_width=16, base_depth=1, verbose=False)
    _, trainer = fit([cb, CoordCheck(every_n_steps=2, probe_size=8)], module=module, loader=_loader(kind), max_steps=2)
    metrics = trainer.callback_metrics
    assert any(k.startswith("coord/rms/") for k in metrics)
    assert all(torch.isfinite(v).all() for v in metrics.values())
    lrs = {g["lr"] for g in trainer.optimizers[0].param_groups}
    assert len(lrs) > 1  # per-role learning rates


def test_vit_input_mult_on_raw_parameter_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot apply the input_mult to ''"):
        auto_parametrize(example_modules.ViT(width=32, depth=1, heads=2), "mup", base_width=16, input_mult=2.0)
