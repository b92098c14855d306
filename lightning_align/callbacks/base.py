"""MeasurementCallback: the one place that holds probe hygiene for every measurement callback.

A subclass says *what* to measure by implementing :meth:`MeasurementCallback.measure`; this base
decides *when* (a :class:`~lightning_align.schedules.StepSchedule` on ``trainer.global_step``), *on what*
(a fixed probe batch drawn once, seeded, detached, fp32), *how safely* (:meth:`probe_context`: the
unwrapped module, original forward of a compiled module, autocast off, grad on, fp32 arithmetic even for
a bf16/fp16 model, train/eval flags, BatchNorm buffers, ``.grad`` and every RNG stream restored), and
*where results go* (every attached logger; TensorBoard histograms/figures).

Hook order used:

- ``on_fit_start``: :mod:`~lightning_align.callbacks.checks` and :meth:`validate` (lazy modules, complex parameters,
  several optimizers, bad module names etc. fail here, before any optimizer step);
- ``on_train_start``: probe batch drawn; :meth:`prepare` (once per fit); measurement at step 0 (before training);
- ``on_before_optimizer_step``: :meth:`before_step` when the step about to happen is scheduled
  (to snapshot weights before the update) and will change the weights (a ``training_step`` returning ``None``
  makes none: a callback with a :meth:`before_step` skips that step);
- ``on_train_batch_end``: :meth:`measure` after each scheduled optimizer step (once per step, also
  under gradient accumulation).

The user's view comes for free with any measurement callback: at ``on_train_start`` the TensorBoard
custom-scalars layout of every attached family is written once per run (:mod:`lightning_align.dashboard`);
each measurement's headline values go to the progress bar and to :attr:`headline_history`; at
``teardown("fit")`` the first measurement callback prints one first -> last table for all of them,
unless an :class:`~lightning_align.callbacks.summary.AlignSummary` is attached to configure that.
"""

from __future__ import annotations

import abc
import contextlib
import functools
import inspect
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import IterableDataset

from typing_extensions import override

from lightning_align.arguments import Count, Name, Seed, argument_error, checked_init
from lightning_align.callbacks.probe import (
    ProbeLoss,
    ProbeOutputs,
    draw_probe_batch,
    prepare_probe_batch,
    single_dataloader,
    slice_batch,
)
from lightning_align.measure.batch import batch_size_of
from lightning_align.measure.modules import NORMS_WITH_STATS
from lightning_align.measure.sharded import ShardLayout, has_sharded_parameters, reshard, shard_layout
from lightning_align.dashboard import write_dashboard
from lightning_align.headlines import Headline, HeadlineHistory, progress_bar_values
from lightning_align.callbacks import checks, guards
from lightning_align.callbacks.strategy import check_strategy
from lightning_align.callbacks import checkpoint_state
from lightning_align.callbacks.checkpoint_state import PROBE_SETTINGS
from lightning_align.callbacks.heatmaps import log_heatmaps, record_layers
from lightning_align.callbacks.names import check_distinct_names
from lightning_align.logging import callback_name, log_scalars, writing_as
from lightning_align.measure.state import default_dtype_at_least_fp32, map_tensors, probe_dtype, upcast_floating
from lightning_align import schedules
from lightning_align.schedules import DEFAULT_MAX_OVERHEAD, MaxOverhead, OverheadBudget, ScheduleName, StepSchedule

BatchNormMode = Literal["train", "eval"]


class MeasurementCallback(Callback, abc.ABC):
    """Base class of the measurement callbacks.

    Subclasses implement :meth:`measure` (and optionally :meth:`validate`, :meth:`before_step`,
    :meth:`extra_state` / :meth:`load_extra_state`). Inside :meth:`measure` the model is in the probe
    state: dropout off, BatchNorm in batch-statistics mode (``bn_mode="train"``) or running-statistics
    mode (``bn_mode="eval"``), autocast off, gradients enabled; everything is restored afterwards.

    The arguments below keep their names and meanings in every subclass (all but ``every_n_steps`` keyword-only;
    a subclass passes them on by keyword); ``docs/callbacks.md``, "Arguments every callback shares", lists them
    with the names the subclasses share (``layers``, ``weights``, ``figure_every``). Every argument a caller passes
    is checked against its annotation before ``__init__`` runs, a subclass's own too (:mod:`lightning_align.arguments`:
    ``bool``, ``int``, finite ``float``, ``Literal``, lists, ranges as ``Annotated[int, Bound(1)]``, ...).

    Args:
        every_n_steps: measure every this many optimizer steps, and once before training (step 0).
        schedule: ``"linear"`` (multiples of ``every_n_steps``) or ``"log"`` (also 1, 2, 4, ... below it).
        max_overhead: the largest share of the fit's wall time this callback's measurements may take: a scheduled
            measurement that would exceed it is postponed to a later scheduled step (step 0, ``log``'s early steps
            and the first scheduled measurement after them always run).
            ``"auto"``: 0.3% when ``every_n_steps`` is left at the callback's default, no limit when it is set
            (the steps asked for are measured); ``None``: no limit. Callbacks that act on training (controls)
            take no limit: their decisions must not depend on the machine's speed.
        probe_size: number of training samples in the fixed probe batch (split over ranks under DDP).
        probe_seed: seed that picks the probe samples.
        bn_mode: BatchNorm during probes: ``"train"`` uses batch statistics (the objective being
            optimized; running buffers are restored), ``"eval"`` uses running statistics.
        dropout: keep dropout active during probes. Off by default: inside a probe every module is in eval
            mode (except normalisation layers with running statistics, per ``bn_mode``), so dropout keyed
            on ``self.training`` (``nn.Dropout``, attention ``dropout_p``, drop-path) is off and the probed
            function is deterministic.
        name: distinguishes two instances of one callback class in a checkpoint (Lightning's state key is
            the class name plus this name; schedule settings may change across a resume).

    Example::

        class WeightNorm(MeasurementCallback):
            family = "norm"

            def measure(self, trainer, pl_module, batch):
                return {"norm/weights": sum(p.norm() ** 2 for p in pl_module.parameters()) ** 0.5}
    """

    family: ClassVar[str] = "measure"
    #: Under DDP the probe is rank 0's, broadcast once when drawn. ``False`` (the default): every rank measures
    #: the whole probe, so every rank logs the same value. ``True``: the probe is split over ranks and the
    #: subclass reduces its results with :meth:`all_reduce_mean` (sum-decomposable quantities, e.g.
    #: Hessian-vector products).
    shard_probe: ClassVar[bool] = False
    #: Why this callback cannot run on FSDP2-sharded parameters (``ModelParallelStrategy``); ``None``: it can
    #: (then :attr:`shard_layout` says how the trainable parameters are split, ``None`` when they are not).
    sharded_refusal: ClassVar[str | None] = "it was not written for sharded parameters."
    shard_layout: ShardLayout | None = None
    #: Run :meth:`measure` inside :meth:`probe_context`. A callback that only reads weights (no forward
    #: pass on the probe) sets ``False`` and skips the context's cost at every measurement.
    measure_in_probe_context: ClassVar[bool] = True
    #: The measurement differentiates the training loss: under manual optimization the module must define
    #: ``probe_loss(batch)`` (its ``training_step`` steps the optimizer), checked at fit start.
    needs_loss: ClassVar[bool] = False
    #: The few values shown in the progress bar and the end-of-fit table (see :mod:`lightning_align.headlines`).
    headlines: ClassVar[tuple[Headline, ...]] = ()
    #: TensorBoard Custom Scalars charts of this callback: ``{title: ["Multiline", [tag regexes]]}``, one quantity
    #: (one scale) per chart; :meth:`dashboard_charts` may drop those a setting turns off.
    charts: ClassVar[dict[str, list[Any]]] = {}
    #: Per-layer tags drawn as one layer × step heatmap each at the end of fit (a TensorBoard image under
    #: ``<family>/heatmap_<what>``): ``{tag prefix: colour-bar label}``.
    heatmaps: ClassVar[dict[str, str]] = {}
    #: The measurements drive training (a control): never postponed by ``max_overhead``.
    acts_on_training: ClassVar[bool] = False
    #: Settings the saved state depends on: saved with it; on resume those changed (``changed_settings``,
    #: ``{name: (saved, now)}``) go to :meth:`rereference` (see :mod:`~lightning_align.callbacks.checkpoint_state`).
    state_settings: ClassVar[tuple[str, ...]] = PROBE_SETTINGS
    changed_settings: dict[str, tuple[Any, Any]] = {}
    _reference_due = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        # Every subclass's own arguments are checked against its annotations (lightning_align.arguments).
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    @checked_init
    def __init__(
        self,
        every_n_steps: Count = 100,
        *,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "train",
        dropout: bool = False,
        name: Name | None = None,
    ) -> None:
        self.schedule = StepSchedule(every_n_steps=int(every_n_steps), schedule=schedule)
        self.every_n_steps = every_n_steps
        self.max_overhead = max_overhead
        self.overhead_share = self._overhead_share(every_n_steps, max_overhead)
        self.budget: OverheadBudget | None = None
        self._budget_decision: tuple[int, bool] = (-1, True)
        self.probe_size = probe_size
        self.probe_seed = probe_seed
        self.bn_mode = bn_mode
        self.dropout = dropout
        self.name = name
        self.probe_batch: Any = None
        self._state_loaded = False
        self._awaiting_stream = False
        self._explicit_probe: Any = None
        self.last_step = -1
        self._skipped_step = -1  # the last optimizer step that changed nothing (training_step returned None)
        self._layer_values: dict[str, dict[str, dict[int, float]]] = {}  # heatmap prefix -> layer -> step -> value
        #: First and last headline values of this fit (read by the end-of-fit summary).
        self.headline_history = HeadlineHistory()

    def _overhead_share(self, every_n_steps: int, max_overhead: MaxOverhead) -> float | None:
        """The budget's share of fit time (``None``: a fixed schedule); see ``max_overhead``."""
        if max_overhead == "auto":
            declared = inspect.signature(type(self).__init__).parameters.get("every_n_steps")
            at_default = declared is not None and declared.default == every_n_steps
            return DEFAULT_MAX_OVERHEAD if at_default and not self.acts_on_training else None
        if max_overhead is None:
            return None
        if self.acts_on_training:
            raise argument_error(
                self, "max_overhead", max_overhead, "'auto' or None for a control",
                detail=" (a limit would make its control decisions depend on the machine's speed; a control runs on its "
                "schedule)",
                remedy="remove max_overhead, or set every_n_steps",
            )
        return float(max_overhead)

    # ----------------------------------------------------------------------------------------------
    # What subclasses implement
    # ----------------------------------------------------------------------------------------------
    def dashboard_charts(self) -> dict[str, list[Any]]:
        """This instance's Custom Scalars charts (the class's :attr:`charts`, less those its settings turn off)."""
        return dict(self.charts)

    def heatmap_layer(self, tag: str, prefix: str) -> str | None:
        """The layer of a per-layer ``tag`` under a :attr:`heatmaps` prefix (``None``: not a layer's tag)."""
        return tag[len(prefix) :] if tag.startswith(prefix) and len(tag) > len(prefix) else None

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Check arguments against the model; raise a clear error naming the culprit. Runs at fit start."""

    @abc.abstractmethod
    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        """Measure on the probe batch and return scalars ``{tag: value}`` to log (may log more itself)."""

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        """Once per fit, right after the probe batch is drawn and before the step-0 measurement, inside the
        probe context: analyse the model on the probe (e.g. which weights are scale-invariant)."""

    def before_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called just before a scheduled optimizer step (e.g. to snapshot weights). No probe context."""

    def extra_state(self) -> dict[str, Any]:
        """State beyond the step counter that must survive a resume."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (refusing values it cannot have returned: ``checkpoint_state``)."""

    def rereference(self, changed: Mapping[str, tuple[Any, Any]]) -> str | None:
        """Drop the saved references measured under the settings in ``changed``; return what is then measured from
        the resume point (``None``: nothing depended on them), or raise when they cannot be re-taken."""
        return None

    # ----------------------------------------------------------------------------------------------
    # Probe protocol
    # ----------------------------------------------------------------------------------------------
    def set_probe_batch(self, batch: Any) -> None:
        """Use this batch as the probe instead of drawing one from the training data."""
        self._explicit_probe = batch

    @contextlib.contextmanager
    def probe_context(self, pl_module: nn.Module) -> Iterator[None]:
        """Run a probe on ``pl_module`` with no side effect on training.

        Inside: grad enabled (also under ``trainer.validate``'s inference mode), autocast off, dropout off
        (unless ``dropout=True``), BatchNorm per ``bn_mode``, the original (uncompiled) ``forward`` and
        ``training_step``, ``self.log`` silenced, and at least float32 arithmetic: bfloat16/float16 parameters and
        buffers (``precision="bf16-true"``/``"16-true"``) are float32 copies, float64 ones stay float64. On exit:
        flags, buffers, tensor and Python attributes (torchmetrics states too), ``.grad``, RNG streams, methods and
        the original low-precision tensors restored (:mod:`~lightning_align.callbacks.guards`), and under FSDP2
        every parameter its ``DTensor`` slice again.
        """
        device_type = guards.device_type(pl_module)
        with contextlib.ExitStack() as stack:
            stack.enter_context(guards.untouched(pl_module))
            stack.enter_context(torch.inference_mode(False))
            stack.enter_context(torch.enable_grad())
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
            stack.enter_context(default_dtype_at_least_fp32())
            stack.enter_context(upcast_floating(pl_module, torch.float32))
            stack.enter_context(guards.uncompiled(pl_module))
            stack.enter_context(guards.refused_training_steps(pl_module, type(self).__name__))
            stack.enter_context(guards.without_input_require_grads(pl_module))
            if self.shard_layout is not None:  # FSDP2 keeps a forward's gathered root parameters without a backward
                stack.callback(reshard, pl_module)
            self._set_probe_modes(pl_module)
            yield

    def _set_probe_modes(self, pl_module: nn.Module) -> None:
        """Eval mode everywhere (functional dropout reads ``self.training``), norms per ``bn_mode``."""
        for m in pl_module.modules():
            if isinstance(m, NORMS_WITH_STATS):
                m.training = self.bn_mode == "train"
            elif isinstance(m, nn.modules.dropout._DropoutNd):
                m.training = self.dropout
            elif not self.dropout:
                m.training = False

    def probe_loss_model(self, pl_module: pl.LightningModule) -> ProbeLoss:
        """``nn.Module`` with ``forward(batch) -> loss`` (see :mod:`lightning_align.callbacks.probe`)."""
        return ProbeLoss(pl_module, owner=type(self).__name__)

    def probe_outputs_model(self, pl_module: pl.LightningModule) -> ProbeOutputs:
        """``nn.Module`` with ``forward(batch) -> outputs``."""
        return ProbeOutputs(pl_module)

    def all_reduce_mean(self, trainer: pl.Trainer, value: torch.Tensor) -> torch.Tensor:
        """Mean over ranks (identity in a single process); a copy, the input is not changed."""
        if trainer.world_size == 1:
            return value
        return trainer.strategy.reduce(value.clone(), reduce_op="mean")

    # ----------------------------------------------------------------------------------------------
    # Lightning hooks
    # ----------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # State is per fit: objects reused for another Trainer start fresh (a checkpoint restores after this),
        # unless state was loaded by hand (`load_state_dict`) since the last fit.
        check_distinct_names(trainer.callbacks)  # also those appended after the Trainer checked its own
        if stage == "fit":
            if not self._state_loaded:
                self.load_state_dict({})
            self.probe_batch = None
            self.headline_history.clear()
            self._layer_values = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # FSDP/DeepSpeed: refused before validate
        check_strategy(trainer, type(self).__name__, self.sharded_refusal)
        if self.sharded_refusal is None:
            trainable = [p for p in pl_module.parameters() if p.requires_grad]
            self.shard_layout = shard_layout(trainable, type(self).__name__)
        elif has_sharded_parameters(pl_module):  # sharded by hand, outside ModelParallelStrategy
            raise ValueError(
                f"{type(self).__name__} cannot run on sharded (DTensor) parameters: {self.sharded_refusal} "
                f"Remove {type(self).__name__} from the callbacks for this run."
            )
        if self.needs_loss and not pl_module.automatic_optimization and not hasattr(pl_module, "probe_loss"):
            raise ValueError(
                f"{type(self).__name__}: {type(pl_module).__name__} uses manual optimization (automatic_optimization="
                "False), so its training_step steps the optimizer and cannot be run by a probe. Define "
                "`probe_loss(self, batch)` returning the scalar training loss (no backward, no optimizer step)."
            )
        checks.check_model(type(self).__name__, pl_module)  # lazy modules, complex parameters
        self.validate(trainer, pl_module)
        checks.check_optimizers(self, trainer, pl_module)
        if self.budget is not None:
            self.budget.start()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        write_dashboard(trainer, [cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback)], callback_name(self))
        checkpoint_state.check_at_train_start(self, trainer)
        if self._explicit_probe is None and _is_stream(trainer):
            self._awaiting_stream = True  # the probe is the first training batch (on_train_batch_start)
            return
        self._start(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._awaiting_stream:
            self._awaiting_stream = False
            self.probe_batch = self._stream_probe(trainer, pl_module, batch)
            self._start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe batch, :meth:`prepare` and the first measurement, before the first optimizer step."""
        self.ensure_probe_batch(trainer, pl_module)
        if type(self).prepare is not MeasurementCallback.prepare:
            started = schedules.clock()
            with self.probe_context(pl_module), writing_as(callback_name(self)):
                self.prepare(trainer, pl_module, self.probe_batch)
            if self.budget is not None:
                self.budget.exclude(schedules.clock() - started)
        step = trainer.global_step  # 0, or the step a checkpoint resumes from
        if (step > self.last_step and self.schedule.is_due(step) and self._within_budget(trainer, step)) or self._reference_due:
            self._reference_due = False  # settings changed since the checkpoint: new references at the resume step
            self._run(trainer, pl_module)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step + 1
        if checks.skipped_step(pl_module):  # training_step returned None: no update to copy the weights for
            self._skipped_step = step
        elif self.schedule.is_due(step) and self._within_budget(trainer, step):
            self.before_step(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        skipped = step == self._skipped_step and checks.measures_updates(self)  # no update was made to measure
        if step > self.last_step and not skipped and self.schedule.is_due(step) and self._within_budget(trainer, step):
            self._run(trainer, pl_module)

    def budget_remedy(self) -> str:
        """How to measure at every scheduled step instead (for messages about postponed measurements)."""
        if self.max_overhead == "auto":
            return "set every_n_steps (or max_overhead=None) to measure at every scheduled step"
        return "max_overhead=None measures at every scheduled step"

    def _within_budget(self, trainer: pl.Trainer, step: int) -> bool:
        """Whether the measurement scheduled at ``step`` fits ``max_overhead`` (decided once per step, by rank 0
        under DDP so that every rank measures at the same steps)."""
        if self.budget is None or step < self.schedule.every_n_steps:  # step 0 and `log`'s early steps: always
            return True
        if self._budget_decision[0] == step:
            return self._budget_decision[1]
        allowed = self.budget.allows_next()
        if trainer.world_size > 1:
            allowed = bool(trainer.strategy.broadcast(allowed, src=0))
        if not allowed:
            if self.budget.postponed == 0:
                rank_zero_info(
                    f"{type(self).__name__}: postponing its measurement at step {step} to keep its measurements under "
                    f"{self.budget.share_text} of training time (max_overhead; the last took {self.budget.last_cost:.3g} s)"
                    f"; {self.budget_remedy()}."
                )
            self.budget.postponed += 1
        self._budget_decision = (step, allowed)
        return allowed

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_heatmaps(self, trainer)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # One table for the whole suite: printed by the first measurement callback, unless AlignSummary decides.
        from lightning_align.callbacks.summary import find_summary, print_fit_summary

        if stage == "fit":
            self._state_loaded = False  # the next fit starts fresh unless a checkpoint or the user loads state
        if stage != "fit" or find_summary(trainer) is not None:
            return
        # The leader: the first measurement callback (subclasses overriding teardown call super()).
        leaders = [c for c in trainer.callbacks if isinstance(c, MeasurementCallback)]
        if leaders and leaders[0] is self:
            print_fit_summary(trainer, owner=callback_name(self))

    @override
    def state_dict(self) -> dict[str, Any]:
        return checkpoint_state.dump(self)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state_loaded = bool(state_dict)
        self._reference_due = checkpoint_state.load(self, dict(state_dict))

    @override
    @functools.cached_property
    def state_key(self) -> str:  # type: ignore[override]
        # The class and `name` only: schedule and probe settings may change across a resume. Lightning reads
        # this at every hook call (profiler names), so it is cached as a plain instance attribute.
        return self._generate_state_key(name=self.name)

    # ----------------------------------------------------------------------------------------------
    # Internals
    # ----------------------------------------------------------------------------------------------
    def ensure_probe_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Draw the fixed probe batch if not done yet (also callable by subclasses before step 0)."""
        if self.probe_batch is not None:
            return
        if self._explicit_probe is not None:
            raw = self._explicit_probe
        else:
            drawn = draw_probe_batch(trainer.train_dataloader, self.probe_size, self.probe_seed, owner=type(self).__name__)
            raw = self._same_on_every_rank(trainer, drawn)
        self.probe_batch = prepare_probe_batch(raw, pl_module.device, probe_dtype(pl_module))

    def _same_on_every_rank(self, trainer: pl.Trainer, probe: Any) -> Any:
        """Under DDP, rank 0's probe for every rank whatever each rank's sampler or data set; a sharded probe
        (``shard_probe``) then gives each rank its samples ``rank, rank + world, ...``."""
        if trainer.world_size == 1:
            return probe
        probe = trainer.strategy.broadcast(probe, src=0)
        if not self.shard_probe:
            return probe
        n = batch_size_of(probe)
        if n < trainer.world_size:
            raise ValueError(
                f"{type(self).__name__}(probe_size={self.probe_size}): a probe of {n} samples cannot be split over "
                f"{trainer.world_size} processes; raise probe_size"
            )
        return map_tensors(probe, lambda t: t[trainer.global_rank :: trainer.world_size] if t.ndim else t)

    def _stream_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Any:
        """The probe of an iterable (stream) data set: a copy of the first training batch, so that no sample is
        taken away from training; under DDP rank 0's batch (see :meth:`_same_on_every_rank`)."""
        owner = type(self).__name__
        size = batch_size_of(batch)
        if size < self.probe_size:
            rank_zero_warn(
                f"{owner}(probe_size={self.probe_size}): the training data is a stream (IterableDataset), so the probe "
                f"is a copy of its first batch, {size} samples; pass a larger batch with `set_probe_batch` before fit."
            )
        probe = self._same_on_every_rank(trainer, slice_batch(batch, min(size, self.probe_size)))
        return prepare_probe_batch(probe, pl_module.device, probe_dtype(pl_module))

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.probe_batch is None:
            self.ensure_probe_batch(trainer, pl_module)
        # Lightning hands callbacks the LightningModule itself, never the DDP/FSDP wrapper.
        context = self.probe_context(pl_module) if self.measure_in_probe_context else contextlib.nullcontext()
        started = schedules.clock()
        with context, writing_as(callback_name(self)):
            metrics = self.measure(trainer, pl_module, self.probe_batch)
        if metrics:
            values = log_scalars(trainer, metrics, owner=callback_name(self))
            self.headline_history.add(trainer.global_step, values, self.headlines or None)
            record_layers(self, trainer, values)
            self._show_in_progress_bar(trainer, values)
        if self.budget is not None:  # after the values were read back (on a GPU: the measurement has finished)
            seconds = schedules.clock() - started
            if trainer.global_step < self.schedule.every_n_steps:  # step 0, `log`'s early steps: one-off
                self.budget.exclude(seconds)
            else:
                self.budget.charge(seconds)
        self.last_step = trainer.global_step

    def _show_in_progress_bar(self, trainer: pl.Trainer, values: Mapping[str, float]) -> None:
        from lightning_align.callbacks.summary import find_summary

        summary = find_summary(trainer)
        if summary is None or summary.progress_bar:
            # The progress bar shows trainer.progress_bar_metrics; values stay until the next measurement.
            trainer.progress_bar_metrics.update(progress_bar_values(values, self.headlines))


def _is_stream(trainer: pl.Trainer) -> bool:
    """The training data is an ``IterableDataset`` (it may not restart: the probe must not read it)."""
    try:
        loader = single_dataloader(trainer.train_dataloader)
    except TypeError:
        return False
    return isinstance(loader.dataset, IterableDataset)
