"""Feature speed, backward-feature angle and the backward-to-feature kernel (Chizat & Netrapalli, 2024).

For a layer output ("feature") ``f`` on a batch, with backward pass ``b = dL/df`` and a parameter update
``Δθ``, the first-order feature change is ``δf = J·Δθ`` (``J = df/dθ``; a Jacobian-vector product,
computed by a double vjp on the forward graph). The chain rule gives, exactly at first order,

    ⟨b, δf⟩ = Σ_{k ≤ ℓ} ⟨∇_k L, Δθ_k⟩ = −ΔL_{≤ℓ},

where ``k ≤ ℓ`` runs over the parameters *upstream* of ``f`` and ``ΔL_{≤ℓ}`` is the loss decrease they
cause. With the backward-feature angle ``cos θ = ⟨−b, δf⟩ / (‖b‖‖δf‖)`` this is the feature speed formula

    ‖δf‖ = ΔL_{≤ℓ} / (‖b‖ cos θ).

**Which parameters are "up to ℓ".** Those in the autograd graph of ``f``: the parameters the forward pass
used before producing ``f`` (found by walking ``f.grad_fn``; exact, whatever the architecture). The identity
holds when ``f`` is a *cut* of the network: every path from those parameters to the loss goes through ``f``
(a sequential net; the residual stream of a ResNet after the addition; the network output). For the
output of a residual *branch* it does not (upstream parameters also reach the loss through the skip
connection), and ``predicted_speed`` then differs from ``speed``: read ``feature_loss_decrease``
(``−⟨b, δf⟩``, the part of the decrease transmitted through ``f``) for those.

Speeds are relative: ``‖δf‖_rms / ‖f‖_rms`` (RMS over every entry of the batch's feature), which is
``‖δf‖/‖f‖``. With a batch-mean loss, ``‖b‖`` scales like ``1/batch``; angles and speeds do not.

The measure functions never change the model: no parameter is written, BatchNorm running statistics are
neither used differently nor updated (batch statistics in train mode, running ones in eval mode, exactly
as in the model's forward), ``.grad``, flags and RNG streams are restored. Dropout should be off (the
callbacks turn it off): the functions run the model several times and compare the passes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, jvp, vjp

from lightning_align.measure.autodiff import (
    NoDoubleBackward,
    batch_statistics_without_update,
    graph_nodes,
    math_attention,
    missing_double_backward,
    once_differentiable_functions,
    twice_differentiable,
)
from lightning_align.measure.batch import batch_inputs, batch_targets
from lightning_align.measure.modules import captured_outputs, select_modules
from lightning_align.measure.sequence import PositionMasks, counted
from lightning_align.measure.sharded import ShardLayout, local, reshard
from lightning_align.measure.state import preserved_state

LossFn = Callable[[Any, Any], torch.Tensor]

#: Largest relative change of a feature's finite-difference ``J·Δθ`` between the steps ``h`` and ``h/2`` for which
#: the sharded feature speed is trusted (the Richardson-combined value is then far more accurate than this).
FD_SPREAD_LIMIT = 1e-2
ModuleSpec = Sequence[str] | str | Mapping[str, nn.Module] | None
FD_STEP = 1e-3  # relative size of the finite-difference perturbation (see finite_difference_feature_speed)

__all__ = [
    "FeatureKernel",
    "FeatureSpeed",
    "FeatureSpeedResults",
    "feature_kernel",
    "feature_speed",
    "finite_difference_feature_speed",
    "resolve_modules",
]


@dataclass(frozen=True)
class FeatureSpeed:
    """Feature speed and backward-feature angle of one layer output for one update ``Δθ``.

    Attributes:
        cos_angle: ``⟨−b, δf⟩ / (‖b‖‖δf‖)``, the backward-feature angle (NaN if ``δf`` or ``b`` is zero).
        speed: ``‖δf‖_rms / ‖f‖_rms``, the measured relative feature speed (first order, ``J·Δθ``).
        predicted_speed: ``loss_decrease / (‖b‖ cos θ) / ‖f‖``, the feature speed formula's value.
        loss_decrease: ``−Σ_{k≤ℓ} ⟨∇_k L, Δθ_k⟩``, first-order loss decrease due to the upstream parameters.
        feature_loss_decrease: ``−⟨b, δf⟩``, the first-order decrease transmitted through ``f``
            (equal to ``loss_decrease`` when ``f`` is a cut of the network).
        feature_rms: ``‖f‖_rms``.
        update_rms: ``‖δf‖_rms``.
        backward_norm: ``‖b‖`` (Euclidean norm of ``dL/df`` over the whole batch).
        numel: number of entries of ``f`` on the batch (the RMS denominator is its square root); on a padded Hugging
            Face batch every quantity is over the positions that count (:class:`~lightning_align.measure.sequence.PositionMasks`).
        upstream: names of the parameters upstream of ``f`` (those counted in ``loss_decrease``).

    Example::

        res = feature_speed(model, loss_fn, (x, y), {"fc1": model.fc1}, lr=0.1)
        res["fc1"].cos_angle, res["fc1"].speed, res["fc1"].predicted_speed
    """

    cos_angle: float
    speed: float
    predicted_speed: float
    loss_decrease: float
    feature_loss_decrease: float
    feature_rms: float
    update_rms: float
    backward_norm: float
    numel: int
    upstream: tuple[str, ...] = field(repr=False)


class FeatureSpeedResults(dict):
    """``{module name: FeatureSpeed}`` in forward order, plus whole-model quantities.

    Attributes:
        loss: the loss on the batch at the evaluation point.
        loss_decrease: ``−⟨∇L, Δθ⟩`` over all parameters (first order).
        param_loss_decrease: ``{parameter name: −⟨∇_k L, Δθ_k⟩}`` for every trainable parameter.

    Example::

        res = feature_speed(model, loss_fn, (x, y), {"fc1": model.fc1, "fc2": model.fc2}, lr=0.1)
        {name: r.cos_angle for name, r in res.items()}, res.loss_decrease
    """

    loss: float = math.nan
    loss_decrease: float = math.nan
    param_loss_decrease: dict[str, float]
    #: finite differences only: ``"name (spread)"`` of the layers whose ``J·Δθ`` did not converge (their values NaN).
    rough: tuple[str, ...] = ()


@dataclass(frozen=True)
class FeatureKernel:
    """Backward-to-feature kernel ``K = Σ_k η_k J_k J_kᵀ`` of a layer output on a small probe.

    Attributes:
        matrix: ``K`` of shape ``(D, D)``, ``D`` = entries of the feature on the batch (flattened
            sample-major); ``δf = −K·b`` for the gradient step ``Δθ_k = −η_k ∇_k L``.
        eigenvalues: eigenvalues of ``K``, largest first.
        mean_rms_ratio: ``mean(λ) / rms(λ)``, the alignment ``cos θ`` a generic backward vector gets.

    Example::

        fk = feature_kernel(model, loss_fn, (x, y), module="fc1", lr=0.1)
        fk.eigenvalues[:5], fk.mean_rms_ratio
    """

    matrix: torch.Tensor
    eigenvalues: torch.Tensor
    mean_rms_ratio: float


# --------------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------------
def feature_speed(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    modules: ModuleSpec,
    lr: float = 1.0,
    update: Mapping[str, torch.Tensor] | None = None,
    *,
    lrs: Mapping[str, float] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    owner: str = "feature_speed",
    argument: str = "modules",
) -> FeatureSpeedResults:
    """Backward-feature angle, feature speed and the feature speed formula per layer.

    Args:
        model: the network. With ``loss_fn`` it is called as ``model(batch[0])``; with ``loss_fn=None``
            as ``model(batch)`` and must return the scalar loss (e.g. a ``ProbeLoss``).
        loss_fn: ``loss_fn(outputs, targets) -> scalar mean loss``, or ``None`` (see ``model``).
        batch: ``(inputs, targets)`` (or whatever ``model`` takes when ``loss_fn`` is ``None``).
        modules: names or regular expressions of submodules of ``model`` (``None``: every Linear/Conv),
            or a mapping ``{name: submodule}``; their outputs (first tensor of a tuple) are the features.
        lr: learning rate of the gradient step ``Δθ = −lr·∇θL`` used when ``update`` is not given.
        update: the parameter update ``{parameter name: Δθ}`` (e.g. an optimizer's real step, the
            difference of weights after and before it). Trainable parameters it omits do not move.
        lrs: per-parameter multipliers of ``lr`` for the gradient step (missing names: 1.0; 0 freezes).
        params: evaluate at these parameter values (``{name: tensor}``, e.g. the weights before a step)
            instead of the model's own; missing names keep the model's values.
        owner, argument: who is asking and the argument holding the layers (named in error messages: a callback
            passes its name and ``"layers"``).

    Returns:
        :class:`FeatureSpeedResults`: ``{name: FeatureSpeed}`` in forward order.

    Raises:
        ValueError: a module pattern matching nothing, a module not run by the forward pass or whose
            output does not reach the loss, unknown parameter names in ``update``/``params``/``lrs``,
            or an update of the wrong shape.
        NoDoubleBackward: (a ``RuntimeError``) ``J·Δθ`` goes through an op without a double backward, naming it
            (:func:`finite_difference_feature_speed` measures such a model; the callbacks switch to it).

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> batch = (torch.randn(16, 4), torch.randn(16, 2))
        >>> res = feature_speed(net, nn.functional.mse_loss, batch, ["0", "2"], lr=0.1)
        >>> 0.0 < res["2"].cos_angle <= 1.0 and abs(res["2"].predicted_speed / res["2"].speed - 1) < 1e-4
        True
    """
    mods = resolve_modules(model, modules, owner=f"{owner}({argument}=...)")
    positions = PositionMasks(model, batch, owner=owner)
    names = _param_names(model)
    _check_names(update, names, "update")
    _check_names(params, names, "params")
    _check_names(lrs, names, "lrs")
    with preserved_state(model), batch_statistics_without_update(model), torch.enable_grad(), twice_differentiable():
        point = _evaluation_point(model, params)
        trainable = [n for n in point if _trainable(model, n)]
        leaves = {n: (point[n].detach().requires_grad_(True) if n in trainable else point[n].detach()) for n in point}
        buffers = dict(model.named_buffers())
        with captured_outputs(mods) as feats, positions.watching(mods):
            loss = _loss(functional_call(model, {**leaves, **buffers}, (_model_input(loss_fn, batch),)), loss_fn, batch)
        _check_captured(mods, feats, owner, argument)
        f = [feats[n] for n in mods]
        # The graph is kept for the feature changes J·Δθ (computed on it by a double vjp below).
        grads = torch.autograd.grad(loss, f + [leaves[n] for n in trainable], allow_unused=True, retain_graph=True)
        backs, pgrads = grads[: len(f)], dict(zip(trainable, grads[len(f):]))
        for name, b in zip(mods, backs):
            if b is None:
                raise ValueError(_unreached(owner, argument, name))
        upstream = _upstream_params(f, {id(leaves[n]): n for n in trainable})
        delta = _update(update, pgrads, leaves, trainable, lr, lrs)
        param_dec = {
            n: -float(torch.vdot(pgrads[n].flatten(), delta[n].flatten())) if pgrads[n] is not None else 0.0
            for n in trainable
        }
        dfs = _feature_changes(f, [leaves[n] for n in trainable], [delta[n] for n in trainable], owner)
    results = FeatureSpeedResults()
    results.loss = float(loss.detach())
    results.loss_decrease = float(sum(param_dec.values()))
    results.param_loss_decrease = param_dec
    for name, fi, bi, dfi, up in zip(mods, f, backs, dfs, upstream):
        results[name] = _speed(*_counted(positions, name, fi.detach(), bi, dfi), sum(param_dec[n] for n in up), tuple(up))
    return results


def finite_difference_feature_speed(
    model: nn.Module,
    batch: Any,
    modules: ModuleSpec,
    layout: ShardLayout | None,
    lr: float = 1.0,
    update: Mapping[str, torch.Tensor] | None = None,
    *,
    lrs: Mapping[str, float] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
    step: float = FD_STEP,
    richardson: bool = True,
    owner: str = "feature_speed",
    argument: str = "modules",
    warn: bool = True,
) -> FeatureSpeedResults:
    """:func:`feature_speed` through the model's own forward and backward, for parameters sharded by FSDP2.

    Under FSDP2 neither ``torch.func`` (FSDP's hooks swap in their gathered parameters) nor a double backward
    with respect to ``DTensor`` parameters works, so, on the same quantities:

    - ``f``, ``b = dL/df`` and ``∇L``: one forward and one backward of ``model(batch)`` (the loss), the features
      recorded by forward hooks (``retain_grad``); the gradient is FSDP's reduce-scattered slice of it;
    - ``⟨∇_k L, Δθ_k⟩``: from the local slices, summed over ranks with one all-reduce (with ``‖θ‖²``, ``‖Δθ‖²``);
    - ``δf = J·Δθ``: central differences of the features over the forwards at ``θ ± h·Δθ`` (all layers in the
      same forwards, written in place into the local slices under ``no_grad`` and copied back bit-exactly),
      ``h = step·‖θ‖/‖Δθ‖`` (the perturbation is ``step`` relative to the weights). With ``richardson`` (the
      default) the steps ``h`` and ``h/2`` are combined, ``(4 D(h/2) − D(h))/3``: truncation error ``O(h⁴)``,
      rounding ``O(ε_mach/step)``, 4 forwards; without it ``O(h²)`` and 2 forwards. Kinks (ReLU) crossed
      within ``±h`` add an error ``O(step)`` that extrapolation does not remove, hence the small default
      step (1e-3). Observed in float32 against the exact :func:`feature_speed` (small MLPs, SGD and sign
      updates): tanh/GELU/LayerNorm nets ``speed`` within 4e-5 relative, ``cos`` 1e-6 absolute,
      ``predicted_speed`` 1e-5; deep or wide ReLU nets 1e-4, 1e-4 and 5e-4 (with ``step=1e-2``: 1e-6 for
      smooth nets but 1e-3 and 7e-3 for ReLU ones).
    - the upstream parameters of each feature: the autograd graph of ``f`` (as :func:`feature_speed`), whose
      leaves under FSDP2 are its gathered copies; each is named by a forward pre-hook on every module (FSDP's
      own pre-hook, prepended, has put the gathered parameters on the module by then) and on the outermost
      sharded module (for parameters of its group that a module uses without calling their owner). A parameter
      of another ``fully_shard`` unit used without calling that unit is not found (FSDP2 would not gather it).

    The batch is the same on every rank (FSDP averages identical gradients), so every value is the one-process
    value on that batch, on every rank. Works unsharded too (``layout=None``: whole tensors, gradients by
    ``torch.autograd.grad``): the route for a model with an op that has no double backward.

    Args:
        model: called as ``model(batch)``, returns the scalar loss (e.g. a ``ProbeLoss``).
        modules, lr, lrs: as in :func:`feature_speed`.
        layout: the parameters' :class:`~lightning_align.measure.sharded.ShardLayout` (``None``: not sharded).
        update, params: ``{parameter name: this rank's slice}`` of ``Δθ`` and of the evaluation point
            (whole tensors when not sharded).
        step: relative size of the perturbation ``h·Δθ``.
        richardson: combine two steps (4 forwards instead of 2, error ``O(h⁴)``).
        owner, argument: as in :func:`feature_speed`.
        warn: warn when a layer's ``J·Δθ`` has not converged (NaN values; listed in ``results.rough`` either way).
    """
    mods = resolve_modules(model, modules, owner=f"{owner}({argument}=...)")
    positions = PositionMasks(model, batch, owner=owner)
    named = dict(model.named_parameters())
    _check_names(update, set(named), "update")
    _check_names(params, set(named), "params")
    _check_names(lrs, set(named), "lrs")
    trainable = [n for n, p in named.items() if p.requires_grad]
    slices = {n: local(p) for n, p in named.items()}
    for what, mapping in (("update", update), ("params", params)):
        for n, t in (mapping or {}).items():
            if t.shape != slices[n].shape:
                raise ValueError(f"feature_speed: `{what}[{n!r}]` has shape {tuple(t.shape)}, this rank's slice {tuple(slices[n].shape)}")
    saved = {n: slices[n].detach().clone() for n in set(trainable) | set(params or {})}
    grads = {n: named[n].grad for n in trainable}
    point = {n: (params or {}).get(n, saved[n]).to(saved[n]) for n in saved}
    try:
        with preserved_state(model), batch_statistics_without_update(model), torch.enable_grad():
            _write(slices, point, layout, model)
            for n in trainable:
                named[n].grad = None
            leaves: dict[int, str] = {}
            with captured_outputs(mods) as feats, _leaf_names(model, leaves), positions.watching(mods):
                loss = model(batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("feature_speed: the loss must be a scalar tensor (a mean over the batch)")
            _check_captured(mods, feats, owner, argument)
            f = [feats[n] for n in mods]
            upstream = _upstream_params(f, {i: n for i, n in leaves.items() if n in trainable}, order=trainable)
            backs, pgrads = _loss_backward(loss, f, {n: named[n] for n in trainable}, layout)
            for name, b in zip(mods, backs):
                if b is None:
                    raise ValueError(_unreached(owner, argument, name))
            delta = {}
            for n in trainable:
                if update is not None:
                    d = update.get(n)
                    delta[n] = torch.zeros_like(saved[n]) if d is None else d.detach().to(saved[n])
                else:
                    g = pgrads[n]
                    delta[n] = torch.zeros_like(saved[n]) if g is None else -lr * (lrs or {}).get(n, 1.0) * g
            parts = [
                torch.zeros((), dtype=torch.float64, device=saved[n].device) if pgrads[n] is None
                else -torch.vdot(pgrads[n].double().flatten(), delta[n].double().flatten())
                for n in trainable
            ]
            parts += [sum(point[n].double().square().sum() for n in trainable), sum(delta[n].double().square().sum() for n in trainable)]
            sums = torch.stack([torch.as_tensor(t, dtype=torch.float64) for t in parts])
            sums = sums if layout is None else layout.all_reduce(sums)
            values = sums.tolist()
            param_dec = dict(zip(trainable, values[: len(trainable)]))
            theta_norm, delta_norm = math.sqrt(values[-2]), math.sqrt(values[-1])
            dfs, spreads = _finite_differences(
                model, batch, mods, slices, point, delta, layout, theta_norm, delta_norm, step, richardson, f
            )
    finally:
        _write(slices, saved, layout, model)
        for n, g in grads.items():
            named[n].grad = g
    results = FeatureSpeedResults()
    results.loss = float(loss.detach())
    results.loss_decrease = float(sum(param_dec.values()))
    results.param_loss_decrease = param_dec
    rough = []
    for name, fi, bi, dfi, up, spread in zip(mods, f, backs, dfs, upstream, spreads):
        results[name] = _speed(*_counted(positions, name, fi.detach(), bi.detach(), dfi), sum(param_dec[n] for n in up), tuple(up))
        if spread > FD_SPREAD_LIMIT:  # the difference quotient has not converged: no value rather than a wrong one
            rough.append(f"{name} ({spread:.1e})")
            results[name] = replace(results[name], cos_angle=math.nan, speed=math.nan, predicted_speed=math.nan)
    results.rough = tuple(rough)
    if rough and warn:
        warnings.warn(
            "feature_speed (sharded): J·Δθ changes by more than "
            f"{FD_SPREAD_LIMIT:g} relative when the finite-difference step is halved at {', '.join(rough)}: the "
            "features are not smooth at that scale (e.g. ReLU units switching), so their speed, angle and predicted "
            "speed are NaN. Smooth activations (GELU, SiLU, tanh), or strategy='ddp' (exact products), measure them.",
            stacklevel=2,
        )
    return results


def feature_kernel(
    model: nn.Module,
    loss_fn: LossFn | None,
    batch: Any,
    module: str | nn.Module,
    lr: float = 1.0,
    *,
    lrs: Mapping[str, float] | None = None,
    params: Mapping[str, torch.Tensor] | None = None,
) -> FeatureKernel:
    """The backward-to-feature kernel of one layer output, its spectrum and ``mean(λ)/rms(λ)``.

    ``K = Σ_k η_k (∂f/∂θ_k)(∂f/∂θ_k)ᵀ`` over the trainable parameters (only those upstream of ``f``
    contribute), ``η_k = lr·lrs[k]``. A gradient step moves the feature by ``δf = −K·b``; at random
    initialization ``b`` is generic and ``cos θ ≈ mean(λ)/rms(λ)``: a flat spectrum (dynamical isometry)
    means alignment. Built column by column (a ``vjp`` then a ``jvp`` each), so it costs ``D`` vjps and
    jvps and ``D²`` memory: for small probes (``D`` = feature entries on the batch, a few thousand at most).

    Args:
        model, loss_fn, batch, lrs, params: as in :func:`feature_speed` (the loss itself is not used).
        module: the layer: a name of a submodule of ``model`` or the submodule itself.
        lr: base learning rate ``η``.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4))
        >>> k = feature_kernel(net, nn.functional.mse_loss, (torch.randn(2, 3), torch.randn(2, 4)), "2")
        >>> k.matrix.shape, bool(0 < k.mean_rms_ratio <= 1)
        (torch.Size([8, 8]), True)
    """
    mods = resolve_modules(model, module if not isinstance(module, nn.Module) else {"feature": module}, owner="feature_kernel(module=...)")
    if len(mods) != 1:
        raise ValueError(f"feature_kernel: `module` must name exactly one module, {module!r} matches {list(mods)}")
    (name,) = mods
    names = _param_names(model)
    _check_names(params, names, "params")
    _check_names(lrs, names, "lrs")
    with preserved_state(model), batch_statistics_without_update(model), torch.enable_grad():
        point = {n: t.detach() for n, t in _evaluation_point(model, params).items()}
        trainable = [n for n in point if _trainable(model, n)]
        frozen = {n: t for n, t in point.items() if n not in trainable}
        buffers = dict(model.named_buffers())
        x = _model_input(loss_fn, batch)

        def feature(theta: dict[str, torch.Tensor]) -> torch.Tensor:
            with captured_outputs(mods) as feats:
                functional_call(model, {**theta, **frozen, **buffers}, (x,))
            _check_captured(mods, feats, "feature_kernel", "module")
            return feats[name].flatten()

        theta = {n: point[n] for n in trainable}
        scale = {n: lr * (lrs or {}).get(n, 1.0) for n in trainable}
        cols = []
        with math_attention():
            f0, pullback = vjp(feature, theta)
            for e in torch.eye(f0.numel(), dtype=f0.dtype, device=f0.device):
                (g,) = pullback(e)
                tangent = {n: g[n] * scale[n] for n in trainable}
                cols.append(jvp(feature, (theta,), (tangent,))[1].detach())
        matrix = torch.stack(cols, dim=1)
    matrix = 0.5 * (matrix + matrix.T)
    eig = torch.linalg.eigvalsh(matrix).flip(0)
    rms = eig.square().mean().sqrt()
    ratio = float(eig.mean() / rms) if rms > 0 else math.nan
    return FeatureKernel(matrix=matrix, eigenvalues=eig, mean_rms_ratio=ratio)


def resolve_modules(model: nn.Module, modules: ModuleSpec, *, owner: str = "lightning_align") -> dict[str, nn.Module]:
    """``{name: module}`` from names/regexes (via ``select_modules``) or a mapping, with clear errors.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU())
        >>> list(resolve_modules(net, ["0"]))
        ['0']
    """
    if isinstance(modules, Mapping):
        if not modules:
            raise ValueError(f"{owner}: the mapping of modules is empty")
        bad = [n for n, m in modules.items() if not isinstance(m, nn.Module)]
        if bad:
            raise TypeError(f"{owner}: entries {bad} are not nn.Module instances")
        return dict(modules)
    return select_modules(model, modules, "features", owner=owner)


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------
def _param_names(model: nn.Module) -> set[str]:
    return {n for n, _ in model.named_parameters()}


def _trainable(model: nn.Module, name: str) -> bool:
    return model.get_parameter(name).requires_grad


def _check_names(mapping: Mapping[str, Any] | None, names: set[str], what: str) -> None:
    if mapping is None:
        return
    unknown = sorted(set(mapping) - names)
    if unknown:
        some = ", ".join(sorted(names)[:8])
        raise ValueError(
            f"feature_speed: `{what}` names parameters the model does not have: {unknown[:5]}"
            f"{' ...' if len(unknown) > 5 else ''}. Model parameters include: {some}"
        )


def _evaluation_point(model: nn.Module, params: Mapping[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    point = dict(model.named_parameters())
    for name, value in (params or {}).items():
        if value.shape != point[name].shape:
            raise ValueError(f"feature_speed: `params[{name!r}]` has shape {tuple(value.shape)}, the parameter {tuple(point[name].shape)}")
        point[name] = value.to(point[name])
    return point


def _model_input(loss_fn: LossFn | None, batch: Any) -> Any:
    return batch if loss_fn is None else batch_inputs(batch, "feature_speed")


def _loss(outputs: Any, loss_fn: LossFn | None, batch: Any) -> torch.Tensor:
    if loss_fn is None:
        loss = outputs
    else:
        loss = loss_fn(outputs, batch_targets(batch, "feature_speed"))
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError("feature_speed: the loss must be a scalar tensor (a mean over the batch)")
    return loss.reshape(())


def _check_captured(modules: Mapping[str, nn.Module], feats: Mapping[str, torch.Tensor], owner: str, argument: str) -> None:
    missing = [n for n in modules if n not in feats]
    if missing:
        raise ValueError(
            f"{owner}({argument}=...): layers {missing} were not called by the model's forward pass on the probe batch "
            f"(never called, or a module that reads their weight directly, as nn.MultiheadAttention does with its "
            f"out_proj); remove them from `{argument}`"
        )


def _unreached(owner: str, argument: str, name: str) -> str:
    return f"{owner}({argument}=...): the output of layer {name!r} does not reach the loss on the probe batch; remove it from `{argument}`"


def _upstream_params(features: list[torch.Tensor], by_id: dict[int, str], order: Sequence[str] | None = None) -> list[list[str]]:
    """For each feature, the trainable parameters in its autograd graph, in model order (``order``: the names in
    model order; default: ``by_id``'s)."""
    order = {n: i for i, n in enumerate(by_id.values() if order is None else order)}
    out = []
    for f in features:
        leaves = (getattr(node, "variable", None) for node in graph_nodes([f]))
        found = {by_id[id(var)] for var in leaves if var is not None and id(var) in by_id}
        out.append(sorted(found, key=order.__getitem__))
    return out


@contextlib.contextmanager
def _leaf_names(model: nn.Module, found: dict[int, str]) -> Iterator[None]:
    """Inside, each forward names the parameter tensors the modules hold when they are called: ``found[id(t)] =
    name`` (under FSDP2 the gathered copies, the leaves of the autograd graph; the parameters themselves otherwise).
    The pre-hooks of ``model`` and of the outermost ``fully_shard``-ed modules scan every module (parameters
    used without calling their owner), the others their own parameters."""
    canonical = {id(p): n for n, p in model.named_parameters()}
    owners = {
        m: [(k, canonical[id(p)]) for k, p in m._parameters.items() if p is not None and id(p) in canonical]
        for m in model.modules()
    }

    def record(m: nn.Module) -> None:
        for k, name in owners.get(m, ()):
            t = m._parameters.get(k)
            if t is not None:
                found.setdefault(id(t), name)

    def root_hook(_m: nn.Module, _args: Any) -> None:
        for m in owners:
            record(m)

    handles = [m.register_forward_pre_hook(lambda m, _a: record(m)) for m, own in owners.items() if own]
    handles += [m.register_forward_pre_hook(root_hook) for m in [model, *_fsdp_roots(model)]]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _fsdp_roots(model: nn.Module) -> list[nn.Module]:
    """The outermost modules ``fully_shard`` was applied to (their pre-hook runs after the root's all-gather)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    roots: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, FSDPModule) and not any(any(c is m for c in r.modules()) for r in roots):
            roots.append(m)
    return roots


def _loss_backward(
    loss: torch.Tensor, features: list[torch.Tensor], params: Mapping[str, torch.Tensor], layout: ShardLayout | None,
) -> tuple[list[torch.Tensor | None], dict[str, torch.Tensor | None]]:
    """``dL/df`` for every feature and ``{name: ∇L}`` (this rank's slices): sharded, FSDP2's own backward (its
    reduce-scatter); otherwise ``torch.autograd.grad`` (no ``.grad`` written, no gradient-accumulation hook run)."""
    if layout is None:
        wanted = [t for t in features if t.requires_grad]
        inputs = wanted + list(params.values())
        grads = list(torch.autograd.grad(loss, inputs, allow_unused=True)) if loss.requires_grad else [None] * len(inputs)
        pulled = iter(grads[: len(wanted)])
        backs = [next(pulled) if t.requires_grad else None for t in features]
        return backs, {n: None if g is None else g.detach() for n, g in zip(params, grads[len(wanted):])}
    for t in features:
        if t.requires_grad:
            t.retain_grad()
    loss.backward()
    return [t.grad for t in features], {n: None if p.grad is None else local(p.grad).detach() for n, p in params.items()}


def _write(slices: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor], layout: ShardLayout | None, model: nn.Module) -> None:
    """Copy ``values`` into the (local slices of the) parameters; under FSDP2 free the gathered copies first, so
    the next forward gathers the new values."""
    if layout is not None:
        reshard(model)
    with torch.no_grad():
        for n, v in values.items():
            slices[n].copy_(v)


def _finite_differences(
    model: nn.Module, batch: Any, mods: Mapping[str, nn.Module], slices: Mapping[str, torch.Tensor],
    point: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], layout: ShardLayout | None,
    theta_norm: float, delta_norm: float, step: float, richardson: bool, like: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``J_i·Δθ`` for every feature by central differences of the model's forward (float64 results), and for each
    the relative change between the steps ``h`` and ``h/2`` (``nan`` without ``richardson``): ~``h²`` where the
    forward is smooth at that scale, much more where units switch (ReLU kinks) or rounding dominates."""

    def features(h: float) -> list[torch.Tensor]:
        with torch.no_grad():
            for n, d in delta.items():
                slices[n].copy_(point[n]).add_(d, alpha=h)
            if layout is not None:
                reshard(model)
            with captured_outputs(mods) as feats:
                model(batch)
            if layout is not None:
                reshard(model)
        return [feats[n].detach().double() for n in mods]

    def central(h: float) -> list[torch.Tensor]:
        plus, minus = features(h), features(-h)
        return [(a - b) / (2 * h) for a, b in zip(plus, minus)]

    if delta_norm == 0.0:
        return [torch.zeros_like(f, dtype=torch.float64) for f in like], [0.0 for _ in like]
    h = step * (theta_norm if theta_norm > 0 else 1.0) / delta_norm
    out = central(h)
    spread = [math.nan for _ in out]
    if richardson:
        half = central(h / 2)
        spread = [float((a - b).norm() / max(float(b.norm()), 1e-300)) for a, b in zip(out, half)]
        out = [(4 * b - a) / 3 for a, b in zip(out, half)]
    return out, spread


def _update(
    update: Mapping[str, torch.Tensor] | None,
    grads: Mapping[str, torch.Tensor | None],
    leaves: Mapping[str, torch.Tensor],
    trainable: list[str],
    lr: float,
    lrs: Mapping[str, float] | None,
) -> dict[str, torch.Tensor]:
    delta = {}
    for n in trainable:
        p = leaves[n]
        if update is not None:
            d = update.get(n)
            if d is not None and d.shape != p.shape:
                raise ValueError(f"feature_speed: `update[{n!r}]` has shape {tuple(d.shape)}, the parameter {tuple(p.shape)}")
            delta[n] = torch.zeros_like(p) if d is None else d.detach().to(p)
        else:
            g = grads[n]
            delta[n] = torch.zeros_like(p) if g is None else -lr * (lrs or {}).get(n, 1.0) * g.detach()
    return delta


def _feature_changes(
    features: list[torch.Tensor], leaves: list[torch.Tensor], delta: list[torch.Tensor], owner: str
) -> list[torch.Tensor]:
    """``δf_i = J_i·Δθ`` for every feature at once, on the forward graph already built.

    A double vjp: ``g(u) = Σ_i J_iᵀ u_i`` (one backward with ``create_graph``, linear in the dummy
    cotangents ``u``), then ``∂⟨g(u), Δθ⟩/∂u_i = J_i Δθ`` (one more backward). It gives what one
    forward-mode pass (``torch.func.jvp``) gives, reuses the forward of the backward pass, and avoids
    forward-mode AD's one-off set-up (0.15-0.5 s per process: TorchScript decompositions compiled at the
    first ``make_dual``).

    Raises:
        NoDoubleBackward: an op on the way from the parameters to the features has no double backward
            (:func:`~lightning_align.measure.autodiff.missing_double_backward`), or a ``@once_differentiable`` one,
            through which the second pass would silently miss terms.
    """
    cut = once_differentiable_functions(features)
    if cut:
        raise _no_double_backward(owner, ", ".join(cut))
    cotangents = [torch.zeros_like(f, requires_grad=True) for f in features]
    try:
        pulled = torch.autograd.grad(features, leaves, grad_outputs=cotangents, create_graph=True, allow_unused=True)
        pairs = [(g, d) for g, d in zip(pulled, delta) if g is not None and g.requires_grad]
        if not pairs:
            return [torch.zeros_like(f).detach() for f in features]
        inner = sum((g * d).sum() for g, d in pairs)
        changes = torch.autograd.grad(inner, cotangents, allow_unused=True)
    except (RuntimeError, NotImplementedError) as err:
        missing = missing_double_backward(err)
        if missing is None:
            raise
        raise _no_double_backward(owner, missing) from err
    return [torch.zeros_like(f).detach() if c is None else c.detach() for f, c in zip(features, changes)]


def _counted(positions: PositionMasks, name: str, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``f``, ``b`` and ``δf`` of a layer at the positions that count (a padded Hugging Face batch: padding left out)."""
    mask = positions.of(name, tensors[0])
    return [counted(t, mask) for t in tensors]


def _no_double_backward(owner: str, op: str) -> NoDoubleBackward:
    return NoDoubleBackward(
        f"{owner}: the feature changes J·Δθ differentiate a gradient, and {op} has no double backward (torch "
        f"{torch.__version__.split('+')[0]}); use finite_difference_feature_speed (central differences of the forward; "
        "the callbacks switch to it by themselves) or write that op in a twice-differentiable form.",
        op,
    )


def _speed(f: torch.Tensor, b: torch.Tensor, df: torch.Tensor, loss_decrease: float, upstream: tuple[str, ...]) -> FeatureSpeed:
    numel = f.numel()
    f_norm = float(torch.linalg.vector_norm(f))
    b_norm = float(torch.linalg.vector_norm(b))
    df_norm = float(torch.linalg.vector_norm(df))
    inner = float(torch.vdot(b.flatten(), df.flatten().to(b)))
    cos = -inner / (b_norm * df_norm) if b_norm > 0 and df_norm > 0 else math.nan
    denom = b_norm * cos * f_norm
    predicted = loss_decrease / denom if denom != 0 and math.isfinite(denom) else math.nan
    return FeatureSpeed(
        cos_angle=cos,
        speed=df_norm / f_norm if f_norm > 0 else math.nan,
        predicted_speed=predicted,
        loss_decrease=loss_decrease,
        feature_loss_decrease=-inner,
        feature_rms=f_norm / math.sqrt(numel),
        update_rms=df_norm / math.sqrt(numel),
        backward_norm=b_norm,
        numel=numel,
        upstream=upstream,
    )
