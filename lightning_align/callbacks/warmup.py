"""ELRWarmup: the hyper-parameter-free learning-rate warm-up driven by the critical LR (Mehmeti-Göpel & Wand)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from typing_extensions import override

from lightning_align.arguments import Count, Name, Patterns, PositiveFloat, Seed
from lightning_align.headlines import Headline
from lightning_align.callbacks import checks
from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.callbacks.checkpoint_state import read_bool, read_float
from lightning_align.callbacks.elr import (
    check_invariance_test_args,
    grad_scale,
    layer_lrs,
    outputs_finite,
    report_invariance,
    sharded_parameters,
    tracked_group,
    tracked_modules,
)
from lightning_align.measure.elr import ScaleInvariance, WeightSpec, critical_lr, detect_scale_invariance, grad_weight_ratios
from lightning_align.measure.sharded import ShardLayout, local


class ELRWarmup(MeasurementCallback):
    """Warm the learning rate up no faster than the critical LR allows, then hand over to the user's schedule.

    Deep normalized nets start with a large spread of effective learning rates over layers. A learning
    rate above the critical ``η* = 1/sqrt(e_max·e_min)`` (``e_ℓ = ‖g_ℓ‖/‖w_ℓ‖`` over the scale-invariant
    weights) flips and widens that spread; at ``η*`` the extremes equalize in one step. The warm-up of
    Mehmeti-Göpel & Wand (ICML 2024) uses ``η_t = min(η_target, η*_t)``; ``η*_t`` grows by itself as the
    lower layers' weight norms grow, so no warm-up length has to be chosen.

    Here the target is what the optimizer holds at each step (its configured LR, as changed by any LR
    scheduler or other callback). Just before each optimizer step, every param group's LR is multiplied
    by one common factor ``min(1, s*)``, where ``s*`` is the critical factor for the per-layer LRs
    (``s* = η*/η`` with a single LR), and the original values are put back right after the step
    (an optimizer step post-hook), so LR schedulers, ``LearningRateMonitor`` and per-group multipliers
    never see the scaled values. Once the factor reaches 1 the warm-up is over for good and the
    optimizer runs untouched. ``e_ℓ`` comes from the gradients the optimizer is about to use.

    Logged: ``elr/warmup_factor`` (the factor applied at that step) while warming up and once more
    (1.0) when it ends. The state (finished or not) is saved in checkpoints.

    The rule comes from plain-SGD theory; with momentum or Adam it is a heuristic (still scaling the
    configured LR only). Needs a single optimizer.

    Under ``ModelParallelStrategy`` (FSDP2, ``DTensor`` parameters) the norms come from each rank's slices,
    summed over ranks in one all-reduce per step (float64), so every rank computes the same factor from the
    same numbers and scales its learning rates alike; the scale-invariant weights are rank 0's findings
    (broadcast once), and the finite-gradient check of a loss-scaled step is summed over ranks too.

    Args:
        every_n_steps: how often to log the factor (the warm-up itself acts at every step).
        weights: module names or regexes among which scale-invariant weights are sought (default: every trainable
            weight, stacks of expert matrices included, as in :class:`EffectiveLR`).
        scale_factor, invariance_rtol: the scale-invariance test (see :class:`EffectiveLR`).
        probe_size, probe_seed, name: shared by every callback; see "Arguments every callback shares" in
            ``docs/callbacks.md`` (the probe batch is used only by the scale-invariance test).

    Raises:
        ValueError: before the first optimizer step, if the model has no scale-invariant weight (the
            critical LR is then undefined) or has more than one optimizer.

    Example::

        trainer = Trainer(callbacks=[ELRWarmup(), EffectiveLR(every_n_steps=10)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.ELRWarmup
    """

    family = "elr"
    acts_on_training = True
    headlines = (Headline("elr", "warm-up factor", r"elr/warmup_factor"),)
    charts = {"ELR warm-up factor": ["Multiline", [r"^elr/warmup_factor$"]]}
    measure_in_probe_context = False  # logging the factor needs no probe; the probe is used once, in prepare()
    sharded_refusal = None  # FSDP2: norms from local slices, summed over ranks; the same factor on every rank

    def __init__(
        self,
        every_n_steps: Count = 1,
        weights: Patterns | None = None,
        *,
        scale_factor: PositiveFloat = 2.0,
        invariance_rtol: PositiveFloat = 1e-3,
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule="linear", probe_size=probe_size, probe_seed=probe_seed, bn_mode="train", name=name
        )
        check_invariance_test_args(self, scale_factor)
        self.weights = weights
        self.scale_factor = scale_factor
        self.invariance_rtol = invariance_rtol
        self.done = False
        self.factor = math.nan
        self._final_logged = False
        self._modules: dict[str, WeightSpec] = {}
        self._sharded_params: dict[str, dict[str, torch.Tensor]] = {}
        self._invariant: dict[str, ScaleInvariance] | None = None
        self._scaled: list[tuple[dict[str, Any], float, float]] = []
        self._hook: Any = None

    # ----------------------------------------------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"ELRWarmup: {type(pl_module).__name__} has {len(trainer.optimizers)} optimizers; ELRWarmup needs exactly one"
            )
        self._modules = tracked_modules(pl_module, self.weights, "ELRWarmup(weights=...)")
        self._sharded_params = sharded_parameters(self._modules) if self.shard_layout is not None else {}
        self._invariant = None

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        self._detect(pl_module, batch)
        if self.shard_layout is not None:  # the same weights on every rank (found alike; made sure of here)
            self._invariant = trainer.strategy.broadcast(self._invariant, src=0)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._remove_hook()
        self._hook = trainer.optimizers[0].register_step_post_hook(self._after_optimizer_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # The warm-up acts at every step; ``every_n_steps`` only sets how often the factor is logged. A step without
        # gradients (training_step returned None) changes nothing: no factor from it, nothing logged.
        if checks.skipped_step(pl_module):
            self._skipped_step = trainer.global_step + 1
            return
        self.before_step(trainer, pl_module)

    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore()
        if self.done or self._invariant is None:
            return
        optimizer = trainer.optimizers[0]
        layout = self.shard_layout
        groups = {n: tracked_group(self._modules[n], r, self._sharded_params.get(n)) for n, r in self._invariant.items()}
        grads = {n: [t.grad for t in ts] for n, ts in groups.items()}
        if getattr(trainer.precision_plugin, "scaler", None) is not None and not _all_finite(optimizer, layout):
            self.factor = math.nan  # the grad scaler will skip this step
            return
        sum_over_ranks = None if layout is None else layout.all_reduce
        ratios = grad_weight_ratios(groups, grads, sum_over_ranks=sum_over_ranks)
        ratios = {k: v / grad_scale(trainer, optimizer) for k, v in ratios.items()}
        lrs = layer_lrs([optimizer], groups)
        missing = sorted(set(groups) - set(lrs))
        if missing:
            raise ValueError(f"ELRWarmup: the weights of {missing} are not in the optimizer; track only trained layers")
        self.factor = min(1.0, critical_lr(ratios, lrs))
        if math.isnan(self.factor):
            return
        if self.factor >= 1.0:
            self.done = True
            return
        for group in optimizer.param_groups:
            original = group["lr"]
            group["lr"] = original * self.factor
            self._scaled.append((group, original, group["lr"]))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._scaled:  # the optimizer step did not run (e.g. skipped by a closure); undo the scaling
            self._restore()
        if not (self.done and self._final_logged):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        if trainer.global_step == 0:
            return {}
        if self.done:
            self._final_logged = True
        return {"elr/warmup_factor": self.factor}

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore()
        self._remove_hook()
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore()  # an interrupted fit leaves the optimizer as configured
        self._remove_hook()

    def extra_state(self) -> dict[str, Any]:
        return {"done": self.done, "factor": self.factor, "final_logged": self._final_logged}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.done = read_bool(self, state, "done", False)
        self.factor = read_float(self, state, "factor", math.nan, high=1.0, nan=True)
        self._final_logged = read_bool(self, state, "final_logged", False)

    # ----------------------------------------------------------------------------------------------
    def _detect(self, pl_module: pl.LightningModule, batch: Any) -> None:
        model = self.probe_outputs_model(pl_module)
        try:
            found = detect_scale_invariance(model, batch, self._modules, factor=self.scale_factor, rtol=self.invariance_rtol)
        except ValueError as err:
            if outputs_finite(model, batch):
                raise
            raise ValueError(
                f"ELRWarmup: {type(pl_module).__name__} gives non-finite outputs (NaN/Inf) on the probe batch before "
                "training, so its scale-invariant weights cannot be found and the warm-up cannot be set; check the data "
                "(NaN inputs?) and the model's initialization, or remove ELRWarmup."
            ) from err
        report_invariance("ELRWarmup", type(pl_module).__name__, found)
        invariant = {n: r for n, r in found.items() if r.scale_invariant}
        if not invariant:
            raise ValueError(
                f"ELRWarmup: {type(pl_module).__name__} has no scale-invariant weights: none of its tracked weights "
                f"({', '.join(found)}) feeds a BatchNorm/LayerNorm/GroupNorm without a path around it (tested by "
                "scaling each weight on the probe batch), so the critical learning rate is undefined. Remove "
                "ELRWarmup (use an ordinary warm-up schedule), add normalization layers, or name the layers with `weights`."
            )
        self._invariant = invariant

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for group, original, scaled in self._scaled:
            if group["lr"] == scaled:
                group["lr"] = original
            else:  # someone else changed it during the step: keep their change, remove our factor
                rank_zero_warn("ELRWarmup: a learning rate changed during the optimizer step; removing the warm-up factor from it")
                group["lr"] = group["lr"] / self.factor
        self._scaled = []

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


def _all_finite(optimizer: torch.optim.Optimizer, layout: ShardLayout | None = None) -> bool:
    """Whether every gradient is finite; with ``layout`` (FSDP2) every rank's slices are checked (one all-reduce)."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grads = [local(p.grad) for p in params if p.grad is not None]
    if layout is None:
        return all(bool(torch.isfinite(g).all()) for g in grads)
    bad = sum(int((~torch.isfinite(g)).any()) for g in grads)
    device = local(params[0]).device if params else torch.device("cpu")
    return int(layout.all_reduce(torch.tensor([float(bad)], device=device)).item()) == 0
