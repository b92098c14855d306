"""Oracle tests of the empirical NTK against explicit per-sample Jacobians (torch.func.jacrev), in float64."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

import lightning_align.measure.ntk as ntk_mod
from lightning_align.measure.ntk import contraction
from lightning_align.measure.ntk import (
    empirical_ntk,
    flatten_kernel,
    kernel_distance,
    kernel_target_alignment,
    ntk_eigs,
    ntk_matvec,
    ntk_spectrum,
    ntk_summary,
    ntk_trace,
)

D = torch.float64


def oracle_ntk(model: nn.Module, x: torch.Tensor, traced: bool = False, lrs: dict[str, float] | None = None) -> torch.Tensor:
    """Explicit Jacobian (n, c, P) of every trainable parameter, then J Λ Jᵀ."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def f(p: dict[str, torch.Tensor], xi: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (xi.unsqueeze(0),)).reshape(-1)

    jac = vmap(jacrev(f), (None, 0))(params, x)
    lrs = lrs or {}
    scaled = [j.flatten(2) * math.sqrt(lrs.get(name, 1.0)) for name, j in jac.items()]
    js = torch.cat(scaled, dim=2)
    return torch.einsum("iap,jap->ij", js, js) if traced else torch.einsum("iap,jbp->ijab", js, js)


class TinyAttention(nn.Module):
    """Tokens -> qkv Linear -> SDPA -> proj -> LayerNorm -> mean over tokens -> head."""

    def __init__(self, d: int = 6, heads: int = 2, out: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
        return self.head(self.norm(x + self.proj(a)).mean(1))


class MHAModel(nn.Module):
    """nn.MultiheadAttention (its out_proj is used without its forward: must go the generic path)."""

    def __init__(self, d: int = 4, out: int = 2) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.head = nn.Linear(d, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0][:, 0])


class Tied(nn.Module):
    """A weight shared by two Linear layers (must not be treated layer by layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.out = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Reused(nn.Module):
    """One Linear called twice per forward (its calls count as extra tokens)."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.f(torch.tanh(self.f(x))))


def hooked_mlp() -> nn.Module:
    """Multipliers applied by hooks, as a parametrization does (input pre-hook, output hook)."""
    net = mlp()
    net[0].register_forward_hook(lambda m, a, out: 3.0 * out)
    net[4].register_forward_pre_hook(lambda m, a: (0.5 * a[0],))
    net[4].register_forward_hook(lambda m, a, out: out / 4.0)
    return net


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 7, bias=False), nn.GELU(), nn.Linear(7, 3))


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 2, stride=2, dilation=1),
        nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3, padding="same", groups=2), nn.Flatten(), nn.Linear(4 * 3 * 3, 3),
    )


def layernorm_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Linear(6, 6), nn.GroupNorm(3, 6), nn.Linear(6, 2))


def bn_eval_mlp() -> nn.Module:
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    return net.eval()


CASES = {
    "mlp": (mlp, (6, 5)),
    "hook_multipliers": (hooked_mlp, (6, 5)),
    "conv": (conv, (4, 2, 6, 6)),
    "layernorm_groupnorm": (layernorm_mlp, (6, 5)),
    "batchnorm_eval": (bn_eval_mlp, (6, 5)),
    "attention": (TinyAttention, (4, 5, 6)),
    "multihead_attention": (MHAModel, (4, 3, 4)),
    "tied_weights": (Tied, (5, 4)),
    "reused_layer": (Reused, (5, 4)),
}


@pytest.mark.parametrize("traced", [False, True], ids=["full", "traced"])
@pytest.mark.parametrize("case", list(CASES))
def test_empirical_ntk_matches_explicit_jacobians(case: str, traced: bool) -> None:
    torch.manual_seed(0)
    factory, shape = CASES[case]
    model = factory().to(D)
    x = torch.randn(*shape, dtype=D)
    got = empirical_ntk(model, x, trace_outputs=traced)
    want = oracle_ntk(model, x, traced)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("per_sample", [False, True], ids=["token_gram", "per_sample_grads"])
@pytest.mark.parametrize("traced", [False, True], ids=["full", "traced"])
def test_both_token_strategies_match(monkeypatch: pytest.MonkeyPatch, per_sample: bool, traced: bool) -> None:
    monkeypatch.setattr(contraction, "_prefer_per_sample", lambda *args: per_sample)
    monkeypatch.setattr(contraction, "_BLOCK_ELEMENTS", 64)  # force several row blocks
    torch.manual_seed(1)
    model = TinyAttention().to(D)
    x = torch.randn(5, 4, 6, dtype=D)
    torch.testing.assert_close(empirical_ntk(model, x, traced), oracle_ntk(model, x, traced), rtol=1e-5, atol=1e-8)


def test_structured_path_is_used_for_linear_layers() -> None:
    model = mlp().to(D)
    plan = ntk_mod._Plan.build(model, torch.randn(3, 5, dtype=D), None, None, True, owner="test")
    assert set(plan.layers) == {"0", "2", "4"} and plan.generic == {}
    tied = ntk_mod._Plan.build(Tied().to(D), torch.randn(3, 4, dtype=D), None, None, True, owner="test")
    assert "a.weight" in tied.generic and "b" not in tied.layers
    mha = ntk_mod._Plan.build(MHAModel().to(D), torch.randn(3, 3, 4, dtype=D), None, None, True, owner="test")
    assert "attn.out_proj.weight" in mha.generic  # its forward is never called


def test_generic_only_path_and_chunking_agree() -> None:
    torch.manual_seed(2)
    model = conv().to(D)
    x = torch.randn(5, 2, 6, 6, dtype=D)
    ref = oracle_ntk(model, x)
    torch.testing.assert_close(empirical_ntk(model, x, structured=False), ref)
    torch.testing.assert_close(empirical_ntk(model, x, chunk_size=2), ref)


def test_parameter_selection_and_learning_rates() -> None:
    torch.manual_seed(3)
    model = layernorm_mlp().to(D)
    x = torch.randn(4, 5, dtype=D)
    model[3].weight.requires_grad_(False)  # frozen: not part of the kernel
    lrs = {"0.weight": 0.2, "1.bias": 3.0, "5.bias": 0.5}
    torch.testing.assert_close(empirical_ntk(model, x, learning_rates=lrs), oracle_ntk(model, x, lrs=lrs))
    only = empirical_ntk(model, x, params=[r"5\..*"])
    head = nn.Sequential(*list(model)[:5])
    feats = head(x).detach()
    want = (feats @ feats.T + 1)[:, :, None, None] * torch.eye(2, dtype=D)  # readout-only NTK
    torch.testing.assert_close(only, want)


def test_nested_inputs() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, scale = batch
            return self.lin(x) * scale[:, None]

    torch.manual_seed(4)
    model = Pair().to(D)
    x, s = torch.randn(4, 3, dtype=D), torch.rand(4, dtype=D)
    k = empirical_ntk(model, (x, s))
    want = ((x @ x.T + 1) * torch.outer(s, s))[:, :, None, None] * torch.eye(2, dtype=D)
    torch.testing.assert_close(k, want)


# -- eigenvalues ------------------------------------------------------------------------------------
@pytest.mark.parametrize("traced", [False, True], ids=["full", "traced"])
@pytest.mark.parametrize("solver", ["exact", "lanczos"])
def test_ntk_eigs_match_eigvalsh(solver: str, traced: bool) -> None:
    torch.manual_seed(5)
    model = TinyAttention().to(D)
    x = torch.randn(6, 4, 6, dtype=D)
    want = torch.linalg.eigvalsh(flatten_kernel(oracle_ntk(model, x, traced))).flip(0)[:3]
    got = ntk_eigs(model, x, 3, trace_outputs=traced, solver=solver, tol=1e-8, max_matvecs=60,
                   generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.float64 and got.shape == (3,)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-8 * float(want[0]))


def test_lanczos_fp32_and_warm_start() -> None:
    torch.manual_seed(6)
    model = mlp()
    x = torch.randn(40, 5)
    want = torch.linalg.eigvalsh(flatten_kernel(oracle_ntk(model.to(D), x.to(D)))).flip(0)[:4]
    model = model.float()
    cold = ntk_spectrum(model, x, 4, solver="lanczos", tol=1e-5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cold.values, want, rtol=1e-4, atol=0)
    warm = ntk_spectrum(model, x, 4, solver="lanczos", tol=1e-5, init=cold.vectors, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(warm.values, want, rtol=1e-4, atol=0)
    assert warm.num_matvecs <= cold.num_matvecs
    assert cold.kernel is None and cold.solver == "lanczos"


def test_exact_eigenvectors() -> None:
    torch.manual_seed(11)
    model = conv().to(D)
    res = ntk_spectrum(model, torch.randn(4, 2, 6, 6, dtype=D), 3)
    assert res.kernel is not None and res.eigenvalues is not None and res.eigenvalues.shape == (12,)
    torch.testing.assert_close(res.kernel @ res.vectors, res.vectors * res.values)
    assert ntk_spectrum(model, torch.randn(4, 2, 6, 6, dtype=D), 3, return_vectors=False).vectors.shape == (12, 0)


def test_auto_switches_to_matrix_free() -> None:
    model = mlp().to(D)
    x = torch.randn(10, 5, dtype=D)
    assert ntk_spectrum(model, x, 2).solver == "exact"
    assert ntk_spectrum(model, x, 2, max_exact_size=29).solver == "lanczos"


def test_matvec_and_trace_match_kernel() -> None:
    torch.manual_seed(7)
    model = conv().to(D)
    x = torch.randn(5, 2, 6, 6, dtype=D)
    for traced in (False, True):
        k = flatten_kernel(oracle_ntk(model, x, traced))
        mv, size = ntk_matvec(model, x, traced)
        v = torch.randn(size, dtype=D)
        torch.testing.assert_close(mv(v), k @ v)
        assert ntk_trace(model, x, chunk_size=2) == pytest.approx(float(k.trace()), rel=1e-10)


def test_matrix_free_linearises_the_forward_once() -> None:
    torch.manual_seed(13)
    model = TinyAttention().to(D)
    x = torch.randn(6, 4, 6, dtype=D)
    k = flatten_kernel(oracle_ntk(model, x))
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        mv, size = ntk_matvec(model, x)
        after_build = len(calls)
        for i in range(5):
            v = torch.randn(size, dtype=D, generator=torch.Generator().manual_seed(i))
            torch.testing.assert_close(mv(v), k @ v)
        assert len(calls) == after_build, "no product re-runs the forward"
        res = ntk_spectrum(model, x, 3, solver="lanczos", tol=1e-10, max_matvecs=size, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert res.num_matvecs > 5
    assert len(calls) == after_build + 2, "one dry run (one sample) and one linearised forward per measurement"
    torch.testing.assert_close(res.values, torch.linalg.eigvalsh(k).flip(0)[:3], rtol=1e-8, atol=1e-10)


def test_matrix_free_falls_back_to_jvp_without_double_backward() -> None:
    class Once(torch.autograd.Function):
        @staticmethod
        def forward(x: torch.Tensor) -> torch.Tensor:
            return torch.tanh(x)

        @staticmethod
        def setup_context(ctx: Any, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
            ctx.save_for_backward(output)
            ctx.save_for_forward(output)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
            (y,) = ctx.saved_tensors
            return g * (1 - y**2)

        @staticmethod
        def jvp(ctx: Any, t: torch.Tensor) -> torch.Tensor:
            (y,) = ctx.saved_tensors
            return t * (1 - y**2)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(5, 7), nn.Linear(7, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(Once.apply(self.a(x)))

    torch.manual_seed(14)
    net, x = Net().to(D), torch.randn(6, 5, dtype=D)
    reference = nn.Sequential(net.a, nn.Tanh(), net.b)
    mv, size = ntk_matvec(net, x)
    v = torch.randn(size, dtype=D)
    with pytest.warns(UserWarning, match="no usable double backward"):
        out = mv(v)
    torch.testing.assert_close(out, flatten_kernel(oracle_ntk(reference, x)) @ v)


def test_hutchpp_trace_on_the_matrix_free_path() -> None:
    torch.manual_seed(15)
    model = conv().to(D)
    x = torch.randn(12, 2, 6, 6, dtype=D)
    exact = float(flatten_kernel(oracle_ntk(model, x)).trace())
    assert ntk_spectrum(model, x, 2, solver="exact").trace == pytest.approx(exact, rel=1e-12)
    assert ntk_spectrum(model, x, 2, solver="lanczos").trace is None  # not asked for: no extra product
    estimates, stderrs = [], []
    for seed in range(20):
        res = ntk_spectrum(model, x, 2, solver="lanczos", tol=1e-6, trace_samples=16, generator=torch.Generator().manual_seed(seed))
        assert 0 < res.trace_stderr < 0.05 * exact
        assert abs(res.trace - exact) <= 6 * res.trace_stderr  # Rademacher quadratic forms: heavier tails than normal
        estimates.append(res.trace)
        stderrs.append(res.trace_stderr)
    spread = torch.tensor(estimates, dtype=D).std().item()
    assert abs(sum(estimates) / 20 - exact) <= 3 * spread / 20**0.5  # unbiased
    assert 0.5 < sorted(stderrs)[10] / spread < 2  # the reported error bar is the estimates' spread
    # a basis spanning the whole kernel makes the Krylov part exact (no Hutchinson term)
    full = ntk_spectrum(model, x, 2, solver="lanczos", tol=0.0, max_matvecs=36, trace_samples=4)
    assert full.trace == pytest.approx(exact, rel=1e-10) and full.trace_stderr == 0.0
    traced = ntk_spectrum(model, x, 2, trace_outputs=True, solver="lanczos", tol=0.0, max_matvecs=12, trace_samples=2)
    assert traced.trace == pytest.approx(exact, rel=1e-10)


def test_memory_guard_names_the_argument() -> None:
    torch.manual_seed(16)
    model = TinyAttention().to(D)
    x = torch.randn(8, 4, 6, dtype=D)
    plan = ntk_mod._Plan.build(model, x, None, None, True, owner="test")
    assert plan.graph_bytes > 0 and plan.factor_bytes > 0
    size = plan.n * plan.c
    exact_gb = plan.exact_bytes(plan.n, size) / 2**30
    lanczos_gb = plan.lanczos_bytes(size, size) / 2**30
    assert lanczos_gb < exact_gb
    between = (exact_gb + lanczos_gb) / 2
    # auto: the exact path only when it fits, else matrix-free
    assert ntk_spectrum(model, x, 2).solver == "exact"
    assert ntk_spectrum(model, x, 2, max_memory_gb=between, chunk_size=plan.n).solver == "lanczos"
    with pytest.raises(ValueError, match=r"exact kernel path needs about .* GiB .*above max_memory_gb=.*solver='lanczos'"):
        ntk_spectrum(model, x, 2, solver="exact", max_memory_gb=between, chunk_size=plan.n)
    with pytest.raises(ValueError, match=r"matrix-free path needs about .* GiB .*above max_memory_gb=.*fewer samples"):
        ntk_spectrum(model, x, 2, solver="lanczos", max_memory_gb=lanczos_gb / 2)
    assert ntk_spectrum(model, x, 2, solver="exact", max_memory_gb=None).solver == "exact"


def test_exact_trace_chunks_by_memory() -> None:
    torch.manual_seed(17)
    model = conv().to(D)
    x = torch.randn(7, 2, 6, 6, dtype=D)
    exact = float(flatten_kernel(oracle_ntk(model, x)).trace())
    plan = ntk_mod._Plan.build(model, x, None, None, True, owner="test")
    assert plan.auto_chunk(1.0, with_factors=True) == 1 and plan.auto_chunk(float("inf")) == 7
    assert ntk_trace(model, x, max_memory_gb=1e-9) == pytest.approx(exact, rel=1e-10)  # one sample at a time


# -- summaries ------------------------------------------------------------------------------------
def test_summary_alignment_distance_by_hand() -> None:
    torch.manual_seed(8)
    a = torch.randn(6, 4, dtype=D)
    k = a @ a.T  # rank 4 of 6: singular
    s = ntk_summary(k)
    lam = torch.linalg.eigvalsh(k).flip(0)
    assert s.max_eig == pytest.approx(float(lam[0])) and s.trace == pytest.approx(float(k.trace()))
    assert s.cond == pytest.approx(1 / (6 * torch.finfo(D).eps))  # numerically singular: at the cap
    p = lam[:4] / lam[:4].sum()
    assert s.effective_rank == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-6)
    full = k + torch.eye(6, dtype=D)
    assert ntk_summary(full).cond == pytest.approx(float(lam[0] + 1) / float(lam[-1] + 1))
    y = torch.randn(6, dtype=D)
    assert kernel_target_alignment(full, y) == pytest.approx(float(y @ full @ y / (full.norm() * y.dot(y))))
    y2 = torch.randn(6, 3, dtype=D)
    gram = y2 @ y2.T
    assert kernel_target_alignment(full, y2) == pytest.approx(float((full * gram).sum() / (full.norm() * gram.norm())))
    k4 = torch.randn(3, 3, 2, 2, dtype=D)
    y4 = torch.randn(3, 2, dtype=D)
    flat, yf = flatten_kernel(k4), y4.reshape(-1)
    assert kernel_target_alignment(k4, y4) == pytest.approx(float(yf @ flat @ yf / (flat.norm() * yf.dot(yf))))
    assert kernel_distance(full, 2 * full) == pytest.approx(0.0, abs=1e-12)
    other = torch.eye(6, dtype=D)
    assert kernel_distance(full, other) == pytest.approx(1 - float(full.trace() / (full.norm() * other.norm())))
    assert flatten_kernel(k4)[1 * 2 + 0, 2 * 2 + 1] == k4[1, 2, 0, 1]


# -- side effects and errors --------------------------------------------------------------------
def test_no_side_effects() -> None:
    torch.manual_seed(9)
    net = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.3), nn.Linear(6, 2))
    net.train()
    net(torch.randn(8, 5)).sum().backward()
    net.eval()
    net[0].train()  # a flag that must survive
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = [p.grad.clone() for p in net.parameters()]
    flags = [m.training for m in net.modules()]
    x = torch.randn(6, 5)
    rng = torch.get_rng_state()
    empirical_ntk(net, x)
    ntk_eigs(net, x, 2, solver="lanczos")
    ntk_trace(net, x)
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, net.parameters()))
    assert flags == [m.training for m in net.modules()]
    assert torch.equal(rng, torch.get_rng_state())


def test_clear_errors() -> None:
    net = mlp()
    with pytest.raises(ValueError, match=r"could not run on the inputs \(shape \(3, 4\).*mat1 and mat2"):
        empirical_ntk(net, torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"k=19 .* size 18 .*1 <= k <= 18"):
        ntk_eigs(net, torch.randn(6, 5), 19)
    with pytest.raises(ValueError, match=r"size 6"):
        ntk_eigs(net, torch.randn(6, 5), 7, trace_outputs=True)
    bn = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4))
    with pytest.raises(ValueError, match=r"BatchNorm layer '1' is in training mode.*eval"):
        empirical_ntk(bn, torch.randn(3, 5))
    drop = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))
    with pytest.raises(ValueError, match=r"dropout layer '1' is active"):
        ntk_eigs(drop, torch.randn(3, 5), 1)
    with pytest.raises(ValueError, match=r"'nope' matches no trainable parameter"):
        empirical_ntk(net, torch.randn(3, 5), params=["nope"])
    with pytest.raises(ValueError, match=r"learning_rates names \['x'\]"):
        empirical_ntk(net, torch.randn(3, 5), learning_rates={"x": 1.0})
    with pytest.raises(ValueError, match=r"same leading"):
        empirical_ntk(net, (torch.randn(3, 5), torch.randn(2)))
    with pytest.raises(TypeError, match=r"returned tuple"):
        empirical_ntk(nn.LSTM(5, 2, batch_first=True), torch.randn(3, 1, 5))
    with pytest.raises(ValueError, match=r"solver must be"):
        ntk_eigs(net, torch.randn(3, 5), 1, solver="power")  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["ViT", "ResNet", "GPT"])
def test_example_modules_match_oracle(name: str) -> None:
    import example_modules as examples
    torch.manual_seed(12)
    if name == "ViT":
        model, x = examples.ViT(width=8, depth=1, heads=2, mlp_ratio=1), torch.randn(3, 1, 8, 8)
    elif name == "ResNet":
        model, x = examples.ResNet(width=4, depth=1), torch.randn(3, 1, 8, 8)
    else:
        model, x = examples.GPT(width=8, depth=1, heads=2, mlp_ratio=1, block_size=4), torch.randint(0, 256, (2, 3))
    model = model.double().eval()
    x = x.double() if x.is_floating_point() else x
    for traced in (False, True):
        want = oracle_ntk(model, x, traced)
        torch.testing.assert_close(empirical_ntk(model, x, traced), want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
