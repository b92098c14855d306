"""Example modules: shapes, saved hyper-parameters (re-instantiable), residual branches, training step."""

import pytest
import torch

from example_modules import GPT, MLP, ResMLP, ResNet, ViT
from example_modules.base import init_weights

CASES = [
    (MLP, dict(width=16, depth=2, norm="batch", dropout=0.1), torch.randn(4, 64), (4, 10)),
    (MLP, dict(width=16, depth=3, norm="layer", activation="tanh", init="orthogonal"), torch.randn(4, 64), (4, 10)),
    (ResMLP, dict(width=16, depth=3, branch_multiplier=None), torch.randn(4, 64), (4, 10)),
    (ResNet, dict(width=4, depth=2), torch.randn(4, 1, 8, 8), (4, 10)),
    (ViT, dict(width=16, depth=2, heads=2), torch.randn(4, 1, 8, 8), (4, 10)),
    (GPT, dict(width=16, depth=2, heads=2, block_size=8), torch.randint(0, 256, (4, 8)), (4, 8, 256)),
]


@pytest.mark.parametrize("cls,kwargs,x,shape", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_forward_shape_and_reinstantiation(cls, kwargs, x, shape) -> None:
    model = cls(**kwargs)
    assert tuple(model(x).shape) == shape
    assert model.hparams["width"] == kwargs["width"]
    with torch.device("meta"):
        wider = cls(**{**model.hparams, "width": 2 * kwargs["width"]})
    assert next(wider.parameters()).device.type == "meta"
    shapes = {n: p.shape for n, p in model.named_parameters()}
    wider_shapes = {n: p.shape for n, p in wider.named_parameters()}
    assert shapes.keys() == wider_shapes.keys(), "parameter names do not depend on width"


@pytest.mark.parametrize("cls", [ResMLP, ResNet, ViT, GPT])
def test_residual_branches_exist(cls) -> None:
    model = cls(width=8, depth=3, **({"heads": 2} if cls in (ViT, GPT) else {}))
    names = model.residual_branches
    assert len(names) == (6 if cls in (ViT, GPT) else 3)
    for name in names:
        model.get_submodule(name)


def test_branch_multiplier_none_is_inverse_sqrt_depth() -> None:
    model = ResMLP(width=8, depth=16, branch_multiplier=None)
    assert model.blocks[0].multiplier == pytest.approx(0.25)


def test_attention_exposes_scale_and_uses_it() -> None:
    vit = ViT(width=16, depth=1, heads=2)
    attn = vit.blocks[0].attn.attn
    assert attn.head_dim == 8 and attn.attn_scale == pytest.approx(8**-0.5)
    x = torch.randn(2, 1, 8, 8)
    before = vit(x)
    attn.attn_scale = 0.0  # uniform attention
    assert not torch.allclose(before, vit(x))


def test_training_step_returns_mean_loss_and_mse_option() -> None:
    model = MLP(width=8, depth=1, loss="mse")
    x, y = torch.randn(5, 64), torch.randint(0, 10, (5,))
    loss = model.loss(model(x), y)
    expected = torch.nn.functional.mse_loss(model(x), torch.nn.functional.one_hot(y, 10).float())
    assert torch.allclose(loss, expected)


def test_init_schemes_set_expected_scale() -> None:
    torch.manual_seed(0)
    model = MLP(width=512, depth=2, init="kaiming")
    w = model.layers[1].weight
    assert w.std().item() == pytest.approx((2 / 512) ** 0.5, rel=0.01)  # sampling error of 512² weights: 0.14%
    assert torch.all(model.layers[1].bias == 0)
    init_weights(model, "orthogonal", "tanh")
    q = model.layers[1].weight
    assert torch.allclose(q @ q.T, torch.eye(512) * (5 / 3) ** 2, atol=1e-4)


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="activation"):
        MLP(activation="swish")
    with pytest.raises(ValueError, match="optimizer"):
        MLP(optimizer="lion")
    with pytest.raises(ValueError, match="width and depth"):
        ResMLP(depth=0)
    with pytest.raises(ValueError, match="divisible"):
        ViT(width=10, heads=3)
    with pytest.raises(ValueError, match="block_size"):
        GPT(width=8, heads=2, block_size=4)(torch.zeros(1, 6, dtype=torch.long))
