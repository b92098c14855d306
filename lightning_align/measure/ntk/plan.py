"""The plan of one NTK measurement: which parameters go through which path, memory estimates, and the
per-sample Jacobian factors from one ``vmap(jacrev)`` pass (generic Jacobians, layer inputs and output gradients).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from lightning_align.measure.autodiff import call_with_fresh_buffers, math_attention
from lightning_align.measure.ntk import contraction
from lightning_align.measure.ntk.contraction import _Factors
from lightning_align.measure.ntk.inspection import (
    _describe,
    _dry_run,
    _num_samples,
    _probe_hooks,
    _select_parameters,
    _slice,
    _structured_candidates,
    _unfold,
    check_sample_independent,
)
from lightning_align.measure.ntk.operator import _KernelOperator
from lightning_align.measure.ntk.unbatched import factors_one_by_one
from lightning_align.measure.state import map_tensors

#: Kept-graph memory of the matrix-free path in units of the tensors one forward saves for backward
#: (the forward graph plus the graph of the symbolic VJP): measured 3.5x on the example GPT and 3.2x on
#: a HF GPT-2 (peak resident memory, ``benchmarks/ntk_memory.py``); 4 leaves a margin.
_GRAPH_FACTOR = 4.0


@dataclass
class _Layer:
    """A structured layer: its module, selected weight/bias names and their learning-rate factors."""

    module: nn.Module
    kind: str  # "linear" | "conv2d"
    weight: str | None
    bias: str | None
    lr_weight: float
    lr_bias: float
    calls: list[tuple[int, ...]]  # per-call output shapes (batch of one)


class _Plan:
    """Which parameters go through which path, for one model and input structure."""

    def __init__(self) -> None:
        self.model: nn.Module
        self.n = 0
        self.c = 0
        self.generic: dict[str, Tensor] = {}
        self.lr: dict[str, float] = {}
        self.layers: dict[str, _Layer] = {}
        self.selected: dict[str, Tensor] = {}
        self.dtype = torch.float32
        self.device = torch.device("cpu")
        self.graph_bytes = 0  # what one sample's forward saves for backward
        self.batched = True  # False once vmap has refused the forward (it branches on values): one sample at a time

    @classmethod
    def build(
        cls,
        model: nn.Module,
        inputs: Any,
        params: Sequence[str] | None,
        learning_rates: Mapping[str, float] | None,
        structured: bool,
        owner: str,
    ) -> _Plan:
        if not isinstance(model, nn.Module):
            raise TypeError(f"{owner}: model must be an nn.Module, got {type(model).__name__}")
        check_sample_independent(model, owner)
        plan = cls()
        plan.model = model
        plan.n = _num_samples(inputs, owner)
        plan.selected = _select_parameters(model, params, owner)
        lr = dict(learning_rates or {})
        unknown = sorted(set(lr) - set(plan.selected))
        if unknown:
            raise ValueError(f"{owner}: learning_rates names {unknown} that are not among the differentiated parameters")
        plan.lr = {name: float(lr.get(name, 1.0)) for name in plan.selected}
        first = next(iter(plan.selected.values()))
        plan.dtype, plan.device = first.dtype, first.device
        candidates = _structured_candidates(model, plan.selected) if structured else {}
        calls, out_shape, plan.graph_bytes = _dry_run(model, _slice(inputs, 0, 1), candidates, owner, _describe(inputs))
        plan.c = math.prod(out_shape[1:])
        for name, (module, kind, w, b) in candidates.items():
            if calls.get(name):
                plan.layers[name] = _Layer(module, kind, w, b, plan.lr.get(w, 1.0) if w else 0.0, plan.lr.get(b, 1.0) if b else 0.0, calls[name])
        covered = {p for layer in plan.layers.values() for p in (layer.weight, layer.bias) if p}
        plan.generic = {n: p for n, p in plan.selected.items() if n not in covered}
        return plan

    # -- memory estimates ---------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _layer_dims(self) -> list[tuple[_Layer, int, int, int]]:
        """``(layer, tokens, d_in, d_out)`` per structured call (tokens: positions or conv patches)."""
        dims = []
        for layer in self.layers.values():
            m = layer.module
            for shape in layer.calls:
                if layer.kind == "conv2d":
                    d_in = m.in_channels * math.prod(m.kernel_size)
                    dims.append((layer, math.prod(shape[2:]), d_in, shape[1]))
                else:
                    dims.append((layer, math.prod(shape[1:-1]), m.in_features, shape[-1]))
        return dims

    @property
    def factor_bytes(self) -> int:
        """Jacobian factors of one sample (generic Jacobians, layer inputs and output gradients)."""
        elems = self.c * sum(p.numel() for p in self.generic.values())
        elems += sum(t * (d_in + self.c * d_out) for _, t, d_in, d_out in self._layer_dims())
        return elems * self.itemsize

    def auto_chunk(self, budget: float, with_factors: bool = False) -> int:
        """Samples per ``vmap(jacrev)`` chunk whose temporaries (``c + 1`` graphs per sample) fit ``budget``."""
        per_sample = (self.c + 1) * self.graph_bytes + (self.factor_bytes if with_factors else 0)
        if not math.isfinite(budget) or per_sample == 0:
            return self.n
        return int(min(self.n, max(1, budget // per_sample)))

    def exact_bytes(self, chunk: int, size: int) -> int:
        """The exact path: every sample's factors, one chunk's temporaries, the contraction's and the kernel (twice: ``eigh``)."""
        n, c, item = self.n, self.c, self.itemsize
        contraction_bytes = contraction._BLOCK_ELEMENTS * item
        for _, t, d_in, d_out in self._layer_dims():
            if t > 1 and contraction._prefer_per_sample(n, n, c, t, d_in, d_out, size == n):
                contraction_bytes = max(contraction_bytes, 2 * n * c * d_in * d_out * item)
        return n * self.factor_bytes + min(chunk, n) * (c + 1) * self.graph_bytes + contraction_bytes + 2 * size * size * item

    def lanczos_bytes(self, size: int, steps: int) -> int:
        """The matrix-free path: the kept graphs, the basis and a few parameter-sized vectors."""
        params = sum(p.numel() for p in self.selected.values())
        return int(_GRAPH_FACTOR * self.n * self.graph_bytes) + (steps * size + 4 * params) * self.itemsize

    # -- Jacobian factors ---------------------------------------------------------------------------
    def factors(self, inputs: Any, chunk_size: int | None) -> _Factors:
        """Per-sample generic Jacobians, structured-layer inputs and output gradients: one vmap pass, or one sample
        at a time when vmap cannot run the forward (e.g. a Hugging Face attention mask; :mod:`.unbatched`)."""
        if self.batched:
            try:
                return self._factors_vmapped(inputs, chunk_size)
            except RuntimeError as vmap_error:  # vmap's own refusals have no fixed wording: any error retries unbatched
                self.batched = False
                try:
                    return factors_one_by_one(self, inputs)
                except Exception as plain_error:  # the forward fails on its own: that is the error to show
                    raise plain_error from vmap_error
        return factors_one_by_one(self, inputs)

    def _factors_vmapped(self, inputs: Any, chunk_size: int | None) -> _Factors:
        model, layers = self.model, self.layers
        generic = {n: p.detach() for n, p in self.generic.items()}
        eps = {name: [torch.zeros(s, dtype=self.dtype, device=self.device) for s in layer.calls] for name, layer in layers.items()}

        def f_single(gen: dict[str, Tensor], probes: dict[str, list[Tensor]], x: Any) -> tuple[Tensor, dict[str, list[Tensor]]]:
            seen: dict[str, list[Tensor]] = {name: [] for name in layers}
            with _probe_hooks(layers, probes, seen):
                out = call_with_fresh_buffers(model, gen, (map_tensors(x, lambda t: t.unsqueeze(0)),))
            return out.reshape(-1), seen

        jac = jacrev(f_single, argnums=(0, 1), has_aux=True)
        with math_attention():
            (j_gen, j_eps), seen = vmap(jac, in_dims=(None, None, 0), chunk_size=chunk_size)(generic, eps, inputs)
        b, c = _num_samples(inputs, "ntk"), self.c
        out = _Factors({n: j.reshape(b, c, -1) for n, j in j_gen.items()}, {}, {})
        for name, layer in layers.items():
            xs, gs = [], []
            for x_in, g_out in zip(seen[name], j_eps[name]):
                if layer.kind == "conv2d":
                    xs.append(_unfold(layer.module, x_in.squeeze(1)).transpose(1, 2))  # (b, L, C·k·k)
                    gs.append(g_out.reshape(b, c, g_out.shape[3], -1).transpose(2, 3))  # (b, c, L, C_out)
                else:
                    xs.append(x_in.reshape(b, -1, x_in.shape[-1]))
                    gs.append(g_out.reshape(b, c, -1, g_out.shape[-1]))
            out.inputs[name] = torch.cat(xs, dim=1)
            out.grads[name] = torch.cat(gs, dim=2)
        return out

    # -- contraction --------------------------------------------------------------------------------
    def contract(self, fa: _Factors, fb: _Factors, traced: bool) -> Tensor:
        """Kernel block between two sets of samples: ``(na·c, nb·c)``, or ``(na, nb)`` traced."""
        return contraction.contract(self, fa, fb, traced)

    # -- matrix-free --------------------------------------------------------------------------------
    def operator(self, inputs: Any, traced: bool) -> _KernelOperator:
        """``v -> K v`` by ``J (Λ Jᵀ v)`` on the whole batch, the forward linearised once."""
        return _KernelOperator(self, inputs, traced)

