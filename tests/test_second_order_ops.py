"""Second-order measurements through ops without a double backward: the right value or NaN with one warning, never a crash.

- ``hardsigmoid`` (MobileNetV3's squeeze-excitation gate) runs as an exact twice-differentiable form inside the
  probes: Sharpness equals the dense float64 Hessian of the same model written with ``clamp(x/6 + 1/2, 0, 1)``,
  FeatureAlignment's ``J·Δθ`` a float64 central difference of the forward;
- ``embedding_bag`` (no double backward, no forward-mode AD, next to a BatchNorm that forward-over-reverse refuses)
  and a custom ``autograd.Function`` with an ``@once_differentiable`` backward (which torch would differentiate twice
  silently wrong): both callbacks switch to finite differences, checked by halving the step, with one warning each;
- a forward that jumps at the probe point (a floor quantizer with a straight-through backward): NaN and one warning.

Training is bit-identical with and without the callbacks in every case.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, NetClassifier, assert_same_training_state, fit
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_align import FeatureAlignment, FeatureSpeedControl, Sharpness
from lightning_align.measure.autodiff import once_differentiable_functions, twice_differentiable
from lightning_align.measure.operators import hessian_operator

pytestmark = pytest.mark.filterwarnings("ignore:.*(does not have many workers|non-finite values).*")
LR, STEPS = 0.5, 3


def clamp_hardsigmoid(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(x / 6 + 0.5, 0, 1)


class ClampHardsigmoid(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return clamp_hardsigmoid(x)


class OnceTanh(torch.autograd.Function):
    """tanh whose backward is marked once-differentiable."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class FloorSTE(torch.autograd.Function):
    """``floor(8x)/8`` with a straight-through (identity) once-differentiable backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return torch.floor(8 * x) / 8

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad


class Excite(nn.Module):
    """Conv-BatchNorm-hardswish, a squeeze-excitation gate ``nn.Hardsigmoid``, and ``F.hardsigmoid`` in user code
    (``clamp=True``: both written as the clamp form, for the oracle)."""

    def __init__(self, clamp: bool = False) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.fc1, self.fc2, self.head = nn.Linear(4, 3), nn.Linear(3, 4), nn.Linear(4, 3)
        self.gate = ClampHardsigmoid() if clamp else nn.Hardsigmoid()
        self.hardsigmoid = clamp_hardsigmoid if clamp else F.hardsigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.hardswish(self.bn(self.conv(x)))
        h = h * self.gate(6 * self.fc2(F.relu(self.fc1(h.mean((2, 3))))))[:, :, None, None]  # some inputs beyond ±3
        z = h.mean((2, 3))
        return self.head(z * self.hardsigmoid(12 * z))


class Bag(nn.Module):
    """``nn.EmbeddingBag`` (mean), Linear-BatchNorm, an activation (``"tanh"``, ``"once"``: :class:`OnceTanh`,
    ``"floor"``: :class:`FloorSTE`), Linear. ``dense=True``: the bag as ``F.embedding`` and a mean, for the oracle."""

    def __init__(self, act: str = "tanh", dense: bool = False) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(10, 6, mode="mean", padding_idx=0)
        self.fc, self.bn, self.head = nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3)
        self.act, self.dense = act, dense
        if act == "floor":  # a padding-only bag has the pre-activation 0, on a step of the quantizer
            nn.init.zeros_(self.fc.bias)
            self.bn = nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dense:
            e = F.embedding(ids, self.embed.weight, padding_idx=0)
            kept = (ids != 0).to(e.dtype)[..., None]
            e = (e * kept).sum(1) / kept.sum(1).clamp_min(1)
        else:
            e = self.embed(ids)
        h = self.bn(self.fc(e))
        h = {"tanh": torch.tanh, "once": OnceTanh.apply, "floor": lambda t: torch.tanh(FloorSTE.apply(t))}[self.act](h)
        return self.head(h)


class Classifier(NetClassifier):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


def images() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(3 * torch.randn(16, 1, 5, 5, generator=g), torch.randint(0, 3, (16,), generator=g))


def bags() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 10, (16, 4), generator=g)
    ids[0] = 0  # one bag of padding only
    return TensorDataset(ids, torch.randint(0, 3, (16,), generator=g))


MODELS = {
    "hardsigmoid": (lambda: Excite(), lambda: Excite(clamp=True), images),
    "embedding_bag": (lambda: Bag("tanh"), lambda: Bag("tanh", dense=True), bags),
    "once_differentiable": (lambda: Bag("once", dense=True), lambda: Bag("tanh", dense=True), bags),
    "floor_quantizer": (lambda: Bag("floor"), None, bags),
}


@dataclass
class Run:
    module: pl.LightningModule
    logger: MemoryLogger
    sharpness: Sharpness
    alignment: FeatureAlignment
    messages: list[str]

    def warnings_of(self, owner: str) -> list[str]:
        return [m for m in self.messages if m.startswith(owner)]


@functools.cache
def run(case: str) -> Run:
    """The measured fit of ``case`` (after checking it trains bit-identically to the plain one)."""
    build, _, data = MODELS[case]
    loader = lambda: DataLoader(data(), batch_size=8, shuffle=True)  # noqa: E731
    callbacks = [Sharpness(every_n_steps=1, probe_size=16, tol=1e-3), FeatureAlignment(every_n_steps=1, probe_size=16)]
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = fit(callbacks, lambda: Classifier(build()), loader(), max_steps=STEPS, logger=logger)
    assert_same_training_state(fit([], lambda: Classifier(build()), loader(), max_steps=STEPS), measured)
    return Run(measured[0], logger, *callbacks, [str(w.message) for w in caught])


def initial(net: nn.Module, case: str) -> nn.Module:
    """``net`` (an oracle form) with the weights the fits start from, in float64, train mode (BatchNorm on batch
    statistics, as the probes, without updating its running ones)."""
    pl.seed_everything(0, verbose=False)
    net.load_state_dict(Classifier(MODELS[case][0]()).net.state_dict())
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    return net.double().train()


def dense_top_eigenvalue(net: nn.Module, batch: Any) -> float:
    """The top eigenvalue of the float64 Hessian of the cross-entropy on ``batch`` (reverse over reverse: forward-mode
    AD is wrong through BatchNorm's weight gradient in torch 2.14)."""
    x, y = (t.double() if t.is_floating_point() else t for t in batch)
    names, shapes = zip(*[(n, p.shape) for n, p in net.named_parameters()])
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def loss(v: torch.Tensor) -> torch.Tensor:
        parts = [c.view(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes)]
        return F.cross_entropy(functional_call(net, dict(zip(names, parts)), (x,)), y)

    return float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1])


def float64_feature_speeds(net: nn.Module, batch: Any, layers: list[str]) -> dict[str, tuple[float, float]]:
    """``{layer: (cos, speed)}`` of the step ``Δθ = −lr ∇L``, with ``J·Δθ`` a float64 central difference of the forward."""
    x, y = (t.double() if t.is_floating_point() else t for t in batch)
    params = list(net.parameters())
    feats: dict[str, torch.Tensor] = {}
    hooks = [net.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: feats.__setitem__(n, o)) for n in layers]
    loss = F.cross_entropy(net(x), y)
    grads = torch.autograd.grad(loss, [feats[n] for n in layers] + params)
    backs, delta = dict(zip(layers, grads[: len(layers)])), [-LR * g for g in grads[len(layers):]]
    f0 = {n: feats[n].detach() for n in layers}
    theta = [p.detach().clone() for p in params]
    h = 1e-6 * math.sqrt(sum(float(t.square().sum()) for t in theta) / sum(float(d.square().sum()) for d in delta))

    def at(sign: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            for p, t, d in zip(params, theta, delta):
                p.copy_(t + sign * h * d)
            net(x)
        return {n: feats[n].detach() for n in layers}

    plus, minus = at(1.0), at(-1.0)
    for hook in hooks:
        hook.remove()
    out = {}
    for n in layers:
        df, b = (plus[n] - minus[n]) / (2 * h), backs[n]
        out[n] = (float(-(b * df).sum() / (b.norm() * df.norm())), float(df.norm() / f0[n].norm()))
    return out


def logged_speeds(r: Run, step: int = 0) -> dict[str, tuple[float, float]]:
    """``{layer of the net: (cos, speed)}`` logged at ``step``."""
    cos, speed = r.logger.at(step, "align/cos/net."), r.logger.at(step, "align/speed/net.")
    return {k[len("align/cos/net."):]: (v, speed["align/speed/net." + k[len("align/cos/net."):]]) for k, v in cos.items()}


# ------------------------------------------------------------------------------------------------------
def test_hardsigmoid_runs_as_its_exact_twice_differentiable_form_inside_the_block_only() -> None:
    x = torch.cat([torch.tensor([-3.0, 3.0, 0.0]), 4 * torch.randn(1000)]).requires_grad_()
    y_ref = F.hardsigmoid(x)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), x)
    inplace = x.detach().clone()
    with twice_differentiable():
        y = F.hardsigmoid(x)  # as user code calls it
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad((nn.Hardsigmoid()(x) ** 2).sum(), x, create_graph=True)
        (hv,) = torch.autograd.grad(gg.sum(), x)
        nn.Hardsigmoid(inplace=True)(inplace)
        direct = torch._C._nn.hardsigmoid(x.detach())
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref) and torch.equal(direct, y_ref.detach())
    assert torch.equal(inplace, y_ref.detach())
    # the second derivative of hardsigmoid² is 2 hardsigmoid'² = 1/18 inside (-3, 3), 0 outside
    assert torch.allclose(hv, torch.where(x.abs() < 3, 1 / 18, 0.0).detach())
    with pytest.raises(RuntimeError, match="hardsigmoid_backward"):  # outside the block: torch's own op again
        (g,) = torch.autograd.grad(F.hardsigmoid(x).pow(2).sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


class ChunkedHead(nn.Module):
    """Linear-tanh, then ``nn.LinearCrossEntropyLoss`` on its chunked path (its gradient computed in the forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(5, 5)
        self.loss = nn.LinearCrossEntropyLoss(5, 7, options=nn.LinearCrossEntropyOptions())

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return self.loss(torch.tanh(self.body(batch[0])), batch[1])


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch < 2.14 has no chunked linear cross-entropy")
def test_chunked_linear_cross_entropy_is_differentiated_twice_on_its_reference_path() -> None:
    torch.manual_seed(0)
    net, batch = ChunkedHead().double(), (torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 7, (8,)))
    with hessian_operator(net, lambda loss, _: loss, (batch, None), method="double_backward") as op:
        measured = torch.stack([op(e) for e in torch.eye(op.dim, dtype=torch.float64)], 1)
    names, shapes = zip(*[(n, p.shape) for n, p in net.named_parameters()])

    def reference(v: torch.Tensor) -> torch.Tensor:
        p = dict(zip(names, [c.view(s) for c, s in zip(v.split([s.numel() for s in shapes]), shapes)]))
        hidden = torch.tanh(F.linear(batch[0], p["body.weight"], p["body.bias"]))
        return F.cross_entropy(F.linear(hidden, p["loss.linear.weight"]), batch[1])

    dense = torch.autograd.functional.hessian(reference, torch.cat([p.detach().reshape(-1) for p in net.parameters()]))
    assert torch.allclose(measured, dense, atol=1e-10)


def test_once_differentiable_backward_is_found_in_the_graph() -> None:
    x = torch.randn(3, requires_grad=True)
    assert once_differentiable_functions([OnceTanh.apply(x).sum()]) == ["OnceTanh's @once_differentiable backward"]
    assert once_differentiable_functions([torch.tanh(x).sum()]) == []


def test_hardsigmoid_model_sharpness_equals_the_dense_hessian_of_its_clamp_form() -> None:
    r = run("hardsigmoid")
    top = dense_top_eigenvalue(initial(Excite(clamp=True), "hardsigmoid"), r.sharpness.probe_batch)
    assert r.logger.at(0)["sharpness/max_eig"] == pytest.approx(top, rel=1e-4)
    assert "sharpness/fd_consistency" not in r.logger.at(0)  # exact products: no fallback, no word
    assert not r.warnings_of("Sharpness") and not r.warnings_of("FeatureAlignment")


def test_hardsigmoid_model_feature_alignment_equals_float64_finite_differences() -> None:
    r = run("hardsigmoid")
    logged = logged_speeds(r)
    assert len(logged) == 4
    oracle = float64_feature_speeds(initial(Excite(), "hardsigmoid"), r.alignment.probe_batch, list(logged))
    for name, (cos, speed) in logged.items():
        assert cos == pytest.approx(oracle[name][0], abs=1e-5), name
        assert speed == pytest.approx(oracle[name][1], rel=1e-4), name


@pytest.mark.parametrize("case", ["embedding_bag", "once_differentiable"])
def test_no_double_backward_falls_back_to_checked_finite_differences(case: str) -> None:
    r = run(case)
    oracle_net = initial(MODELS[case][1](), case)
    top = dense_top_eigenvalue(oracle_net, r.sharpness.probe_batch)
    at0 = r.logger.at(0)
    assert at0["sharpness/max_eig"] == pytest.approx(top, rel=1e-4)
    assert [r.logger.by_step("sharpness/fd_consistency")[s] < 1e-3 for s in range(STEPS + 1)] == [True] * (STEPS + 1)
    logged = logged_speeds(r)
    oracle = float64_feature_speeds(oracle_net, r.alignment.probe_batch, list(logged))
    for name, (cos, speed) in logged.items():
        assert cos == pytest.approx(oracle[name][0], abs=1e-4), name
        assert speed == pytest.approx(oracle[name][1], rel=1e-3), name
    op = "_embedding_bag_backward" if case == "embedding_bag" else "OnceTanh's @once_differentiable backward"
    for owner in ("Sharpness", "FeatureAlignment"):  # said once, naming the callback, the op and the remedy
        said = r.warnings_of(owner)
        assert len(said) == 1 and op in said[0] and "twice-differentiable form" in said[0], (owner, said)


def test_a_forward_that_jumps_at_the_probe_point_is_nan_with_one_warning() -> None:
    r = run("floor_quantizer")
    assert math.isnan(r.logger.at(0)["sharpness/max_eig"]) and r.logger.at(0)["sharpness/fd_consistency"] > 1e-3
    assert math.isnan(r.logger.at(0)["align/cos/net.head"]) and math.isfinite(r.logger.at(0)["align/cos/net.fc"])
    for owner in ("Sharpness", "FeatureAlignment"):
        said = r.warnings_of(owner)
        assert len(said) == 2 and "FloorSTE" in said[0] and "NaN" in said[1], (owner, said)  # the switch, the NaN


def test_double_backward_on_request_refuses_naming_the_op() -> None:
    net, (ids, y) = Bag("tanh"), bags().tensors
    with pytest.raises(ValueError, match=r"Sharpness: method='double_backward' .*_embedding_bag_backward.*method='auto'"):
        with hessian_operator(net, F.cross_entropy, (ids, y), method="double_backward", owner="Sharpness") as op:
            op(torch.ones(op.dim))
    before = [p.detach().clone() for p in net.parameters()]
    with hessian_operator(net, F.cross_entropy, (ids, y), method="finite_difference") as op:
        op(torch.ones(op.dim))
        assert op.consistency(torch.ones(op.dim)) < 1e-3 and op.num_matvecs == 3
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("case", ["hardsigmoid", "embedding_bag"])
def test_feature_speed_control_runs_through_ops_without_a_double_backward(case: str) -> None:
    build, _, data = MODELS[case]
    logger = MemoryLogger()
    fit([FeatureSpeedControl(0.05, every_n_steps=1, probe_size=16)], lambda: Classifier(build()),
        DataLoader(data(), batch_size=8, shuffle=True), max_steps=STEPS, logger=logger)
    speeds = [v for step in range(1, STEPS + 1) for k, v in logger.at(step, "align/control_speed/").items()]
    assert len(speeds) >= STEPS and all(math.isfinite(v) and v > 0 for v in speeds)
