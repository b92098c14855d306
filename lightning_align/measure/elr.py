"""Effective learning rates of scale-invariant weights, their spread, and the critical learning rate.

Seed 004 (Mehmeti-Göpel & Wand, "On the Weight Dynamics of Deep Normalized Networks", ICML 2024).

A weight ``w`` is *scale-invariant* when the network function does not change if ``w`` is multiplied by
any ``c > 0``: a Linear/Conv weight feeding a BatchNorm/LayerNorm/GroupNorm with no path around the
norm. Then the loss gradient ``g`` is orthogonal to ``w`` and ``‖g‖ = c_ℓ/‖w‖``, so the step size that
matters is the *effective learning rate* (ELR) ``E = ‖Δw‖/‖w‖`` (``= η‖g‖/‖w‖`` under plain SGD).

Derivations (checked numerically in ``tests/test_elr_measure.py``), with ``e_ℓ = ‖g_ℓ‖/‖w_ℓ‖`` the ELR
per unit learning rate:

- norm growth under SGD (``g ⊥ w``): ``‖w_{t+1}‖² = ‖w_t‖² + η²‖g_t‖² = ‖w_t‖²(1 + E_t²)``;
- one-step map (``c_ℓ`` constant over a step): ``E_{t+1} = E_t / (1 + E_t²)`` (:func:`next_elr`); the map
  ``x ↦ x/(1+x²)`` rises up to ``x = 1`` and falls beyond, with ``f(x) = f(1/x)``;
- critical learning rate: the extreme layers end one step with equal ELRs when
  ``η e_max / (1 + η² e_max²) = η e_min / (1 + η² e_min²)``, i.e. ``η* = 1/sqrt(e_max·e_min)``
  (:func:`critical_lr`). Below ``η*`` the spread of the extremes shrinks less than it could; above it the
  order of the layers flips (lowest layers get the smallest ELR) and the spread widens again;
- hyper-parameter-free warm-up: ``η_t = min(η_target, η*_t)``.

Everything here is pure PyTorch; the model is never changed (see :func:`detect_scale_invariance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn
from torch.func import functional_call

from lightning_align.measure.modules import NORMS_WITH_STATS, is_weight_layer
from lightning_align.measure.sharded import has_sharded_parameters, is_sharded, local, reshard
from lightning_align.measure.state import preserved_state

#: A weight: one tensor, or several tensors that scale together (e.g. a weight and its bias).
WeightLike = Union[torch.Tensor, Sequence[torch.Tensor]]
#: The sum over ranks of a tensor (every rank calls it), for weights sharded over ranks (FSDP2): e.g.
#: :meth:`lightning_align.measure.sharded.ShardLayout.all_reduce`.
SumOverRanks = Callable[[torch.Tensor], torch.Tensor]

_NORMS = (*NORMS_WITH_STATS, nn.LayerNorm, nn.GroupNorm, *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()))
#: ``eps`` of the norm layers during the invariance test (see :func:`detect_scale_invariance`).
_TEST_EPS = 1e-30


# --------------------------------------------------------------------------------------------------
# Norms and ratios
# --------------------------------------------------------------------------------------------------
def _parts(x: WeightLike | None) -> list[torch.Tensor]:
    if x is None:
        return []
    if isinstance(x, torch.Tensor):
        return [x]
    return list(x)


def group_norm(x: WeightLike | None) -> float:
    """Euclidean norm of a tensor or of several tensors taken as one vector.

    Accumulates in the tensors' own precision (at least float32); the squares are summed in Python floats.

    Example:
        >>> group_norm([torch.tensor([3.0]), torch.tensor([4.0])])
        5.0

    A sharded tensor (``DTensor``) counts whole: its norm is reduced over ranks (a collective every rank must
    call, one per tensor; :func:`effective_lrs` and :func:`grad_weight_ratios` with ``sum_over_ranks`` need
    one for all weights).
    """
    total = 0.0
    for t in _parts(x):
        low = t.dtype in (torch.float16, torch.bfloat16)
        norm = torch.linalg.vector_norm(t.detach(), dtype=torch.float32 if low else None)
        total += float(norm.full_tensor() if is_sharded(norm) else norm) ** 2
    return math.sqrt(total)


def _group_norms(groups: Sequence[Sequence[torch.Tensor]], sum_over_ranks: SumOverRanks) -> list[float]:
    """Norms of groups of tensors sharded over ranks: local sums of squares (float64), one sum over ranks."""
    device = next((local(t).device for g in groups for t in g), torch.device("cpu"))
    zero = torch.zeros((), dtype=torch.float64, device=device)
    local_sq = [sum((local(t).detach().double().square().sum() for t in g), zero) for g in groups]
    if not local_sq:
        return []
    total = sum_over_ranks(torch.stack(local_sq))
    return [math.sqrt(v) for v in total.tolist()]


def _ratio(num: float, den: float) -> float:
    if den > 0:
        return num / den
    return math.nan if num == 0 else math.inf


def effective_lrs(
    before: Mapping[str, WeightLike], after: Mapping[str, WeightLike], *, sum_over_ranks: SumOverRanks | None = None
) -> dict[str, float]:
    """Effective learning rates ``‖after - before‖ / ‖before‖`` of named weights, from an actual update.

    Works for any optimizer (momentum, Adam, weight decay, clipping): it measures the step that was
    taken. A value may be a tensor or a sequence of tensors that form one weight (e.g. ``[W, b]``).
    A zero weight gives ``inf`` (or ``nan`` if it did not move either).

    Args:
        before: name -> weight before the optimizer step.
        after: name -> the same weight after the step (same names, same shapes).
        sum_over_ranks: for weights sharded over ranks (FSDP2): the tensors are this rank's slices (or
            ``DTensor``s, whose slices are taken) and the squared norms of all weights are summed over ranks
            in one call (float64); every rank then returns the same values. ``None``: whole tensors.

    Raises:
        ValueError: if the names or shapes differ.

    Example:
        >>> effective_lrs({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([3.0, 3.5])})
        {'w': 0.1}
    """
    if set(before) != set(after):
        raise ValueError(
            f"effective_lrs: `before` and `after` must name the same weights; only in before: "
            f"{sorted(set(before) - set(after))}, only in after: {sorted(set(after) - set(before))}"
        )
    out: dict[str, float] = {}
    shard = local if sum_over_ranks is not None else (lambda t: t)
    deltas: dict[str, list[torch.Tensor]] = {}
    for name, w0 in before.items():
        p0, p1 = [shard(t) for t in _parts(w0)], [shard(t) for t in _parts(after[name])]
        if len(p0) != len(p1) or any(a.shape != b.shape for a, b in zip(p0, p1)):
            raise ValueError(f"effective_lrs: weight {name!r} has different shapes before and after the step")
        # one rounding relative to the difference itself (exact for small updates, Sterbenz): no upcast needed
        deltas[name] = [b.detach() - a.detach() for a, b in zip(p0, p1)]
        if sum_over_ranks is None:
            out[name] = _ratio(group_norm(deltas[name]), group_norm(p0))
    if sum_over_ranks is not None:
        names = list(deltas)
        norms = _group_norms([*deltas.values(), *(_parts(before[n]) for n in names)], sum_over_ranks)
        out = {n: _ratio(norms[i], norms[len(names) + i]) for i, n in enumerate(names)}
    return out


def grad_weight_ratios(
    weights: Mapping[str, WeightLike], grads: Mapping[str, WeightLike | None], *, sum_over_ranks: SumOverRanks | None = None
) -> dict[str, float]:
    """``e_ℓ = ‖g_ℓ‖ / ‖w_ℓ‖``: the SGD effective learning rate per unit learning rate.

    Args:
        weights: name -> weight (tensor or group of tensors).
        grads: name -> gradient of the same shape(s); ``None`` (or a ``None`` part) counts as zero.
        sum_over_ranks: for weights sharded over ranks (FSDP2), as in :func:`effective_lrs`: local slices,
            one sum over ranks for all weights and gradients.

    Example:
        >>> grad_weight_ratios({"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 1.0])})
        {'w': 0.2}
    """
    grad_parts: dict[str, list[torch.Tensor]] = {}
    for name in weights:
        g = grads.get(name)
        grad_parts[name] = [t for t in _parts(g) if t is not None] if g is not None else []
    if sum_over_ranks is not None:
        names = list(weights)
        norms = _group_norms([*grad_parts.values(), *(_parts(weights[n]) for n in names)], sum_over_ranks)
        return {n: _ratio(norms[i], norms[len(names) + i]) for i, n in enumerate(names)}
    return {name: _ratio(group_norm(grad_parts[name]), group_norm(w)) for name, w in weights.items()}


# --------------------------------------------------------------------------------------------------
# Spread and critical learning rate
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ELRSpread:
    """How unequal the effective learning rates of layers are.

    Attributes:
        ratio: ``max E / min E`` (1 when all equal; ``inf`` when some layer did not move).
        log_std: population standard deviation of ``log E`` (0 when all equal).
        max_layer: the layer with the largest ELR.
        min_layer: the layer with the smallest ELR.
        count: number of layers.

    Example:
        >>> s = elr_spread({"fc1": 0.01, "fc2": 0.04})
        >>> s.ratio, s.max_layer, s.min_layer
        (4.0, 'fc2', 'fc1')
    """

    ratio: float
    log_std: float
    max_layer: str
    min_layer: str
    count: int


def elr_spread(elrs: Mapping[str, float]) -> ELRSpread:
    """Spread of effective learning rates over layers (pass the scale-invariant ones).

    Raises:
        ValueError: if ``elrs`` is empty.

    Example:
        >>> s = elr_spread({"a": 0.1, "b": 0.4})
        >>> round(s.ratio, 6), round(s.log_std, 6), s.max_layer
        (4.0, 0.693147, 'b')
    """
    if not elrs:
        raise ValueError("elr_spread: no layers given (a spread needs at least one scale-invariant layer)")
    names = list(elrs)
    values = [float(elrs[n]) for n in names]
    hi = max(range(len(values)), key=values.__getitem__)
    lo = min(range(len(values)), key=values.__getitem__)
    if any(v < 0 or math.isnan(v) for v in values):
        return ELRSpread(math.nan, math.nan, names[hi], names[lo], len(values))
    ratio = _ratio(values[hi], values[lo])
    if values[lo] == 0 or math.isinf(values[hi]):
        log_std = math.inf
    else:
        logs = [math.log(v) for v in values]
        mean = sum(logs) / len(logs)
        log_std = math.sqrt(sum((x - mean) ** 2 for x in logs) / len(logs))
    return ELRSpread(ratio, log_std, names[hi], names[lo], len(values))


def critical_lr(ratios: Mapping[str, float], lrs: Mapping[str, float] | None = None) -> float:
    """Critical learning rate ``η* = 1 / sqrt(e_max · e_min)``.

    With this LR the layers with the largest and smallest ``e_ℓ = ‖g_ℓ‖/‖w_ℓ‖`` (see
    :func:`grad_weight_ratios`) end the next SGD step with equal effective learning rates; a larger LR
    flips their order and widens the spread again. Layers with ``e_ℓ = 0`` (no gradient) are not
    affected by the LR and are left out; with none left the result is ``inf``.

    Args:
        ratios: layer -> ``e_ℓ``, over the scale-invariant layers.
        lrs: optional layer -> current learning rate of that layer (per-group LRs). Then the result is
            the critical *common factor* ``s*`` by which every layer's LR may be multiplied:
            ``1/sqrt(max(η_ℓ e_ℓ)·min(η_ℓ e_ℓ))`` (equal to ``η*/η`` when all LRs are ``η``).

    Example:
        >>> critical_lr({"low": 4.0, "high": 1.0})
        0.5
        >>> critical_lr({"low": 4.0, "high": 1.0}, lrs={"low": 0.1, "high": 0.1})
        5.0
    """
    if lrs is not None:
        missing = sorted(set(ratios) - set(lrs))
        if missing:
            raise ValueError(f"critical_lr: no learning rate given for layers {missing}")
        ratios = {k: v * float(lrs[k]) for k, v in ratios.items()}
    values = [float(v) for v in ratios.values() if float(v) > 0 or math.isnan(float(v))]
    if any(math.isnan(v) for v in values):
        return math.nan
    if not values:
        return math.inf
    return 1.0 / math.sqrt(max(values) * min(values))


def next_elr(elr: float) -> float:
    """The one-step map ``E_{t+1} = E_t / (1 + E_t²)`` of a scale-invariant weight under plain SGD.

    Follows from ``‖w_{t+1}‖² = ‖w_t‖²(1 + E_t²)`` and ``‖g‖ = c/‖w‖`` with ``c`` constant over the step.

    Example:
        >>> next_elr(1.0), next_elr(2.0) == next_elr(0.5)
        (0.5, True)
    """
    return elr / (1.0 + elr * elr)


# --------------------------------------------------------------------------------------------------
# Scale-invariance detection
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleInvariance:
    """The outcome of scaling one module's weight.

    Attributes:
        params: attribute names of the module's parameters that form the weight: ``("weight",)`` when
            the weight alone is scale-invariant (or when nothing is), ``("weight", "bias")`` when only
            weight and bias together are (a bias before LayerNorm; a bias before BatchNorm cancels).
        scale_invariant: whether the network function is unchanged by the scaling.
        relative_change: ``‖f(c·w) - f(w)‖ / ‖f(w)‖`` on the batch for ``params`` (the evidence; for a
            weight that is not invariant, the smallest change over the scalings tried).

    Example::

        res = detect_scale_invariance(model, x)  # {module name: ScaleInvariance}
        [name for name, r in res.items() if r.scale_invariant]
    """

    params: tuple[str, ...]
    scale_invariant: bool
    relative_change: float


def default_weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Linear/Conv/Embedding modules of ``model`` with a trainable ``weight`` (candidates for ELRs).

    Example:
        >>> list(default_weight_modules(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))))
        ['0', '2']
    """
    return {
        name: m
        for name, m in model.named_modules()
        if name and is_weight_layer(m) and isinstance(getattr(m, "weight", None), nn.Parameter)
        and m.weight.requires_grad
    }


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


def _rel(a: torch.Tensor, base: torch.Tensor) -> float:
    scale = float(base.norm())
    diff = float((a - base).norm())
    if not math.isfinite(diff):
        return math.inf
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def detect_scale_invariance(
    model: nn.Module,
    inputs: Any,
    modules: Mapping[str, nn.Module] | None = None,
    *,
    factor: float = 2.0,
    rtol: float = 1e-3,
) -> dict[str, ScaleInvariance]:
    """Find the weights whose scale does not change the network function, by a direct numerical test.

    For each module, its ``weight`` is multiplied by ``factor`` and the outputs ``model(inputs)`` are
    compared with the unscaled ones; if they change, weight and bias are scaled together and compared
    again. A relative change below ``rtol`` means scale-invariant. This catches what a graph trace
    would (a norm after the layer, no path around it) and also what it would not (norms reached through
    reshapes or custom code), at the price of one or two forward passes per module.

    Norm layers use **batch statistics** (train mode) and dropout is off during the test: batch
    statistics absorb the scale, which is the function SGD optimizes and for which ``g ⊥ w``; with
    running statistics (eval mode) no weight would be scale-invariant. Flags, buffers, ``.grad`` and RNG
    streams are restored afterwards; parameters are never written (``torch.func.functional_call``), except
    those of a model sharded by FSDP2 (``DTensor`` parameters live in FSDP's hooks, which ``functional_call``
    cannot override): there each rank scales its slice in place for one forward and copies it back
    (bit-exact), every forward pass being a collective that every rank runs in the same order.
    During the test the norm layers' ``eps`` is set to ``1e-30`` (and put back): ``eps`` breaks invariance
    only by about ``eps/var``, which would hide small weights (variance near ``eps``) that training
    treats as scale-invariant. With ``factor=2``, exact in floating point, an invariant weight then
    gives (nearly) bit-identical outputs.

    Args:
        model: a module called as ``model(inputs)``.
        inputs: a batch of inputs (more than one sample, for BatchNorm).
        modules: name -> module to test (each with a ``weight`` parameter of ``model``); default every
            Linear/Conv/Embedding with a trainable weight (:func:`default_weight_modules`).
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
    sharded = has_sharded_parameters(model)
    names_by_id = {id(p): n for n, p in model.named_parameters()}
    plans: dict[str, list[tuple[tuple[str, ...], list[torch.Tensor]]]] = {}
    for name, module in modules.items():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) not in names_by_id:
            raise ValueError(
                f"detect_scale_invariance: module {name!r} ({type(module).__name__}) has no `weight` parameter "
                f"of {type(model).__name__}; choose modules with a weight"
            )
        attrs = [("weight",)]
        bias = getattr(module, "bias", None)
        if isinstance(bias, torch.Tensor) and id(bias) in names_by_id:
            attrs.append(("weight", "bias"))
        plans[name] = [(a, [getattr(module, k) for k in a]) for a in attrs]

    def output() -> torch.Tensor:
        try:
            return _flat_output(model(inputs))
        finally:
            if sharded:
                reshard(model)  # the next forward gathers the (possibly scaled) slices afresh

    def scaled_output(params: list[torch.Tensor]) -> torch.Tensor:
        if not sharded:
            overrides = {names_by_id[id(p)]: p.detach() * factor for p in params}
            return _flat_output(functional_call(model, overrides, (inputs,)))
        saved = [local(p).detach().clone() for p in params]
        try:
            for p in params:
                local(p).mul_(factor)
            return output()
        finally:
            for p, original in zip(params, saved):
                local(p).copy_(original)

    results: dict[str, ScaleInvariance] = {}
    saved_eps = [(m, m.eps) for m in model.modules() if isinstance(m, _NORMS)]
    try:
        for m, _ in saved_eps:
            m.eps = _TEST_EPS
        with preserved_state(model), torch.no_grad():
            _test_modes(model)
            results = _test_plans(output, scaled_output, type(model).__name__, plans, rtol)
    finally:
        for m, eps in saved_eps:
            m.eps = eps
    return results


def _test_modes(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, NORMS_WITH_STATS):
            m.train(True)
        elif isinstance(m, nn.modules.dropout._DropoutNd):
            m.train(False)


def _test_plans(
    output: Callable[[], torch.Tensor],
    scaled_output: Callable[[list[torch.Tensor]], torch.Tensor],
    model_name: str,
    plans: dict[str, list[tuple[tuple[str, ...], list[torch.Tensor]]]],
    rtol: float,
) -> dict[str, ScaleInvariance]:
    results: dict[str, ScaleInvariance] = {}
    base = output()
    noise = _rel(output(), base)
    if noise > rtol / 10:
        raise ValueError(
            f"detect_scale_invariance: {model_name} gives different outputs on the same inputs "
            f"(relative change {noise:.2e}); make the forward deterministic to test scale invariance"
        )
    for name, plan in plans.items():
        smallest = math.inf
        for attrs, params in plan:
            change = _rel(scaled_output(params), base)
            if change <= rtol:
                results[name] = ScaleInvariance(attrs, True, change)
                break
            smallest = min(smallest, change)
        else:
            results[name] = ScaleInvariance(("weight",), False, smallest)
    return results


def weight_group(module: nn.Module, result: ScaleInvariance) -> list[torch.Tensor]:
    """The live tensors of a module's weight as described by ``result.params``.

    Example::

        res = detect_scale_invariance(model, x)
        tensors = weight_group(model.fc1, res["fc1"])  # [weight] or [weight, bias]
    """
    return [getattr(module, k) for k in result.params]
