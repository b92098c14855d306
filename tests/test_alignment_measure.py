"""Oracle tests of lightning_align.measure.alignment against explicit Jacobians and finite differences."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_align.measure.alignment import feature_kernel, feature_speed
from lightning_align.measure.modules import captured_outputs

F = nn.functional


class Block(nn.Module):
    """Residual conv block: h + branch(h); its output is the residual stream (a cut of the network)."""

    def __init__(self, c: int, beta: float = 0.5) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.beta = beta

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.beta * self.branch(h)


def mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)
    ).double()


def resnet() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), Block(3), Block(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    ).double()


def mlp_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g)


def resnet_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (4,), generator=g)


def oracle(model, batch, names, delta):
    """Brute force: explicit Jacobian of every feature, b by autograd, gradients by autograd."""
    pnames = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta0 = torch.cat([p.detach().flatten() for _, p in model.named_parameters()])
    mods = {n: model.get_submodule(n) for n in names}
    x, y = batch

    def unflat(v):
        out, i = {}, 0
        for n, s in zip(pnames, shapes):
            out[n] = v[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def feats(v):
        with captured_outputs(mods) as st:
            functional_call(model, {**unflat(v), **dict(model.named_buffers())}, (x,))
        return torch.cat([st[n].flatten() for n in names])

    sizes = []
    with captured_outputs(mods) as st:
        out = functional_call(model, {**unflat(theta0), **dict(model.named_buffers())}, (x,))
    fs = [st[n] for n in names]
    sizes = [t.numel() for t in fs]
    theta = theta0.clone().requires_grad_(True)
    with captured_outputs(mods) as st:
        out = functional_call(model, {**unflat(theta), **dict(model.named_buffers())}, (x,))
    loss = F.cross_entropy(out, y)
    g = torch.autograd.grad(loss, [st[n] for n in names] + [theta])
    bs, grad = g[:-1], g[-1]
    jac = torch.autograd.functional.jacobian(feats, theta0)  # (sum D, P)
    dvec = torch.cat([delta[n].flatten() for n in pnames])
    dfs = torch.split(jac @ dvec, sizes)
    eps = 1e-6
    fd = torch.split((feats(theta0 + eps * dvec) - feats(theta0 - eps * dvec)) / (2 * eps), sizes)
    res = {}
    for n, f, b, df, dff in zip(names, fs, bs, dfs, fd):
        b = b.flatten()
        res[n] = dict(
            cos=float(-(b @ df) / (b.norm() * df.norm())),
            speed=float(df.norm() / f.norm()),
            fd_speed=float(dff.norm() / f.norm()),
            through=float(-(b @ df)),
            jac=jac,
        )
    return res, grad, unflat(grad)


def random_update(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: 0.01 * torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("given", [False, True])
def test_against_explicit_jacobian_and_finite_differences(kind, given):
    torch.manual_seed(0)
    model, batch = (mlp(), mlp_batch()) if kind == "mlp" else (resnet(), resnet_batch())
    names = ["0", "3", "5"] if kind == "mlp" else ["0", "1", "1.branch.1", "2", "4"]
    grads = None
    if given:
        delta = random_update(model)
    else:
        _, _, grads = oracle(model, batch, names, random_update(model))
        delta = {n: -0.3 * g for n, g in grads.items()}
    res = feature_speed(model, F.cross_entropy, batch, names, lr=0.3, update=delta if given else None)
    ref, _, g = oracle(model, batch, names, delta)
    assert list(res) == names
    for n in names:
        assert res[n].cos_angle == pytest.approx(ref[n]["cos"], rel=1e-5, abs=1e-8)
        assert res[n].speed == pytest.approx(ref[n]["speed"], rel=1e-5)
        assert res[n].speed == pytest.approx(ref[n]["fd_speed"], rel=1e-5)
        assert res[n].feature_loss_decrease == pytest.approx(ref[n]["through"], rel=1e-5, abs=1e-12)
    # loss decrease: all parameters
    total = -sum(float((g[n] * delta[n]).sum()) for n in g)
    assert res.loss_decrease == pytest.approx(total, rel=1e-8)


def test_upstream_parameters_and_chain_rule_identity():
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    res = feature_speed(model, F.cross_entropy, batch, ["0", "3", "5"], update=random_update(model, 3))
    assert res["0"].upstream == ("0.weight", "0.bias")
    assert res["3"].upstream == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    assert len(res["5"].upstream) == len(list(model.parameters()))
    _, _, g = oracle(model, batch, ["0"], random_update(model, 3))
    delta = random_update(model, 3)
    for n in ["0", "3", "5"]:
        # loss decrease from upstream parameters (brute force sum) ...
        brute = -sum(float((g[p] * delta[p]).sum()) for p in res[n].upstream)
        assert res[n].loss_decrease == pytest.approx(brute, rel=1e-8)
        # ... equals -<b, δf> (chain rule, exact at first order for a sequential net)
        assert res[n].feature_loss_decrease == pytest.approx(res[n].loss_decrease, rel=1e-8)
        # hence the feature speed formula reproduces the measured speed
        assert res[n].predicted_speed == pytest.approx(res[n].speed, rel=1e-8)


def test_residual_branch_is_not_a_cut():
    """Upstream parameters reach the loss through the skip connection too: the formula needs the stream."""
    torch.manual_seed(0)
    model, batch = resnet(), resnet_batch()
    res = feature_speed(model, F.cross_entropy, batch, ["1", "1.branch.1"], lr=0.1)
    assert res["1"].predicted_speed == pytest.approx(res["1"].speed, rel=1e-6)
    assert "0.weight" in res["1.branch.1"].upstream
    assert abs(res["1.branch.1"].feature_loss_decrease - res["1.branch.1"].loss_decrease) > 1e-6 * abs(res["1.branch.1"].loss_decrease)


def test_predicted_speed_matches_finite_difference_step_to_first_order():
    """‖f(θ+tΔθ) − f(θ)‖/(t‖f‖) → predicted speed as t → 0 (error O(t))."""
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    model.eval()
    res = feature_speed(model, F.cross_entropy, batch, ["3"], lr=1.0)
    _, _, g = oracle(model, batch, ["3"], random_update(model))
    errs = []
    for t in (1e-2, 1e-3):
        with captured_outputs({"3": model[3]}) as st:
            model(batch[0])
        f0 = st["3"].detach()
        moved = {n: p.detach() - t * g[n] for n, p in model.named_parameters()}
        with captured_outputs({"3": model[3]}) as st:
            functional_call(model, {**moved, **dict(model.named_buffers())}, (batch[0],))
        measured = float((st["3"] - f0).norm() / f0.norm()) / t
        errs.append(abs(measured / res["3"].predicted_speed - 1))
    assert errs[1] < errs[0] / 5 and errs[1] < 1e-2


def test_params_override_evaluates_elsewhere():
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    other = mlp()
    point = {n: p.detach() for n, p in other.named_parameters()}
    a = feature_speed(model, F.cross_entropy, batch, ["3"], params=point, lr=0.2)
    b = feature_speed(other, F.cross_entropy, batch, ["3"], lr=0.2)
    assert a["3"].speed == pytest.approx(b["3"].speed, rel=1e-10)
    assert a["3"].cos_angle == pytest.approx(b["3"].cos_angle, rel=1e-10)


def test_lrs_scale_the_gradient_step_and_frozen_parameters_do_not_move():
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    res = feature_speed(model, F.cross_entropy, batch, ["0", "3"], lrs={"0.weight": 0.0, "0.bias": 0.0})
    assert res["0"].speed == 0.0 and math.isnan(res["0"].cos_angle)
    model[0].weight.requires_grad_(False)
    model[0].bias.requires_grad_(False)
    res2 = feature_speed(model, F.cross_entropy, batch, ["3"])
    assert res2["3"].upstream == ("1.weight", "1.bias", "3.weight", "3.bias")
    assert res2["3"].speed == pytest.approx(res["3"].speed, rel=1e-10)


def test_no_side_effects():
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    model.train()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    feature_speed(model, F.cross_entropy, batch, None, lr=0.1)
    feature_kernel(model, F.cross_entropy, batch, "3")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[3].bias.grad is None
    assert model.training and model[1].track_running_stats
    assert torch.equal(torch.get_rng_state(), rng)


def test_loss_model_without_loss_fn_and_inplace_activation():
    """``loss_fn=None``: the model maps the batch to the loss (like ProbeLoss); in-place ReLU is safe."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 6), nn.ReLU(inplace=True), nn.Linear(6, 3)).double()

    class LossModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = net

        def forward(self, batch):
            return F.cross_entropy(self.module(batch[0]), batch[1])

    batch = mlp_batch()
    a = feature_speed(LossModel(), None, batch, {"first": net[0], "last": net[2]}, lr=0.5)
    b = feature_speed(net, F.cross_entropy, batch, ["0", "2"], lr=0.5)
    assert a["first"].upstream == ("module.0.weight", "module.0.bias")
    for x, y in (("first", "0"), ("last", "2")):
        assert a[x].speed == pytest.approx(b[y].speed, rel=1e-10)
        assert a[x].predicted_speed == pytest.approx(a[x].speed, rel=1e-8)


def test_clear_errors():
    model, batch = mlp(), mlp_batch()
    with pytest.raises(ValueError, match="'layer9'"):
        feature_speed(model, F.cross_entropy, batch, ["layer9"])
    with pytest.raises(ValueError, match="bogus.weight"):
        feature_speed(model, F.cross_entropy, batch, ["0"], update={"bogus.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="0.weight"):
        feature_speed(model, F.cross_entropy, batch, ["0"], update={"0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="not called"):
        feature_speed(model, F.cross_entropy, batch, {"extra": nn.Linear(2, 2)})


def test_feature_kernel_against_explicit_jacobian():
    torch.manual_seed(0)
    model, batch = mlp(), mlp_batch()
    lrs = {"0.weight": 2.0, "3.bias": 0.5}
    k = feature_kernel(model, F.cross_entropy, batch, "3", lr=0.3, lrs=lrs)
    ref, _, g = oracle(model, batch, ["3"], random_update(model))
    jac = ref["3"]["jac"]
    eta = torch.cat([torch.full((p.numel(),), 0.3 * lrs.get(n, 1.0), dtype=torch.float64) for n, p in model.named_parameters()])
    brute = (jac * eta) @ jac.T
    torch.testing.assert_close(k.matrix, brute, rtol=1e-5, atol=1e-10)
    # δf = −K b for the gradient step with the same learning rates
    delta = {n: -0.3 * lrs.get(n, 1.0) * g[n] for n in g}
    res = feature_speed(model, F.cross_entropy, batch, ["3"], update=delta)
    x, y = batch
    with captured_outputs({"3": model[3]}) as st:
        loss = F.cross_entropy(model(x), y)
    b = torch.autograd.grad(loss, st["3"])[0].flatten()
    df = -(k.matrix @ b)
    assert res["3"].speed == pytest.approx(float(df.norm() / st["3"].norm()), rel=1e-6)
    assert res["3"].cos_angle == pytest.approx(float(-(b @ df) / (b.norm() * df.norm())), rel=1e-6)
    ev = torch.linalg.eigvalsh(brute)
    assert k.mean_rms_ratio == pytest.approx(float(ev.mean() / ev.square().mean().sqrt()), rel=1e-6)


def test_spectrum_predicts_alignment_of_generic_backward_vectors():
    """cos θ for a random b concentrates at mean(λ)/rms(λ) (wide layer, one input)."""
    torch.manual_seed(0)
    net = nn.Sequential(*[m for _ in range(4) for m in (nn.Linear(64, 64), nn.ReLU())], nn.Linear(64, 64)).double()
    for m in net:
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    x = torch.randn(1, 64, dtype=torch.float64)
    k = feature_kernel(net, None, x, {"out": net[8]})
    b = torch.randn(64, 200, dtype=torch.float64)
    kb = k.matrix @ b
    cos = ((b * kb).sum(0) / (b.norm(dim=0) * kb.norm(dim=0))).mean()
    assert float(cos) == pytest.approx(k.mean_rms_ratio, abs=0.05)


def test_attention_model_against_finite_differences():
    """Forward-mode AD through scaled_dot_product_attention (fused CPU kernels lack it)."""
    import example_modules
    torch.manual_seed(0)
    model = example_modules.GPT(width=16, depth=1, heads=2, block_size=8).double()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (2, 8), generator=g), torch.randint(0, 256, (2, 8), generator=g)
    names = ["blocks.0.attn", "lm_head"]
    res = feature_speed(model, model.loss, (x, y), names, lr=0.1)
    params = dict(model.named_parameters())
    grads = dict(zip(params, torch.autograd.grad(model.loss(model(x), y), list(params.values()))))
    mods = {n: model.get_submodule(n) for n in names}

    def feats(t):
        moved = {n: p.detach() - t * 0.1 * grads[n] for n, p in params.items()}
        with captured_outputs(mods) as st:
            functional_call(model, moved, (x,))
        return st

    f0, plus, minus = feats(0.0), feats(1e-5), feats(-1e-5)
    for n in names:
        df = (plus[n] - minus[n]) / 2e-5
        assert res[n].speed == pytest.approx(float(df.norm() / f0[n].norm()), rel=1e-5)
    assert res["lm_head"].predicted_speed == pytest.approx(res["lm_head"].speed, rel=1e-8)
