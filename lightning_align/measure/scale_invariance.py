"""Which weights are scale-invariant: scale each one and compare the outputs, at the probe point and off it.

A weight ``w`` is *scale-invariant* when the network function does not change if ``w`` is multiplied by any
``c > 0`` (a weight feeding a normalization layer with no path around it; see :mod:`lightning_align.measure.elr`).
That must hold wherever training takes the other parameters, and at some points it cannot be seen: when a
zero-initialised layer after the weight (a classification head, a LoRA ``B`` matrix, μP's zero readout, a
zero gate) cuts every path from the weight to the outputs, scaling the weight changes nothing, and a zero
weight is the same after scaling. So a weight that passes at the probe point is scaled again at a perturbed
point of the trainable parameters (:func:`detect_scale_invariance`).

Re-exported by :mod:`lightning_align.measure.elr`, where the effective learning rates built on it live.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call

from lightning_align.measure.modules import NORMS_WITH_STATS, is_weight_layer
from lightning_align.measure.sharded import has_sharded_parameters, local, reshard
from lightning_align.measure.state import preserved_state

_NORMS = (*NORMS_WITH_STATS, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
#: ``eps`` of the norm layers during the invariance test (see :func:`detect_scale_invariance`).
_TEST_EPS = 1e-30
#: Seed of the perturbed point (the same point at every call, on every rank).
_PERTURBATION_SEED = 0

#: A tracked weight: a module (its ``weight``, with its ``bias``) or ``(module, parameter name)`` (that parameter, with
#: the bias of the same name, see :func:`bias_name`): a stack of expert matrices, ``in_proj_weight``.
WeightSpec = Union[nn.Module, tuple[nn.Module, str]]
#: name -> the ways to scale a module's weight: (attribute names, the tensors), tried in order.
Plans = dict[str, list[tuple[tuple[str, ...], list[torch.Tensor]]]]


@dataclass(frozen=True)
class ScaleInvariance:
    """The outcome of scaling one module's weight.

    Attributes:
        params: attribute names of the module's parameters that form the weight: ``("weight",)`` when
            the weight alone is scale-invariant (or when nothing is), ``("weight", "bias")`` when only
            weight and bias together are (a bias before LayerNorm; a bias before BatchNorm cancels); for a weight
            tracked as ``(module, name)``, ``(name,)`` or ``(name, <its bias>)``.
        scale_invariant: whether the network function is unchanged by the scaling.
        relative_change: the evidence: the largest relative output change over the two points tested for an
            invariant weight; for one that is not, the smallest change over the scalings tried; NaN when the
            test could not tell (nothing trainable moves the outputs; counted as not invariant).
        hidden: the outputs did not change at the probe point but did at the perturbed point: something after
            the weight outputs zero there (a zero-initialised head, adapter or readout), or the weight is zero.

    Example::

        res = detect_scale_invariance(model, x)  # {module name: ScaleInvariance}
        [name for name, r in res.items() if r.scale_invariant]
    """

    params: tuple[str, ...]
    scale_invariant: bool
    relative_change: float
    hidden: bool = False


def default_weight_modules(model: nn.Module) -> dict[str, WeightSpec]:
    """The weights tracked by default (candidates for ELRs): every trainable ``weight`` of a Linear/Conv/Embedding/
    ``Conv1D`` layer or of any module whose ``weight`` is a matrix (a router), under the module's name, and every
    other trainable parameter of two or more dimensions a module holds (a stack of expert matrices ``(E, out, in)``,
    ``nn.MultiheadAttention``'s ``in_proj_weight``, a position embedding), as ``(module, parameter name)`` under
    ``<module>.<parameter>``. Vectors (biases, norm gains) are not weights of their own: a bias is scaled with its
    weight when only both together are scale-invariant.

    Example:
        >>> list(default_weight_modules(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))))
        ['0', '2']
        >>> list(default_weight_modules(nn.Sequential(nn.MultiheadAttention(4, 2))))
        ['0.in_proj_weight', '0.out_proj']
    """
    chosen: dict[str, WeightSpec] = {}
    for name, module in model.named_modules():
        chosen.update(module_weights(name, module, named=False))
    return chosen


def module_weights(name: str, module: nn.Module, *, named: bool = True) -> dict[str, WeightSpec]:
    """The trainable weights ``module`` holds itself (see :func:`default_weight_modules`). ``named``: the module was
    named by the user, so any trainable ``weight`` counts (a norm's gain too); else only a weight layer's or a matrix."""
    own = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
    weight = own.get("weight")
    chosen: dict[str, WeightSpec] = {}
    if name and weight is not None and (named or is_weight_layer(module) or weight.ndim >= 2):
        chosen[name] = module
    tensors = [k for k, p in own.items() if k != "weight" and p.ndim >= 2]
    biases = {bias_name(k) for k in (["weight"] if chosen else []) + tensors}
    for k in tensors:
        if k not in biases:
            chosen[f"{name}.{k}" if name else k] = (module, k)
    return chosen


def weight_of(spec: WeightSpec) -> tuple[nn.Module, str]:
    """``(module, parameter name)`` of a tracked weight: a module stands for its ``weight``."""
    return spec if isinstance(spec, tuple) else (spec, "weight")


def bias_name(weight: str) -> str:
    """The name of the bias that goes with a weight: ``bias`` for ``weight``, ``in_proj_bias`` for ``in_proj_weight``,
    ``gate_up_proj_bias`` for ``gate_up_proj``."""
    if weight == "weight":
        return "bias"
    return weight[: -len("weight")] + "bias" if weight.endswith("_weight") else weight + "_bias"


def _flat_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().double().flatten()
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        parts = [_flat_output(o) for o in out if isinstance(o, (torch.Tensor, tuple, list, Mapping))]
        parts = [p for p in parts if p.numel()]
        if parts:
            return torch.cat(parts)
    raise TypeError(f"detect_scale_invariance: the model returned {type(out).__name__}, which holds no tensor")


def _rel(a: torch.Tensor, base: torch.Tensor, scale: float | None = None) -> float:
    """``‖a - base‖ / scale`` (``scale``: ``‖base‖`` by default); 0/0 is 0, a non-finite difference ``inf``."""
    scale = float(base.norm()) if scale is None else scale
    diff = float((a - base).norm())
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def detect_scale_invariance(
    model: nn.Module,
    inputs: Any,
    modules: Mapping[str, WeightSpec] | None = None,
    *,
    factor: float = 2.0,
    rtol: float = 1e-3,
) -> dict[str, ScaleInvariance]:
    """Find the weights whose scale does not change the network function, by a direct numerical test.

    For each weight (a module's ``weight``, or a parameter such as a stack of expert matrices, scaled whole), it is
    multiplied by ``factor`` and the outputs ``model(inputs)`` are compared with the unscaled ones; if they change,
    weight and bias are scaled together and compared again. A relative change below ``rtol`` means scale-invariant. This catches what a graph trace
    would (a norm after the layer, no path around it) and also what it would not (norms reached through
    reshapes or custom code), at the price of one or two forward passes per module.

    A zero output cannot fool it: a weight that passes is scaled again at a perturbed point ``θ1``, every
    trainable parameter moved by seeded Gaussian noise of at least its init scale (its RMS, or
    ``1/sqrt(fan_in)``, 1 for a vector, if larger), where its output change must stay below ``rtol·‖f(θ1) -
    f(θ0)‖`` (what the trainable parameters move: a large frozen path does not dilute it). A weight that passes
    at the probe point only is reported ``hidden``; if the perturbation does not move the outputs (or makes
    them non-finite) the test cannot tell (``relative_change`` NaN, not invariant). Cost: one more forward,
    one per weight passing at the probe point, a copy of the trainable parameters while testing.

    Norm layers use **batch statistics** (train mode) and dropout is off during the test: batch
    statistics absorb the scale, which is the function SGD optimizes and for which ``g ⊥ w``; with
    running statistics (eval mode) no weight would be scale-invariant. Flags, buffers, ``.grad`` and RNG
    streams are restored afterwards; parameters are never written (``torch.func.functional_call``), except
    those of a model sharded by FSDP2 (``DTensor`` parameters live in FSDP's hooks, which ``functional_call``
    cannot override): there each rank scales (and perturbs) its slices in place for a forward and copies
    them back (bit-exact), every forward pass being a collective that every rank runs in the same order.
    During the test the norm layers' ``eps`` is set to ``1e-30`` (and put back): ``eps`` breaks invariance
    only by about ``eps/var``, which would hide small weights (variance near ``eps``) that training
    treats as scale-invariant. With ``factor=2``, exact in floating point, an invariant weight then
    gives (nearly) bit-identical outputs.

    Args:
        model: a module called as ``model(inputs)``.
        inputs: a batch of inputs (more than one sample, for BatchNorm).
        modules: name -> weight to test: a module (its ``weight``, a parameter of ``model``) or ``(module, parameter
            name)``; default every trainable weight (:func:`default_weight_modules`: layers' weights, routers, stacks of
            expert matrices, other parameters of two or more dimensions).
        factor: the scale applied (positive, not 1).
        rtol: largest relative output change counted as invariant.

    Returns:
        name -> :class:`ScaleInvariance`, in the order of ``modules``.

    Raises:
        ValueError: bad ``factor``/``rtol``, a module without a ``weight`` parameter of ``model``, or a
            model whose output is not deterministic (so the test would be meaningless).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
        >>> found = detect_scale_invariance(net, torch.randn(16, 4))
        >>> {name: r.scale_invariant for name, r in found.items()}
        {'0': True, '3': False}
    """
    if not (factor > 0 and factor != 1 and math.isfinite(factor)):
        raise ValueError(f"detect_scale_invariance: factor must be positive and != 1, got {factor}")
    if not rtol > 0:
        raise ValueError(f"detect_scale_invariance: rtol must be positive, got {rtol}")
    modules = default_weight_modules(model) if modules is None else dict(modules)
    reshard(model)  # FSDP2: every parameter its DTensor slice (a probe before may have left the root gathered)
    outputs = _Outputs(model, inputs, factor)
    plans = _plans(model, modules, outputs.names)
    results: dict[str, ScaleInvariance] = {}
    saved_eps = [(m, m.eps) for m in model.modules() if isinstance(m, _NORMS)]
    try:
        for m, _ in saved_eps:
            m.eps = _TEST_EPS
        with preserved_state(model), torch.no_grad():
            _test_modes(model)
            try:
                results = _test_plans(outputs, type(model).__name__, plans, rtol)
            finally:
                outputs.restore()
    finally:
        for m, eps in saved_eps:
            m.eps = eps
    return results


def _plans(model: nn.Module, modules: Mapping[str, nn.Module], names_by_id: Mapping[int, str]) -> Plans:
    plans: Plans = {}
    for name, spec in modules.items():
        module, attr = weight_of(spec)
        weight = getattr(module, attr, None)
        if not isinstance(weight, torch.Tensor) or id(weight) not in names_by_id:
            raise ValueError(
                f"detect_scale_invariance: module {name!r} ({type(module).__name__}) has no `{attr}` parameter "
                f"of {type(model).__name__}; choose modules with a weight"
            )
        attrs = [(attr,)]
        bias = getattr(module, bias_name(attr), None)
        if isinstance(bias, torch.Tensor) and id(bias) in names_by_id:
            attrs.append((attr, bias_name(attr)))
        plans[name] = [(a, [getattr(module, k) for k in a]) for a in attrs]
    return plans


def _test_modes(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, NORMS_WITH_STATS):
            m.train(True)
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(False)


def _test_plans(outputs: _Outputs, model_name: str, plans: Plans, rtol: float) -> dict[str, ScaleInvariance]:
    results: dict[str, ScaleInvariance] = {}
    base = outputs()
    noise = _rel(outputs(), base)
    if noise > rtol / 10:
        raise ValueError(
            f"detect_scale_invariance: {model_name} gives different outputs on the same inputs "
            f"(relative change {noise:.2e}); make the forward deterministic to test scale invariance"
        )
    perturbed: tuple[torch.Tensor, float] | None = None  # the outputs at the perturbed point, how far they moved
    for name, plan in plans.items():
        smallest, hidden = math.inf, False
        for attrs, params in plan:
            change = _rel(outputs(params), base)
            if change > rtol:
                smallest = min(smallest, change)
                continue
            if perturbed is None:
                base1 = outputs(perturbed=True)
                perturbed = (base1, _rel(base1, base, 1.0) if bool(torch.isfinite(base1).all()) else math.nan)
            base1, moved = perturbed
            if not (math.isfinite(moved) and moved > 0):  # nothing trainable moves the outputs: cannot tell
                results[name] = ScaleInvariance(attrs, False, math.nan)
                break
            change1 = _rel(outputs(params, perturbed=True), base1, moved)
            if change1 <= rtol:
                results[name] = ScaleInvariance(attrs, True, max(change, change1))
                break
            smallest, hidden = min(smallest, change1), True
        else:
            results[name] = ScaleInvariance(plan[0][0], False, smallest, hidden)
    return results


def _perturbation_scale(p: torch.Tensor) -> float:
    """At least the init scale of ``p``: its RMS (this rank's slice), or ``1/sqrt(fan_in)`` (1 for a vector) if larger."""
    fan_in = math.prod(p.shape[1:]) if p.dim() >= 2 else 0
    floor = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 1.0
    t = local(p).detach()
    if not t.numel():
        return floor
    rms = float(torch.linalg.vector_norm(t, dtype=torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else None))
    rms /= math.sqrt(t.numel())
    return max(rms, floor) if math.isfinite(rms) else floor


def _perturbed(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``p + v`` for each parameter (this rank's slice when sharded): seeded Gaussian ``v`` of :func:`_perturbation_scale`."""
    generators: dict[torch.device, torch.Generator] = {}
    out = []
    for p in params:
        t = local(p).detach()
        if t.device not in generators:
            generators[t.device] = torch.Generator(device=t.device).manual_seed(_PERTURBATION_SEED)
        noise = torch.randn(t.shape, generator=generators[t.device], device=t.device, dtype=torch.float32)
        out.append(t + (noise * _perturbation_scale(p)).to(t.dtype))
    return out


class _Outputs:
    """``model(inputs)`` flattened, at the probe point or the perturbed point, with some parameters scaled.

    One process: ``functional_call`` overrides (the parameters are never written). FSDP2: this rank's slices
    are written in place for each forward and put back (:meth:`restore` puts back the probe point)."""

    def __init__(self, model: nn.Module, inputs: Any, factor: float) -> None:
        self.model, self.inputs, self.factor = model, inputs, factor
        self.sharded = has_sharded_parameters(model)
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self._point1: dict[int, torch.Tensor] | None = None  # id(parameter) -> its value (slice) at the perturbed point
        self._point0: list[torch.Tensor] | None = None  # FSDP2: the trainable slices as found
        self._at1 = False  # FSDP2: whether the slices hold the perturbed point

    def __call__(self, scaled: Sequence[torch.Tensor] = (), perturbed: bool = False) -> torch.Tensor:
        if perturbed and self._point1 is None:
            self._point1 = {id(p): t for p, t in zip(self.trainable, _perturbed(self.trainable))}
        point = self._point1 if perturbed else {}
        assert point is not None
        if not self.sharded:
            overrides = {self.names[i]: t for i, t in point.items()}
            overrides.update({self.names[id(p)]: point.get(id(p), p.detach()) * self.factor for p in scaled})
            out = functional_call(self.model, overrides, (self.inputs,)) if overrides else self.model(self.inputs)
            return _flat_output(out)
        self._move(perturbed)
        saved = [local(p).detach().clone() for p in scaled]
        try:
            for p in scaled:
                local(p).mul_(self.factor)
            return _flat_output(self.model(self.inputs))
        finally:
            reshard(self.model)  # the next forward gathers the (possibly changed) slices afresh
            for p, original in zip(scaled, saved):
                local(p).copy_(original)

    def _move(self, perturbed: bool) -> None:
        if perturbed == self._at1:
            return
        if self._point0 is None:
            self._point0 = [local(p).detach().clone() for p in self.trainable]
        assert self._point1 is not None
        values = [self._point1[id(p)] for p in self.trainable] if perturbed else self._point0
        for p, v in zip(self.trainable, values):
            local(p).copy_(v)
        self._at1 = perturbed

    def restore(self) -> None:
        """Put the probe point back (FSDP2; nothing was written otherwise)."""
        if self.sharded and self._at1:
            self._move(False)


def weight_group(spec: WeightSpec, result: ScaleInvariance) -> list[torch.Tensor]:
    """The live tensors of a tracked weight (a module, or ``(module, parameter name)``) as described by ``result.params``.

    Example::

        res = detect_scale_invariance(model, x)
        tensors = weight_group(model.fc1, res["fc1"])  # [weight] or [weight, bias]
    """
    return [getattr(weight_of(spec)[0], k) for k in result.params]
