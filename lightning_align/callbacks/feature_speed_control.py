"""FeatureSpeedControl: per-layer learning rates set from target feature speeds (Chizat & Netrapalli).

The feature speed formula ``‖δf_ℓ‖ = ΔL_{≤ℓ} / (‖b_ℓ‖ cos θ_ℓ)`` turns a wanted relative feature speed
``s_ℓ = ‖δf_ℓ‖/‖f_ℓ‖`` into a wanted cumulative loss decrease ``C_ℓ = s_ℓ ‖f_ℓ‖ ‖b_ℓ‖ cos θ_ℓ`` (Chizat &
Netrapalli 2024, "automatically adjust HPs throughout training"). The loss decrease is linear in the
per-layer learning-rate multipliers, ``ΔL_{≤ℓ} = Σ_{k≤ℓ} m_k d_k`` (``d_k``: decrease due to layer ``k``'s
parameters per unit multiplier), so layer by layer ``m_ℓ = (C_ℓ − Σ_{k<ℓ} m_k d_k) / d_ℓ``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from typing_extensions import override

from lightning_align.arguments import Bound, Count, Name, NonEmpty, Patterns, PositiveFloat, Seed
from lightning_align.callbacks.alignment import (
    PREFIX,
    SpeedRoute,
    feature_layers_on_probe,
    measure_speeds,
    real_update,
    snapshot_trainable,
)
from lightning_align.measure.modules import select_modules
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.callbacks.checkpoint_state import PROBE_SETTINGS, describe, refusal
from lightning_align.logging import tag
from lightning_align.measure.alignment import FeatureSpeedResults
from lightning_align.measure.optim import follow_split, split_param_groups
from lightning_align.schedules import ScheduleName


class FeatureSpeedControl(MeasurementCallback):
    """Set per-layer learning rates so that each layer's features move at a target relative speed.

    **When to use it.** To get a chosen amount of feature learning per layer without tuning per-layer
    learning rates by hand: e.g. to keep every hidden layer moving at the same relative speed in a deep
    or wide network, to compare architectures at equal feature speed, or to probe what a parametrization
    (μP, depth-μP) would give. It needs layer outputs that are *cuts* of the network (sequential layers;
    for ResNets the residual stream, e.g. ``layers=["embed", r"blocks\\.\\d+"]``, not branch outputs), and
    a layer whose backward-feature angle ``cos θ`` collapses (deep ReLU MLPs at init) needs very large
    multipliers: ``max_multiplier`` caps them.

    **What it does.** At fit start each optimizer parameter group is split into per-layer groups: layer
    ``ℓ`` owns the parameters that first influence its output (those upstream of it and of no earlier
    selected layer); the others form a group left alone. Every other hyper-parameter of the original group
    is kept, LR schedulers' per-group lists (``base_lrs``, ...) and ``initial_lr`` follow. Each step, each
    layer's learning rate is the *scheduled* learning rate times the layer's multiplier ``m_ℓ``: it is
    scaled just before ``optimizer.step()`` and put back right after, so schedulers keep working on the
    scheduled values (global optimizer-step hooks, which torch runs around each optimizer's own hooks: the
    multipliers compose exactly with :class:`ELRWarmup`'s factor in either callback order). Every
    ``every_n_steps`` steps, the last real update (whatever the optimizer) is measured on the probe batch
    with :func:`~lightning_align.measure.feature_speed`, and
    ``m_ℓ = (C_ℓ − Σ_{k<ℓ} m_k d_k) / d_ℓ``, ``C_ℓ = s_ℓ‖f_ℓ‖‖b_ℓ‖cos θ_ℓ`` (see the module docstring),
    clipped to ``[min_multiplier, max_multiplier]`` and smoothed geometrically:
    ``m ← m_old^smoothing · m_new^(1−smoothing)``. A layer whose decrease per unit multiplier ``d_ℓ`` or
    ``cos θ_ℓ`` is not positive keeps its multiplier. Multipliers start at 1 and change first after the
    first scheduled step (the update of step 0 is not known before it is taken).

    Logged: ``align/control_multiplier/<layer>``, ``align/control_lr/<layer>`` (scheduled lr × multiplier),
    ``align/control_speed/<layer>`` (measured speed of the step just taken) and ``align/control_cos/<layer>``.

    Cost per control step: a copy of the trainable weights, then one forward and three backward passes on
    the probe batch (as :class:`FeatureAlignment`). Under ``ModelParallelStrategy`` (FSDP2) the speeds come from
    :class:`FeatureAlignment`'s finite-difference measurement (5 forwards and one backward; values identical on
    every rank, so every rank takes the same learning-rate decisions, within ~1e-4 of one process's).

    Args:
        target_speed: wanted ``‖δf‖_rms/‖f‖_rms`` per step: one value for every layer, or one per selected
            layer (in model order).
        every_n_steps: update the multipliers every this many optimizer steps.
        layers: module names or regexes whose outputs are the controlled features, each of which must run on the probe
            batch (default: every Linear/Conv/``Conv1D`` layer, attention block and mixture-of-experts block that runs on
            the probe batch and whose output reaches the loss, as :class:`FeatureAlignment`'s; see "Which layers" in
            ``docs/callbacks.md``). The layers controlled are saved with the plan in checkpoints.
        min_multiplier, max_multiplier: clipping range of the multipliers (relative to the scheduled lr).
        smoothing: in ``[0, 1)``: weight of the old multiplier (geometric EMA). 0 applies the formula's value
            at once, which can oscillate in deep layers (their ``cos θ`` changes with the multipliers of the
            layers below); 0.5 reaches the targets within a few control steps on the example MLPs.
        schedule, probe_size, probe_seed, bn_mode, name: shared by every callback; see "Arguments every callback
            shares" in ``docs/callbacks.md``.

    Example::

        trainer = Trainer(callbacks=[FeatureSpeedControl(target_speed=0.05, every_n_steps=10)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.FeatureSpeedControl
              init_args: {target_speed: 0.05, every_n_steps: 10, layers: ["layers\\\\.\\\\d+", readout]}
    """

    family = "align"
    acts_on_training = True
    sharded_refusal = None
    needs_loss = True
    charts = {
        "controlled LR per layer": ["Multiline", [r"^align/control_lr/"]],
        "controlled feature speed per layer": ["Multiline", [r"^align/control_speed/"]],
    }
    state_settings = (*PROBE_SETTINGS, "layers", "min_multiplier", "max_multiplier")  # the plan's and multipliers'

    def __init__(
        self,
        target_speed: PositiveFloat | Annotated[list[PositiveFloat], NonEmpty()],
        every_n_steps: Count = 10,
        layers: Patterns | None = None,
        *,
        min_multiplier: Annotated[float, Bound(0, 1, low_open=True)] = 0.01,
        max_multiplier: Annotated[float, Bound(1)] = 100.0,
        smoothing: Annotated[float, Bound(0, 1, high_open=True)] = 0.5,
        schedule: ScheduleName = "linear",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "train",
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, name=name
        )
        targets = list(target_speed) if isinstance(target_speed, (list, tuple)) else [target_speed]
        self.target_speed = target_speed
        self.layers = layers
        self.min_multiplier = min_multiplier
        self.max_multiplier = max_multiplier
        self.smoothing = smoothing
        self._targets = [float(t) for t in targets]
        self._layers: dict[str, nn.Module] = {}
        self.plan: list[list[str]] | None = None  # parameter names owned by each layer
        self.multipliers: list[float] = []
        self._group_layer: dict[int, list[int | None]] = {}  # id(optimizer) -> layer index of each group
        self._saved_lrs: dict[int, list[float]] = {}
        self._optimizers: dict[int, torch.optim.Optimizer] = {}  # id(optimizer) -> the optimizer controlled
        self._handles: list[Any] = []
        self._before: dict[str, torch.Tensor] | None = None
        self._plan_layers: list[str] | None = None  # the layers of a restored plan
        self._route = SpeedRoute()

    # ----------------------------------------------------------------------------------------------
    # Setup: layers, the per-layer plan, optimizer groups
    # ----------------------------------------------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._layers = select_modules(pl_module, self.layers, "features", owner="FeatureSpeedControl(layers=...)")
        if self.layers is not None:  # the default layers are known once the probe forward is watched (prepare)
            self._check_targets()
        if not trainer.optimizers:
            raise ValueError("FeatureSpeedControl: the LightningModule configures no optimizer; there is no learning rate to set")

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._group_layer = {}
        if self.plan is not None:  # resumed: split now, before Lightning restores the optimizer state
            self._check_plan(pl_module)
            self._split_groups(trainer, pl_module)

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self._group_layer and self.plan is not None:
            # resumed under a strategy that restores the checkpoint after on_fit_start (ModelParallelStrategy):
            # the optimizer state is in already (per parameter, so it survives the split); keep the multipliers
            self._check_plan(pl_module)
            self._split_groups(trainer, pl_module)
        if not self._group_layer:  # a fresh fit: the layers that run, which parameters move which, one group per layer
            loss_model = self.probe_loss_model(pl_module)
            self._layers = feature_layers_on_probe(
                pl_module, loss_model, batch, self.layers, self._layers, "FeatureSpeedControl", self.shard_layout
            )
            res = measure_speeds(loss_model, batch, self._layers, self.shard_layout, self._route, lr=0.0,
                                 owner="FeatureSpeedControl")
            self.plan = self._plan(res)
            self._check_targets()
            self.multipliers = [1.0] * len(self.plan)
            self._split_groups(trainer, pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._remove_hooks()

    def _plan(self, res: FeatureSpeedResults) -> list[list[str]]:
        """The parameters each layer owns; a default layer that owns none (its output is that of a layer inside it, as
        an attention block's is its output projection's) is left out with an info line, a named one refused."""
        owned = _ownership(res)
        empty = [name for name, mine in zip(res, owned) if not mine]
        if empty and self.layers is not None:
            raise ValueError(
                f"FeatureSpeedControl(layers=...): layer {empty[0]!r} has no parameters of its own (all its upstream "
                "parameters belong to earlier layers), so its speed cannot be set; remove it from `layers`"
            )
        if empty:
            rank_zero_info(
                f"FeatureSpeedControl: the default layers {empty} have no parameters of their own (every parameter upstream "
                "of them is upstream of an earlier layer, e.g. a block whose output is its last layer's), so their speed "
                "cannot be set apart; they are not controlled."
            )
            self._layers = {n: m for n, m in self._layers.items() if n not in empty}
        return [mine for mine in owned if mine]

    def _check_targets(self) -> None:
        if len(self._targets) not in (1, len(self._layers)):
            default = " (the default layers that run on the probe batch and reach the loss)" if self.layers is None else ""
            raise ValueError(
                f"FeatureSpeedControl(target_speed=...): {len(self._targets)} targets for {len(self._layers)} layers "
                f"{list(self._layers)}{default}; give one value or one per layer"
            )

    def _check_plan(self, pl_module: nn.Module) -> None:
        if self._plan_layers is not None:  # the layers the plan was made for (the defaults: narrowed on the probe)
            modules = dict(pl_module.named_modules())
            unknown = [n for n in self._plan_layers if n not in modules]
            if unknown:
                raise ValueError(
                    f"FeatureSpeedControl: the checkpoint controls layers {unknown} that this model does not have; "
                    "resume with the model of the checkpoint, or start a new fit."
                )
            self._layers = {n: modules[n] for n in self._plan_layers}
        names = {n for n, _ in pl_module.named_parameters()}
        missing = sorted({n for group in self.plan or [] for n in group} - names)
        if missing or len(self.plan or []) != len(self._layers):
            raise ValueError(
                f"FeatureSpeedControl: the restored per-layer plan does not fit this model "
                f"(unknown parameters {missing[:5]}, {len(self.plan or [])} layers saved, {len(self._layers)} selected)"
            )
        if len(self.multipliers) != len(self.plan or []):
            self.multipliers = [1.0] * len(self.plan or [])

    def _split_groups(self, trainer: pl.Trainer, pl_module: nn.Module) -> None:
        owner = {id(pl_module.get_parameter(n)): i for i, names in enumerate(self.plan or []) for n in names}
        self._remove_hooks()
        self._group_layer = {}
        self._optimizers = {}
        for opt in trainer.optimizers:
            origin = split_param_groups(opt, lambda p: owner.get(id(p)))
            for config in trainer.lr_scheduler_configs:
                if getattr(config.scheduler, "optimizer", None) is opt:
                    follow_split(config.scheduler, [gi for gi, _ in origin])
            self._group_layer[id(opt)] = [layer for _, layer in origin]
            self._optimizers[id(opt)] = opt
        # Global hooks: torch runs global pre-hooks before, and global post-hooks after, every optimizer's own
        # hooks, so the multipliers wrap any other per-step LR scaling (ELRWarmup's: it scales inside the
        # closure and restores in its own post-hook) and the LRs come back exactly, whatever the callback order.
        self._handles.append(register_optimizer_step_pre_hook(self._scale_lrs))
        self._handles.append(register_optimizer_step_post_hook(self._restore_lrs))

    def _remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._optimizers = {}

    # ----------------------------------------------------------------------------------------------
    # Scaling around each optimizer step
    # ----------------------------------------------------------------------------------------------
    def _scale_lrs(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        layers = self._group_layer.get(id(opt))
        if self._optimizers.get(id(opt)) is not opt or layers is None or len(layers) != len(opt.param_groups):
            return
        self._saved_lrs[id(opt)] = [g["lr"] for g in opt.param_groups]
        for g, layer in zip(opt.param_groups, layers):
            if layer is not None:
                g["lr"] = g["lr"] * self.multipliers[layer]

    def _restore_lrs(self, opt: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> None:
        saved = self._saved_lrs.pop(id(opt), None)
        if saved is not None:
            for g, lr in zip(opt.param_groups, saved):
                g["lr"] = lr

    # ----------------------------------------------------------------------------------------------
    # Control
    # ----------------------------------------------------------------------------------------------
    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._before = snapshot_trainable(pl_module)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        metrics: dict[str, float] = {}
        if self._before is not None and trainer.global_step > 0:
            update, point = real_update(pl_module, self._before)
            self._before = None
            res = measure_speeds(self.probe_loss_model(pl_module), batch, self._layers, self.shard_layout, self._route,
                                 update=update, params=point, owner="FeatureSpeedControl")
            for name, r in res.items():
                metrics[tag("align", "control_speed", name)] = r.speed
                metrics[tag("align", "control_cos", name)] = r.cos_angle
            self.multipliers = self._new_multipliers(res)
        for i, name in enumerate(self._layers):
            metrics[tag("align", "control_multiplier", name)] = self.multipliers[i]
            metrics[tag("align", "control_lr", name)] = self._scheduled_lr(trainer, i) * self.multipliers[i]
        return metrics

    def _new_multipliers(self, res: FeatureSpeedResults) -> list[float]:
        plan = [set(PREFIX + n for n in names) for names in self.plan or []]
        old = list(self.multipliers)
        unit = [sum(res.param_loss_decrease.get(p, 0.0) for p in group) / old[k] for k, group in enumerate(plan)]
        new = list(old)
        names = list(res)
        done: list[int] = []
        for layer in _depth_order(res):
            name, r = names[layer], res[names[layer]]
            target = self._targets[layer if len(self._targets) > 1 else 0]
            upstream = set(r.upstream)
            prior = sum(new[k] * sum(res.param_loss_decrease.get(p, 0.0) for p in plan[k] & upstream) / old[k] for k in done)
            done.append(layer)
            f_norm = r.feature_rms * math.sqrt(r.numel)
            wanted = target * f_norm * r.backward_norm * r.cos_angle
            d = unit[layer]
            if not (math.isfinite(wanted) and r.cos_angle > 0 and d > 0):
                rank_zero_warn(
                    f"FeatureSpeedControl: layer {name!r} at this step has cos θ = {r.cos_angle:.3g} and loss decrease "
                    f"per unit multiplier {d:.3g}; its multiplier stays {old[layer]:.3g}"
                )
                continue
            proposal = min(max((wanted - prior) / d, self.min_multiplier), self.max_multiplier)
            new[layer] = math.exp(self.smoothing * math.log(old[layer]) + (1 - self.smoothing) * math.log(proposal))
        return new

    def _scheduled_lr(self, trainer: pl.Trainer, layer: int) -> float:
        for opt in trainer.optimizers:
            for g, owner in zip(opt.param_groups, self._group_layer.get(id(opt), [])):
                if owner == layer:
                    return float(g["lr"])
        return math.nan

    def extra_state(self) -> dict[str, Any]:
        layers = list(self._layers) if self.plan is not None else None
        return {"plan": self.plan, "multipliers": list(self.multipliers), "plan_layers": layers}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        plan, multipliers = state.get("plan"), state.get("multipliers", [])
        if plan is not None and not (isinstance(plan, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g) for g in plan)):
            raise refusal(self, "plan", plan, "a list of parameter-name lists, one per layer")
        layers = state.get("plan_layers")  # absent in checkpoints of older versions: the layers selected at fit start
        if layers is not None and not (isinstance(layers, list) and all(isinstance(n, str) for n in layers) and len(layers) == len(plan or [])):
            raise refusal(self, "plan_layers", layers, f"a list of {len(plan or [])} layer names, one per layer of the plan")
        self._plan_layers = layers
        if not isinstance(multipliers, list) or len(multipliers) != len(plan or multipliers):
            raise refusal(self, "multipliers", multipliers, f"a list of {len(plan or [])} numbers, one per layer of the plan")
        low, high = self.min_multiplier, self.max_multiplier
        rescaled = {"min_multiplier", "max_multiplier"} & set(self.changed_settings)
        for i, m in enumerate(multipliers):
            ok = isinstance(m, (int, float)) and not isinstance(m, bool) and m > 0 and math.isfinite(m)
            if not ok or (not rescaled and not low * (1 - 1e-9) <= m <= high * (1 + 1e-9)):
                raise refusal(self, f"multipliers[{i}]", m, f"a multiplier in [min_multiplier, max_multiplier] = [{low:g}, {high:g}]")
        self.plan = plan
        self.multipliers = [min(max(float(m), low), high) for m in multipliers]
        if rescaled and self.multipliers != [float(m) for m in multipliers]:
            changed = {k: v for k, v in self.changed_settings.items() if k in rescaled}
            rank_zero_info(f"FeatureSpeedControl: {describe(changed)}: the saved multipliers are clipped to [{low:g}, {high:g}].")

    def rereference(self, changed: Mapping[str, tuple[Any, Any]]) -> str | None:
        if "layers" in changed and self.plan is not None:
            old, new = changed["layers"]
            raise ValueError(
                f"FeatureSpeedControl: layers changed since the checkpoint ({old!r} -> {new!r}); the checkpoint's optimizer "
                "holds one parameter group per controlled layer, so the control cannot move to other layers on a resume. "
                f"Resume with layers={old!r}, or start a new fit to control other layers."
            )
        return None


def _ownership(res: FeatureSpeedResults) -> list[list[str]]:
    """Layer ``ℓ`` owns the parameters upstream of it and of no earlier layer (layers ordered by depth; none: empty)."""
    names = list(res)
    order = _depth_order(res)
    owned: list[list[str]] = [[] for _ in names]
    taken: set[str] = set()
    for i in order:
        mine = [p for p in res[names[i]].upstream if p not in taken]
        taken.update(mine)
        owned[i] = [p[len(PREFIX):] for p in mine]
    return owned


def _depth_order(res: FeatureSpeedResults) -> list[int]:
    """Layer indices from shallow to deep: by number of upstream parameters (model order on ties)."""
    names = list(res)
    return sorted(range(len(names)), key=lambda i: len(res[names[i]].upstream))
