"""FeatureAlignment: backward-feature angle and feature speed per layer during training (Chizat & Netrapalli).

Chizat & Netrapalli, "The Feature Speed Formula" (NeurIPS 2024): after one optimizer step, a layer output
``f`` moves by ``‖δf‖ = ΔL_{≤ℓ} / (‖b‖ cos θ)``, where ``b = dL/df`` is the backward pass, ``ΔL_{≤ℓ}``
the loss decrease due to the parameters up to that layer and ``θ`` the angle between ``−b`` and ``δf``.
When ``cos θ`` collapses (deep ReLU MLPs, ResNets with branch scale 1) features cannot move at a
reasonable learning rate; ``1/√depth`` residual branches keep it. See
:mod:`lightning_align.measure.alignment` for the math.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
import torch
from torch import nn

from lightning_align.arguments import Count, Name, NonNegativeInt, Patterns, Seed
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.callbacks.checkpoint_state import read_int
from lightning_align.figures import layer_profile
from lightning_align.logging import log_figure, tag, tensorboard_writers
from lightning_align.measure.alignment import FD_SPREAD_LIMIT, FeatureSpeedResults, feature_speed, finite_difference_feature_speed
from lightning_align.measure.autodiff import NoDoubleBackward
from lightning_align.measure.census import take_census
from lightning_align.measure.modules import captured_outputs, layers_on_probe, select_modules
from lightning_align.measure.optim import learning_rates_by_parameter
from lightning_align.measure.sharded import ShardLayout, local, reshard
from lightning_align.schedules import MaxOverhead, ScheduleName

PREFIX = "module."  # parameter names of ProbeLoss / ProbeOutputs carry it


def snapshot_trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (the weights before an optimizer step); of this rank's
    slices only when they are sharded (FSDP2)."""
    return {n: local(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def real_update(model: nn.Module, before: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(Δθ, θ_before)`` keyed by ``ProbeLoss`` parameter names (prefix ``module.``); this rank's slices when
    the parameters are sharded."""
    params = dict(model.named_parameters())
    update = {PREFIX + n: local(params[n]).detach() - b for n, b in before.items()}
    point = {PREFIX + n: b for n, b in before.items()}
    return update, point


def optimizer_lrs(trainer: pl.Trainer, model: nn.Module) -> dict[str, float]:
    """``{ProbeLoss parameter name: lr of its optimizer group}``; 0 for parameters no optimizer holds."""
    by_id = learning_rates_by_parameter(trainer.optimizers)
    return {PREFIX + n: by_id.get(id(p), 0.0) for n, p in model.named_parameters()}


@dataclass
class SpeedRoute:
    """How one callback gets ``J·Δθ`` on unsharded parameters: exactly (a double vjp) until an op without a double
    backward shows (``missing``), then by finite differences of the forward; each said once."""

    missing: str | None = None
    warned_rough: bool = False


def measure_speeds(
    loss_model: nn.Module, batch: Any, layers: Mapping[str, nn.Module], layout: ShardLayout | None,
    route: SpeedRoute | None = None, **kwargs: Any,
) -> FeatureSpeedResults:
    """:func:`feature_speed` (``loss_model(batch)`` is the loss), or under FSDP2 (``layout``) its finite-difference
    form through the model's own passes (``update``/``params``: this rank's slices). With a ``route``, a model whose
    ``J·Δθ`` has no double backward gets the finite-difference form too, with one warning naming the op (instead of
    the error). ``owner`` (a keyword: the callback's name) is named with its ``layers`` argument in errors."""
    if layout is not None:
        return finite_difference_feature_speed(loss_model, batch, layers, layout, argument="layers", **kwargs)
    owner = kwargs.get("owner", "feature_speed")
    if route is None or route.missing is None:
        try:
            return feature_speed(loss_model, None, batch, layers, argument="layers", **kwargs)
        except NoDoubleBackward as err:
            if route is None:
                raise
            route.missing = err.op
            rank_zero_warn(
                f"{owner}: the feature changes J·Δθ differentiate a gradient, and {err.op} has no double backward (torch "
                f"{torch.__version__.split('+')[0]}), so they are central finite differences of the forward from now on "
                f"(4 forwards at θ ± h·Δθ, Richardson-extrapolated; a layer whose J·Δθ moves by more than {FD_SPREAD_LIMIT:g} "
                "when the step is halved is logged as NaN). Write that op in a twice-differentiable form for exact values."
            )
    res = finite_difference_feature_speed(loss_model, batch, layers, None, argument="layers", warn=False, **kwargs)
    if res.rough and not route.warned_rough:
        route.warned_rough = True
        rank_zero_warn(
            f"{owner}: the finite-difference J·Δθ (no double backward through {route.missing}) changes by more than "
            f"{FD_SPREAD_LIMIT:g} relative when its step is halved at {', '.join(res.rough)}: the features are not smooth "
            "at that scale (e.g. ReLU units switching), so their cos, speed and predicted speed are NaN (this is said "
            f"once). Write {route.missing} in a twice-differentiable form, or use smooth activations, to measure them."
        )
    return res


def feature_layers_on_probe(
    pl_module: nn.Module, loss_model: nn.Module, batch: Any, patterns: list[str] | None, chosen: Mapping[str, nn.Module],
    owner: str, layout: ShardLayout | None,
) -> dict[str, nn.Module]:
    """The layers whose features a loss-probing callback measures: the named ones (each must run on the probe), or
    the default ``"features"`` layers that run on the probe and whose outputs reach the loss (one forward watched,
    then one forward and backward; the others named in one info line)."""
    census, _ = take_census(pl_module, lambda: loss_model(batch))
    reshard(pl_module)  # FSDP2: no gathered parameters left behind by this forward (the next one writes the slices)
    layers = layers_on_probe(pl_module, census, patterns, chosen, "features", owner=owner)
    if patterns is not None or layout is not None:  # FSDP2: no backward outside the training step
        return layers
    with captured_outputs(layers) as feats:
        loss = loss_model(batch)
    names = [n for n in layers if n in feats and feats[n].requires_grad]
    grads = torch.autograd.grad(loss, [feats[n] for n in names], allow_unused=True) if names and loss.requires_grad else ()
    reached = {n for n, g in zip(names, grads) if g is not None}
    dropped = [n for n in layers if n not in reached]
    if dropped:
        rank_zero_info(f"{owner}: the outputs of layers {dropped} do not reach the loss on the probe batch; they are not measured")
    return {n: m for n, m in layers.items() if n in reached}


class FeatureAlignment(MeasurementCallback):
    """Backward-feature angle, feature speed and the feature speed formula's prediction per layer.

    After each scheduled optimizer step the callback takes the optimizer's **real** update
    ``Δθ = θ_after − θ_before`` (SGD, momentum, Adam, weight decay included: the weights are copied just
    before the step) and evaluates, at ``θ_before`` on the fixed probe batch, for every selected layer
    output ``f``: the first-order feature change ``δf = J·Δθ`` (for all layers at once), ``b = dL/df``, and

    - ``align/cos/<layer>``: ``cos θ = ⟨−b, δf⟩/(‖b‖‖δf‖)`` (1: the update moves ``f`` straight down the loss);
    - ``align/speed/<layer>``: ``‖δf‖_rms/‖f‖_rms``, the relative feature speed of that step;
    - ``align/predicted_speed/<layer>``: ``ΔL_{≤ℓ}/(‖b‖ cos θ)/‖f‖`` from the parameters' loss decrease
      (equal to ``speed`` when the layer output is a cut of the network: sequential layers, residual-stream
      outputs such as ``blocks.i``; not for the output of a residual *branch*);
    - ``align/loss_decrease``: the first-order loss decrease of the step on the probe;
    - with ``figure_every > 0``: a TensorBoard figure ``align/cos_vs_depth`` every ``figure_every`` measurements
      (from the first; a matplotlib figure costs more than the measurement, so figures are off by default).

    At step 0 (before training) there is no update yet: the step measured is the gradient step
    ``Δθ = −lr·∇L`` with each parameter's optimizer-group learning rate (for Adam this is not the first
    real step, so compare ``speed`` at step 0 with care; ``cos`` is the paper's alignment at init).
    A step the optimizer skipped (``Δθ = 0``) logs NaN angles.

    Cost per measurement: one copy of the trainable weights before the step, then one forward and three
    backward passes on the probe batch (the gradient, and ``J·Δθ`` for all layers by a double vjp). Every
    rank measures the whole probe under DDP.

    Under ``ModelParallelStrategy`` (FSDP2, parameters sharded) every rank measures the whole probe too (rank
    0's), through the model's own passes: one forward and one backward (``f``, ``b``, the gradient), then
    ``J·Δθ`` for all layers by central differences over 4 forwards at ``θ ± h·Δθ`` and ``θ ± h·Δθ/2``
    (Richardson-extrapolated, the perturbation 0.1% of ``‖θ‖``; the slices are written in place and copied
    back bit-exactly): values agree with one process's exact ones to ~1e-5 relative in float32 for smooth
    activations, ~1e-4 with ReLU (``predicted_speed``: up to 5e-4), and are identical on every rank; the copy of
    the weights is of each rank's slice.
    See :func:`~lightning_align.measure.alignment.finite_difference_feature_speed`.

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0). The default (1000) is sparse
            enough to leave on (measured shares: README, "Speed and overhead").
        layers: module names or regexes whose outputs are the features (default: every Linear/Conv/``Conv1D`` layer,
            attention block and module holding a stack of expert matrices that runs on the probe batch and whose
            output reaches the loss; see "Which layers" in ``docs/callbacks.md``).
        figure_every: draw the cos-vs-depth figure every this many measurements (0, the default: never).
        schedule, max_overhead, probe_size, probe_seed, bn_mode, name: shared by every callback; see "Arguments every callback
            shares" in ``docs/callbacks.md``.

    Raises:
        ValueError: at fit start, for a module name or pattern that matches nothing (naming it).

    Example::

        trainer = Trainer(callbacks=[FeatureAlignment(every_n_steps=50, layers=[r"layers\\.\\d+", "readout"])])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.FeatureAlignment
              init_args: {every_n_steps: 50, layers: ["blocks\\\\.\\\\d+", readout]}
    """

    family = "align"
    sharded_refusal = None
    needs_loss = True
    headlines = (
        Headline("align", "min cos over layers", r"align/cos/.+", "min", bar="min_cos"),
        Headline("align", "mean feature speed", r"align/speed/.+", "mean"),
    )
    charts = {
        "cos(-dL/df, δf) per layer": ["Multiline", [r"^align/cos/"]],
        "feature speed per layer": ["Multiline", [r"^align/speed/"]],
        "predicted feature speed per layer": ["Multiline", [r"^align/predicted_speed/"]],
    }
    heatmaps = {"align/cos/": "cos θ (backward-feature alignment)", "align/speed/": "relative feature speed ‖δf‖/‖f‖"}

    def __init__(
        self,
        every_n_steps: Count = 1000,
        layers: Patterns | None = None,
        *,
        figure_every: NonNegativeInt = 0,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "train",
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, name=name
        )
        self.layers = layers
        self.figure_every = figure_every
        self.num_measurements = 0
        self._layers: dict[str, nn.Module] = {}
        self._before: dict[str, torch.Tensor] | None = None
        self._first_cos: dict[str, float] = {}
        self._route = SpeedRoute()

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = select_modules(pl_module, self.layers, "features", owner="FeatureAlignment(layers=...)")

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        loss_model = self.probe_loss_model(pl_module)
        self._layers = feature_layers_on_probe(pl_module, loss_model, batch, self.layers, self._layers, "FeatureAlignment", self.shard_layout)

    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = snapshot_trainable(pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        if not self._layers:
            self.validate(trainer, pl_module)
        if trainer.global_step > 0 and self._before is None:
            rank_zero_warn(
                f"FeatureAlignment: no copy of the weights from just before step {trainer.global_step} (the run resumed "
                "at this step without this callback's state), so the update is unknown: nothing measured at this step."
            )
            return {}
        results = self.speeds(trainer, pl_module, batch)
        metrics: dict[str, float] = {"align/loss_decrease": results.loss_decrease}
        for name, r in results.items():
            metrics[tag("align", "cos", name)] = r.cos_angle
            metrics[tag("align", "speed", name)] = r.speed
            metrics[tag("align", "predicted_speed", name)] = r.predicted_speed
        if trainer.global_step == 0:
            self._first_cos = {n: r.cos_angle for n, r in results.items()}
        if self.figure_every and self.num_measurements % self.figure_every == 0:
            self._figure(trainer, results)
        self.num_measurements += 1
        return metrics

    def speeds(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> FeatureSpeedResults:
        """Feature speeds of the step just taken (or of the gradient step before training)."""
        loss_model = self.probe_loss_model(pl_module)
        if self._before is not None and trainer.global_step > 0:
            update, point = real_update(pl_module, self._before)
            self._before = None
            return measure_speeds(loss_model, batch, self._layers, self.shard_layout, self._route, update=update, params=point,
                                  owner="FeatureAlignment")
        self._before = None
        lrs = optimizer_lrs(trainer, pl_module)
        return measure_speeds(loss_model, batch, self._layers, self.shard_layout, self._route, lr=1.0, lrs=lrs,
                              owner="FeatureAlignment")

    def extra_state(self) -> dict[str, Any]:
        return {"num_measurements": self.num_measurements}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_measurements = read_int(self, state, "num_measurements", 0)

    def _figure(self, trainer: pl.Trainer, results: FeatureSpeedResults) -> None:
        if not tensorboard_writers(trainer):
            return
        names = list(results)
        curves = {f"step {trainer.global_step}": [results[n].cos_angle for n in names]}
        if self._first_cos and list(self._first_cos) == names and trainer.global_step > 0:
            curves = {"step 0": list(self._first_cos.values()), **curves}
        ylabel, title = "cos θ (1: features move down the loss)", "backward-feature alignment per layer"
        log_figure(trainer, "align/cos_vs_depth", lambda: layer_profile(names, curves, ylabel=ylabel, title=title))
