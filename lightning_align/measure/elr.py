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

Which weights are scale-invariant is found by :func:`detect_scale_invariance`
(:mod:`lightning_align.measure.scale_invariance`, re-exported here). Everything here is pure PyTorch; the model
is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Union

import torch

from lightning_align.measure.scale_invariance import (  # noqa: F401  (re-exported: the ELR API in one module)
    ScaleInvariance,
    WeightSpec,
    default_weight_modules,
    detect_scale_invariance,
    weight_group,
)
from lightning_align.measure.sharded import is_sharded, local

#: A weight: one tensor, or several tensors that scale together (e.g. a weight and its bias).
WeightLike = Union[torch.Tensor, Sequence[torch.Tensor]]
#: The sum over ranks of a tensor (every rank calls it), for weights sharded over ranks (FSDP2): e.g.
#: :meth:`lightning_align.measure.sharded.ShardLayout.all_reduce`.
SumOverRanks = Callable[[torch.Tensor], torch.Tensor]


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
