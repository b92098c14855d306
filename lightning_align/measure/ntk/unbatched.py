"""Per-sample Jacobian factors one sample at a time, for forwards that ``vmap`` cannot run.

``vmap`` over samples needs a forward that never branches on tensor values; Hugging Face models do when they
build attention masks (``padding_mask.all()``), mixtures of experts when they route tokens, and recurrent layers
(``nn.LSTM``/``nn.GRU``) have no batching rule for their fused kernels. Here every sample
runs as a batch of one through plain autograd: the structured layers' outputs get a fresh zero leaf each call
(so a layer may run a different number of times, on a different number of tokens, per sample), and one batched
backward over the ``c`` outputs gives the generic Jacobians and the output gradients. Tokens are padded with zeros
across samples, which adds nothing to ``Σ_t g_t x_tᵀ``: the factors, and so the kernel, are those of the
``vmap`` path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lightning_align.measure.autodiff import call_with_fresh_buffers, math_attention
from lightning_align.measure.ntk.contraction import _Factors
from lightning_align.measure.ntk.inspection import _num_samples, _unfold
from lightning_align.measure.state import map_tensors

if TYPE_CHECKING:
    from lightning_align.measure.ntk.plan import _Layer, _Plan

def factors_one_by_one(plan: _Plan, inputs: Any) -> _Factors:
    """The factors of :meth:`_Plan.factors` on ``inputs``, computed sample by sample without ``vmap``."""
    n = _num_samples(inputs, "ntk")
    gens: dict[str, list[Tensor]] = {name: [] for name in plan.generic}
    xs: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    gs: dict[str, list[Tensor]] = {name: [] for name in plan.layers}
    for i in range(n):
        one = map_tensors(inputs, lambda t, i=i: t[i : i + 1])
        j_gen, x_one, g_one = _one_sample(plan, one)
        for name in plan.generic:
            gens[name].append(j_gen[name])
        for name in plan.layers:
            xs[name].append(x_one[name])
            gs[name].append(g_one[name])
    out = _Factors({name: torch.cat(js) for name, js in gens.items()}, {}, {})
    for name in plan.layers:
        tokens = max(x.shape[1] for x in xs[name])
        out.inputs[name] = torch.cat([_pad(x, 1, tokens) for x in xs[name]])
        out.grads[name] = torch.cat([_pad(g, 2, tokens) for g in gs[name]])
    return out


def _one_sample(plan: _Plan, one: Any) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """One sample's generic Jacobians ``(1, c, P)``, layer inputs ``(1, T, d_in)`` and output gradients ``(1, c, T, d_out)``."""
    c = plan.c
    leaves = {name: p.detach().requires_grad_() for name, p in plan.generic.items()}
    seen: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in plan.layers}
    with torch.enable_grad(), math_attention(), _fresh_probes(plan.layers, seen):
        out = call_with_fresh_buffers(plan.model, leaves, (one,)).reshape(-1)
    probes = [eps for name in plan.layers for _, eps in seen[name]]
    targets = [*leaves.values(), *probes]
    if out.requires_grad and targets:
        eye = torch.eye(c, dtype=out.dtype, device=out.device)
        grads = torch.autograd.grad(out, targets, eye, is_grads_batched=True, allow_unused=True)
    else:
        grads = (None,) * len(targets)
    grads = [torch.zeros(c, *t.shape, dtype=t.dtype, device=t.device) if g is None else g for t, g in zip(targets, grads)]
    j_gen = {name: g.reshape(1, c, -1) for name, g in zip(leaves, grads[: len(leaves)])}
    rest = iter(grads[len(leaves):])
    xs, gs = {}, {}
    for name, layer in plan.layers.items():
        parts = [_layer_factors(layer, x_in, next(rest), c) for x_in, _ in seen[name]]
        d_in, d_out = _dims(layer)
        xs[name] = torch.cat([p[0] for p in parts], dim=1) if parts else torch.zeros(1, 0, d_in, dtype=plan.dtype, device=plan.device)
        gs[name] = torch.cat([p[1] for p in parts], dim=2) if parts else torch.zeros(1, c, 0, d_out, dtype=plan.dtype, device=plan.device)
    return j_gen, xs, gs


def _layer_factors(layer: _Layer, x_in: Tensor, g_out: Tensor, c: int) -> tuple[Tensor, Tensor]:
    """One call's input ``(1, T, d_in)`` and output gradient ``(1, c, T, d_out)`` (conv: patches as tokens)."""
    x_in = x_in.detach()
    if layer.kind == "conv2d":
        return _unfold(layer.module, x_in).transpose(1, 2), g_out.reshape(1, c, g_out.shape[2], -1).transpose(2, 3)
    return x_in.reshape(1, -1, x_in.shape[-1]), g_out.reshape(1, c, -1, g_out.shape[-1])


def _dims(layer: _Layer) -> tuple[int, int]:
    m = layer.module
    if layer.kind == "conv2d":
        return m.in_channels * m.kernel_size[0] * m.kernel_size[1], m.out_channels
    return m.in_features, m.out_features


def _pad(t: Tensor, dim: int, size: int) -> Tensor:
    """``t`` with zeros appended along ``dim`` up to ``size``."""
    missing = size - t.shape[dim]
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


@contextlib.contextmanager
def _fresh_probes(layers: dict[str, Any], seen: dict[str, list[tuple[Tensor, Tensor]]]) -> Iterator[None]:
    """Each call of a structured layer records ``(input, probe)`` and adds its probe, a fresh zero leaf, to its output."""
    handles = []
    for name, layer in layers.items():

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor, name: str = name) -> Tensor:
            eps = torch.zeros_like(out, requires_grad=True)
            seen[name].append((args[0], eps))
            return out + eps

        # prepend: see the layer's own output, before other hooks (e.g. μP output multipliers) rescale it
        handles.append(layer.module.register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
