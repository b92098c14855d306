"""EffectiveLR: per-layer effective learning rates, their spread and the critical LR (Mehmeti-Göpel & Wand)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_align.arguments import Count, Name, NonNegativeInt, Patterns, PositiveFloat, Seed, argument_error
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.callbacks.checkpoint_state import read_int
from lightning_align.figures import layer_profile
from lightning_align.logging import log_figure, log_scalars, log_text, markdown_table, tag, tensorboard_writers
from lightning_align.measure.elr import (
    ScaleInvariance,
    WeightSpec,
    critical_lr,
    default_weight_modules,
    detect_scale_invariance,
    effective_lrs,
    elr_spread,
    grad_weight_ratios,
    weight_group,
)
from lightning_align.measure.scale_invariance import bias_name, module_weights, weight_of
from lightning_align.measure.modules import select_modules
from lightning_align.measure.optim import learning_rates_by_parameter
from lightning_align.measure.sharded import local, reshard
from lightning_align.measure.state import map_tensors
from lightning_align.schedules import MaxOverhead, ScheduleName


#: Per-layer ELR tags are ``elr/<layer>``; these names under ``elr/`` are not layers.
ELR_NOT_LAYER = r"(spread|log_spread_std|critical_lr|lr_over_critical|skipped_step|warmup_factor|si/.*)$"


class EffectiveLR(MeasurementCallback):
    """Per-layer effective learning rates ``‖Δw‖/‖w‖`` from the actual updates, their spread and ``η*``.

    In normalized networks, the weights feeding a BatchNorm/LayerNorm/GroupNorm are scale-invariant and
    what matters for them is the *effective* learning rate ``E_ℓ = ‖Δw_ℓ‖/‖w_ℓ‖``. At initialization deep
    BN nets have a large spread of ELRs over layers (gradient explosion in the lower layers); any
    constant LR closes it over time, but an LR above the *critical* LR ``η* = 1/sqrt(e_max·e_min)``
    (``e_ℓ = ‖g_ℓ‖/‖w_ℓ‖``) flips and widens it (Mehmeti-Göpel & Wand, ICML 2024). Scale-invariant weights
    are found once, before the first step, by scaling each weight (and its bias) on the probe batch
    with BatchNorm using batch statistics, and again at a perturbed point of the trainable parameters, so that
    a zero-initialised head, adapter or readout (outputs that depend on no weight at init) cannot make every
    weight look invariant (:func:`~lightning_align.measure.elr.detect_scale_invariance`; an info line names
    such weights, a warning those it cannot judge).

    Logged after each scheduled optimizer step (weights are copied just before it):

    - ``elr/<layer>``: ELR of each weight (for scale-invariant ones, of the group that is invariant,
      e.g. weight and bias before a LayerNorm);
    - over scale-invariant layers: ``elr/spread`` (max/min), ``elr/log_spread_std`` (std of log ELR),
      ``elr/critical_lr`` (from the step's gradients, assuming one LR for all layers) and
      ``elr/lr_over_critical`` (``sqrt(max·min)`` of ``η_ℓ e_ℓ`` with each layer's LR: above 1 the spread
      widens);
    - ``elr/skipped_step``: 1 when no weight moved (e.g. an AMP step skipped on inf gradients; no ELRs
      are logged for it), else 0;
    - once, before training: ``elr/si/<layer>`` (1 scale-invariant, 0 not) and a TensorBoard text table;
    - with ``figure_every > 0``: a TensorBoard figure of ELR vs layer index (``elr/profile``) every
      ``figure_every`` measurements (from the first that has ELRs: step 0 has none).

    The gradients are those the optimizer is about to use (AMP-unscaled, before clipping, accumulated).
    Cost: a copy of the tracked weights and a few norms per measured step; one or two probe forwards per
    weight, once. Under DDP every rank computes the same values (weights and gradients are in sync). Under
    ``ModelParallelStrategy`` (FSDP2, ``DTensor`` parameters) each rank copies only its slices and the
    norms are summed over ranks, one all-reduce per step for the gradients and one for the ELRs; the
    scale-invariance test scales (and perturbs) each rank's slices in place for a forward (and copies them back), and rank 0's
    findings are used on every rank.

    Args:
        every_n_steps: measure every this many optimizer steps (each measurement covers the one step
            before it). The default (50) is sparse enough to leave on (measured shares: README, "Speed and
            overhead"); use 1 to follow every step.
        weights: module names or regexes whose weights are tracked: each module's trainable ``weight`` and its other
            trainable parameters of two or more dimensions (default: every trainable weight of a Linear/Conv/Embedding/
            ``Conv1D`` layer or router, and every other trainable parameter of two or more dimensions, such as a stack of
            expert matrices ``(E, out, in)``, logged whole as ``elr/<module>.<parameter>``; see "Which weights" in
            ``docs/callbacks.md``).
        figure_every: draw the ELR profile figure every this many measurements (0, the default: never).
        scale_factor: factor used by the scale-invariance test.
        invariance_rtol: largest relative output change that still counts as scale-invariant.
        schedule, max_overhead, probe_size, probe_seed, name: shared by every callback; see "Arguments every callback shares" in
            ``docs/callbacks.md`` (the probe batch is used only by the scale-invariance test).

    Example::

        trainer = Trainer(callbacks=[EffectiveLR(every_n_steps=10)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.EffectiveLR
              init_args: {every_n_steps: 10}
    """

    family = "elr"
    headlines = (
        Headline("elr", "ELR spread (max/min)", r"elr/spread", bar="elr_spread"),
        Headline("elr", "critical LR", r"elr/critical_lr"),
        Headline("elr", "lr / critical LR", r"elr/lr_over_critical"),
    )
    charts = {
        "effective LR per layer": ["Multiline", [rf"^elr/(?!{ELR_NOT_LAYER})"]],
        "ELR spread (max/min)": ["Multiline", [r"^elr/spread$"]],
        "critical LR": ["Multiline", [r"^elr/critical_lr$"]],
        "lr / critical LR": ["Multiline", [r"^elr/lr_over_critical$"]],
    }
    heatmaps = {"elr/": "effective LR ‖Δw‖/‖w‖"}

    def heatmap_layer(self, tag: str, prefix: str) -> str | None:
        layer = super().heatmap_layer(tag, prefix)
        return None if layer is None or re.match(ELR_NOT_LAYER, layer) else layer
    measure_in_probe_context = False  # measurements only read weights; the probe is used once, in prepare()
    sharded_refusal = None  # FSDP2: norms from local slices, summed over ranks (see the class docstring)

    def __init__(
        self,
        every_n_steps: Count = 50,
        weights: Patterns | None = None,
        *,
        figure_every: NonNegativeInt = 0,
        scale_factor: PositiveFloat = 2.0,
        invariance_rtol: PositiveFloat = 1e-3,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        name: Name | None = None,
    ) -> None:
        # Batch statistics: scale invariance is a property of the train-mode function (see the test).
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode="train", name=name
        )
        check_invariance_test_args(self, scale_factor)
        self.weights = weights
        self.figure_every = figure_every
        self.scale_factor = scale_factor
        self.invariance_rtol = invariance_rtol
        self._modules: dict[str, WeightSpec] = {}
        self._sharded_params: dict[str, dict[str, torch.Tensor]] = {}
        self.invariance: dict[str, ScaleInvariance] | None = None
        self._before: dict[str, list[torch.Tensor]] | None = None
        self._ratios: dict[str, float] = {}
        self._lrs: dict[str, float] = {}
        self.num_measurements = 0  # measurements that logged ELRs (they set the figure cadence)

    # ----------------------------------------------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._modules = tracked_modules(pl_module, self.weights, "EffectiveLR(weights=...)")
        self._sharded_params = sharded_parameters(self._modules) if self.shard_layout is not None else {}
        self.invariance = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        log_scalars(trainer, self._detect(trainer, pl_module, batch))

    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.invariance is None:
            return
        groups = self._groups()
        self._before = {name: [local(t).detach().clone() for t in ts] for name, ts in groups.items()}
        si = {n: ts for n, ts in groups.items() if self.invariance[n].scale_invariant}
        grads = {n: [t.grad for t in ts] for n, ts in si.items()}
        scale = grad_scale(trainer, trainer.optimizers[0]) if trainer.optimizers else 1.0
        ratios = grad_weight_ratios(si, grads, sum_over_ranks=self._sum_over_ranks)
        self._ratios = {k: v / scale for k, v in ratios.items()}
        self._lrs = layer_lrs(trainer.optimizers, si)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        metrics: dict[str, float] = {}
        before, self._before = self._before, None
        if before is None:  # step 0, or a step whose weights were not copied
            return metrics
        after = {name: [local(t).detach() for t in ts] for name, ts in self._groups().items()}
        elrs = effective_lrs(before, after, sum_over_ranks=self._sum_over_ranks)
        skipped = all(v == 0 for v in elrs.values())
        metrics["elr/skipped_step"] = float(skipped)
        if skipped:
            return metrics
        metrics.update({tag("elr", name): v for name, v in elrs.items()})
        si_elrs = {n: v for n, v in elrs.items() if self.invariance[n].scale_invariant}
        if si_elrs:
            spread = elr_spread(si_elrs)
            metrics["elr/spread"] = spread.ratio
            metrics["elr/log_spread_std"] = spread.log_std
            metrics["elr/critical_lr"] = critical_lr(self._ratios)
            factor = critical_lr(self._ratios, self._lrs) if self._lrs.keys() >= self._ratios.keys() else math.nan
            metrics["elr/lr_over_critical"] = 1.0 / factor if factor > 0 else (math.inf if factor == 0 else math.nan)
        if self.figure_every and self.num_measurements % self.figure_every == 0:
            self._figure(trainer, elrs)
        self.num_measurements += 1
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"num_measurements": self.num_measurements}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.num_measurements = read_int(self, state, "num_measurements", 0)

    # ----------------------------------------------------------------------------------------------
    @property
    def _sum_over_ranks(self) -> Any:
        return None if self.shard_layout is None else self.shard_layout.all_reduce

    def _groups(self) -> dict[str, list[torch.Tensor]]:
        assert self.invariance is not None
        return {n: tracked_group(self._modules[n], self.invariance[n], self._sharded_params.get(n)) for n in self._modules}

    def _detect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, float]:
        model = self.probe_outputs_model(pl_module)
        try:
            self.invariance = detect_scale_invariance(
                model, batch, self._modules, factor=self.scale_factor, rtol=self.invariance_rtol
            )
        except ValueError:
            if outputs_finite(model, batch):
                raise
            rank_zero_warn(
                "EffectiveLR: the probe batch gives non-finite outputs (NaN/Inf), so scale invariance cannot be "
                "tested: every tracked weight counts as not scale-invariant (elr/<layer> is logged, elr/spread and "
                "elr/critical_lr are not). Check the data and the model's initialization."
            )
            self.invariance = {n: ScaleInvariance((weight_of(s)[1],), False, math.nan) for n, s in self._modules.items()}
        else:
            report_invariance("EffectiveLR", type(pl_module).__name__, self.invariance)
        if self.shard_layout is not None:  # the same findings on every rank (computed alike; made sure of here)
            self.invariance = trainer.strategy.broadcast(self.invariance, src=0)
        rows = [[n, "yes" if r.scale_invariant else "no", "+".join(r.params), f"{r.relative_change:.1e}"]
                for n, r in self.invariance.items()]
        log_text(trainer, "elr/scale_invariant", markdown_table(["layer", "scale-invariant", "weight", "output change"], rows))
        count = sum(r.scale_invariant for r in self.invariance.values())
        rank_zero_info(
            f"EffectiveLR: {count} of {len(self.invariance)} tracked weights of {type(pl_module).__name__} are "
            "scale-invariant" + ("" if count else "; elr/spread and elr/critical_lr will not be logged")
        )
        return {tag("elr", "si", n): float(r.scale_invariant) for n, r in self.invariance.items()}

    def _figure(self, trainer: pl.Trainer, elrs: Mapping[str, float]) -> None:
        if not tensorboard_writers(trainer):
            return
        assert self.invariance is not None
        names = list(elrs)
        invariant = [n for n in names if self.invariance[n].scale_invariant]
        curves = {"scale-invariant": [elrs[n] if n in invariant else math.nan for n in names]}
        if len(invariant) < len(names):
            curves["other (plain ‖Δw‖/‖w‖)"] = [math.nan if n in invariant else elrs[n] for n in names]
        fig = layer_profile(names, curves, ylabel="effective LR ‖Δw‖/‖w‖ per step", title=f"effective learning rates, step {trainer.global_step}")
        log_figure(trainer, "elr/profile", fig)


# --------------------------------------------------------------------------------------------------
# Helpers shared with ELRWarmup
# --------------------------------------------------------------------------------------------------
def outputs_finite(model: nn.Module, batch: Any) -> bool:
    """Whether every floating output of ``model`` on ``batch`` is finite (no NaN/Inf)."""
    finite: list[bool] = []
    with torch.no_grad():
        map_tensors(model(batch), lambda t: finite.append(not t.is_floating_point() or bool(torch.isfinite(t).all())) or t)
    reshard(model)  # FSDP2: no gathered parameters left behind by this forward
    return all(finite)


def report_invariance(owner: str, model_name: str, found: Mapping[str, ScaleInvariance]) -> None:
    """Say which weights looked scale-invariant on the probe batch only (info) and which could not be tested (warning)."""
    hidden = [n for n, r in found.items() if r.hidden]
    if hidden:
        rank_zero_info(
            f"{owner}: {', '.join(hidden)} of {model_name} leave the probe outputs unchanged when scaled only because "
            "the outputs (nearly) do not depend on them at init (a zero or tiny head, adapter, readout or gate after "
            "them, or a zero weight); scaled again with the trainable parameters perturbed they change the outputs, so "
            "they count as not scale-invariant."
        )
    unknown = [n for n, r in found.items() if math.isnan(r.relative_change)]
    if unknown:
        rank_zero_warn(
            f"{owner}: cannot tell whether {', '.join(unknown)} of {model_name} are scale-invariant: the probe outputs "
            "change neither when these weights are scaled nor when every trainable parameter is perturbed, so they "
            "count as not scale-invariant (no elr/spread, elr/critical_lr or warm-up from them). Check that the "
            "model's outputs depend on its trainable parameters (requires_grad) on the probe batch."
        )


def sharded_parameters(modules: Mapping[str, WeightSpec]) -> dict[str, dict[str, torch.Tensor]]:
    """Each tracked weight and its bias as the sharded (``DTensor``) parameters the optimizer holds.

    Read at fit start, when every parameter is its slice: FSDP2 swaps a module's attributes for the gathered
    tensors during a forward pass (and keeps the root module's gathered after a forward without backward),
    so ``module.weight`` read later could be the whole tensor on every rank.
    """
    found = {}
    for n, spec in modules.items():
        module, attr = weight_of(spec)
        found[n] = {k: t for k in (attr, bias_name(attr)) if isinstance(t := getattr(module, k, None), torch.Tensor)}
    return found


def tracked_group(
    module: WeightSpec, result: ScaleInvariance, sharded: Mapping[str, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """The tensors of a tracked weight (:func:`~lightning_align.measure.elr.weight_group`); under FSDP2 the
    sharded parameters recorded by :func:`sharded_parameters`."""
    if sharded is None:
        return weight_group(module, result)
    return [sharded[k] for k in result.params]


def check_invariance_test_args(owner: Any, scale_factor: float) -> None:
    """The scale-invariance test needs a scale that changes the weights (shared by EffectiveLR and ELRWarmup; the
    ranges of its arguments are in their annotations)."""
    if scale_factor == 1:
        raise argument_error(
            owner, "scale_factor", scale_factor, "a float > 0 other than 1", detail=" (1 leaves the weights as they are)"
        )


def tracked_modules(model: nn.Module, patterns: list[str] | None, owner: str) -> dict[str, WeightSpec]:
    """The weights tracked: those of the named modules (each must hold a trainable ``weight`` or a trainable parameter
    of two or more dimensions, such as a stack of expert matrices) or the default ones (:func:`default_weight_modules`)."""
    if patterns is None:
        chosen = default_weight_modules(model)
        if not chosen:
            raise ValueError(
                f"{owner}: {type(model).__name__} has no trainable weight (of a Linear/Conv/Embedding layer, or a parameter "
                "of two or more dimensions)"
            )
        return chosen
    tracked: dict[str, WeightSpec] = {}
    bad = []
    for name, module in select_modules(model, patterns, "weights", owner=owner).items():
        found = module_weights(name, module)
        tracked.update(found)
        bad += [] if found else [name]
    if bad:
        raise ValueError(
            f"{owner}: modules {bad} of {type(model).__name__} have no trainable `weight` parameter (nor a trainable "
            "parameter of two or more dimensions, such as a stack of expert matrices); name modules that hold one"
        )
    return tracked


def layer_lrs(optimizers: list[torch.optim.Optimizer], groups: Mapping[str, list[torch.Tensor]]) -> dict[str, float]:
    """Layer -> learning rate of the optimizer param group holding its weight (layers not found are left out)."""
    lr_of = learning_rates_by_parameter(optimizers)
    return {n: lr_of[id(ts[0])] for n, ts in groups.items() if id(ts[0]) in lr_of}


def grad_scale(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> float:
    """The AMP loss scale still in ``.grad`` at ``on_before_optimizer_step`` (fused optimizers unscale in ``step``)."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    if scaler is None:
        return 1.0
    from lightning.fabric.plugins.precision.amp import _optimizer_handles_unscaling

    return float(scaler.get_scale()) if _optimizer_handles_unscaling(optimizer) else 1.0
