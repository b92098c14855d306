"""RankMonitor: weight spectra and representation rank during training (bottleneck structure)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_align.arguments import Count, Name, NonNegativeInt, Patterns, PositiveFloat, Seed
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.logging import log_histogram, tag
from lightning_align.measure.batch import HF_INPUT_KEYS, ModelKwargs, batch_inputs, batch_size_of
from lightning_align.measure.census import matrix_stacks, take_census
from lightning_align.measure.modules import captured_outputs, layers_on_probe, running_statistics, select_modules, weights_read
from lightning_align.measure.rank import jacobian_rank, representation_ranks, weight_spectrum
from lightning_align.measure.sequence import PositionMasks, counted
from lightning_align.measure.sharded import full
from lightning_align.schedules import MaxOverhead, ScheduleName


class RankMonitor(MeasurementCallback):
    """Singular values, stable rank and near-one counts of weights; effective rank of representations.

    Deep L2-regularized nets develop a *bottleneck*: middle weights get a few singular values near 1
    and middle representations become low-dimensional (Jacot 2023). This callback shows it per layer.

    Logged, per weight (``<layer>`` is the module name; conv weights are reshaped to ``(out, in·k·k)``; a stack of
    matrices such as the experts of a mixture of experts held as one ``(experts, out, in)`` parameter gives one
    weight per matrix, ``<layer>`` being ``<module>.<parameter>.<index>``):
    ``rank/weight_stable/<layer>``, ``rank/weight_above/<layer>`` (singular values > ``threshold``),
    ``rank/weight_near_one/<layer>`` (``|s-1| <= near_one_tol``), ``rank/weight_fro_sq/<layer>``, and the
    spectrum as the TensorBoard histogram ``rank/singular_values/<layer>``. Per representation layer, on
    the probe batch (centred; one row per sample, or, for an output per position of a Hugging Face batch's
    sequence, one row per position that counts, padding left out: "Padded positions" in ``docs/callbacks.md``):
    ``rank/repr_effective/<layer>`` (entropy rank), ``rank/repr_participation/<layer>``, ``rank/repr_numerical/<layer>``. With ``jacobian_points > 0``:
    ``rank/jacobian_numerical`` and ``rank/jacobian_logdet`` (mean over points).

    Cost: one SVD per weight and one forward plus one SVD per representation layer, every ``every_n_steps``.

    Under ``ModelParallelStrategy`` (FSDP2, ``DTensor`` parameters) a spectrum needs the whole matrix: each
    weight is gathered on every rank, one at a time (freed before the next), and every rank computes its
    SVD; the representations come from the model's own forward on the whole probe. Every rank logs the same
    values. ``jacobian_points > 0`` is refused there (``torch.func`` cannot differentiate through sharded
    parameters).

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0). The default (1000) is sparse
            enough to leave on (measured shares: README, "Speed and overhead").
        weights: module names or regexes whose ``weight`` (or stacks of matrices) is analysed (default: every
            Linear/Conv/Embedding weight the forward reads on the probe batch, a tied weight once, and every stack of
            expert matrices; see "Which layers" in ``docs/callbacks.md``).
        layers: module names or regexes whose outputs are the representations (default: the weight layers and
            expert modules that run on the probe batch).
        threshold: singular values above it count in ``weight_above``.
        near_one_tol: tolerance of ``weight_near_one``.
        repr_tol: relative tolerance of the numerical rank.
        jacobian_points: number of probe inputs for the input-output Jacobian rank (0 = off); computed
            with BatchNorm running statistics, since a per-sample Jacobian needs a sample-wise function. For a
            Hugging Face batch, with respect to its real-valued input (``pixel_values``, ``input_values``,
            ``input_features``, ``inputs_embeds``), the other entries (an attention mask) those of the sample.
        histograms: log singular-value histograms to TensorBoard.
        schedule, max_overhead, probe_size, probe_seed, bn_mode, name: shared by every callback; see "Arguments every callback
            shares" in ``docs/callbacks.md``.

    Example::

        trainer = Trainer(callbacks=[RankMonitor(every_n_steps=50, layers=[r"hidden\\.\\d+"])])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.RankMonitor
              init_args: {every_n_steps: 50}
    """

    family = "rank"
    headlines = (
        Headline("rank", "min weight stable rank", r"rank/weight_stable/.+", "min"),
        Headline("rank", "min repr. effective rank", r"rank/repr_effective/.+", "min"),
    )
    charts = {
        "weight stable rank per layer": ["Multiline", [r"^rank/weight_stable/"]],
        "representation effective rank per layer": ["Multiline", [r"^rank/repr_effective/"]],
        "singular values near one per layer": ["Multiline", [r"^rank/weight_near_one/"]],
    }
    heatmaps = {"rank/repr_effective/": "representation effective rank"}
    sharded_refusal = None  # weights gathered one at a time; jacobian_points > 0 refused in validate()

    def __init__(
        self,
        every_n_steps: Count = 1000,
        weights: Patterns | None = None,
        layers: Patterns | None = None,
        *,
        threshold: PositiveFloat = 0.5,
        near_one_tol: PositiveFloat = 0.25,
        repr_tol: PositiveFloat = 1e-3,
        jacobian_points: NonNegativeInt = 0,
        histograms: bool = True,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "eval",
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, name=name
        )
        self.weights = weights
        self.layers = layers
        self.threshold = threshold
        self.near_one_tol = near_one_tol
        self.repr_tol = repr_tol
        self.jacobian_points = jacobian_points
        self.histograms = histograms
        self._weight_modules: dict[str, torch.nn.Module] = {}
        self._stacks: dict[str, torch.nn.Parameter] = {}
        self._repr_modules: dict[str, torch.nn.Module] = {}

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.jacobian_points and self.shard_layout is not None:
            raise ValueError(
                f"RankMonitor(jacobian_points={self.jacobian_points}): the input-output Jacobian differentiates the "
                "model through torch.func, which cannot run on FSDP2-sharded (DTensor) parameters; set "
                "jacobian_points=0 under ModelParallelStrategy (weight and representation ranks still run)."
            )
        weights = select_modules(pl_module, self.weights, "weights", owner="RankMonitor(weights=...)")
        missing = [n for n, m in weights.items() if not _has_matrix_weight(m) and not matrix_stacks(m)]
        if missing:
            raise ValueError(f"RankMonitor(weights=...): modules {missing} have no 2-D or higher `weight` (nor a stack of matrices) to analyse")
        self._weight_modules = {n: m for n, m in weights.items() if _has_matrix_weight(m)}
        named = weights if self.weights is not None else {}  # the default stacks are found on the probe (prepare)
        self._stacks = {f"{n}.{p}": t for n, m in named.items() for p, t in matrix_stacks(m).items()}
        self._repr_modules = select_modules(pl_module, self.layers, "weights", owner="RankMonitor(layers=...)")

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        model = self.probe_outputs_model(pl_module)
        with torch.no_grad():
            census, _ = take_census(pl_module, lambda: model(batch))
        if self.weights is None:  # the weights the forward reads (a tied one once), and the experts' stacks
            self._weight_modules, self._stacks = weights_read(pl_module, census), dict(census.stacks)
            covered = {id(m.weight) for m in self._weight_modules.values()} | {id(p) for p in self._stacks.values()}
            left = [n for n, p in pl_module.named_parameters() if p.ndim >= 2 and id(p) in census.read and id(p) not in covered]
            if left:
                rank_zero_info(
                    f"RankMonitor: {left} of {type(pl_module).__name__} are read on the probe batch but are neither a layer's "
                    "weight matrix nor a stack of matrices (e.g. nn.MultiheadAttention's in_proj_weight, a position "
                    "embedding): no weight spectrum for them."
                )
        self._repr_modules = layers_on_probe(pl_module, census, self.layers, self._repr_modules, "weights", owner="RankMonitor")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        metrics: dict[str, float] = {}
        for name, weight in self._matrices():
            if not _finite(weight):  # e.g. a diverged fp16 run: log NaN (with a warning), no SVD
                metrics.update({tag("rank", what, name): math.nan for what in _WEIGHT_TAGS})
                continue
            spec = weight_spectrum(weight, threshold=self.threshold, near_one_tol=self.near_one_tol)
            metrics[tag("rank", "weight_stable", name)] = spec.stable_rank
            metrics[tag("rank", "weight_above", name)] = spec.count_above
            metrics[tag("rank", "weight_near_one", name)] = spec.count_near_one
            metrics[tag("rank", "weight_fro_sq", name)] = spec.frobenius_sq
            if self.histograms:
                log_histogram(trainer, tag("rank", "singular_values", name), spec.singular_values)
        model = self.probe_outputs_model(pl_module)
        positions = PositionMasks(pl_module, batch, owner="RankMonitor")
        with torch.no_grad(), captured_outputs(self._repr_modules) as features, positions.watching(self._repr_modules):
            outputs = model(batch)
        self._check_features(features, batch_size_of(batch))
        for name in self._repr_modules:
            rows = counted(features[name], positions.of(name, features[name]))  # a row per counted position, or sample
            if not _finite(rows):
                metrics.update({tag("rank", what, name): math.nan for what in _REPR_TAGS})
                continue
            ranks = representation_ranks(rows.float(), tol=self.repr_tol)
            metrics[tag("rank", "repr_effective", name)] = ranks.effective_rank
            metrics[tag("rank", "repr_participation", name)] = ranks.participation_ratio
            metrics[tag("rank", "repr_numerical", name)] = ranks.numerical_rank
        if self.jacobian_points:
            points, wrt = self._jacobian_points(batch)
            first = points if wrt is None else points[wrt]
            entries = outputs[0].numel() * first[0].numel()
            if entries > MAX_JACOBIAN_ENTRIES:
                raise ValueError(
                    f"RankMonitor(jacobian_points={self.jacobian_points}): each input-output Jacobian would hold "
                    f"{outputs[0].numel()} x {points[0].numel()} = {entries} entries (above {MAX_JACOBIAN_ENTRIES}); "
                    "set jacobian_points=0 for a model this large"
                )
            try:
                with running_statistics(pl_module):  # a per-sample Jacobian needs a sample-wise function
                    ranks_j, logdets = jacobian_rank(pl_module, points, tol=self.repr_tol, wrt=wrt)
            except torch.linalg.LinAlgError:  # a non-finite Jacobian: logged as NaN, with a warning
                ranks_j, logdets = [math.nan], [math.nan]
            metrics["rank/jacobian_numerical"] = sum(ranks_j) / len(ranks_j)
            metrics["rank/jacobian_logdet"] = sum(logdets) / len(logdets)
        return metrics

    def _matrices(self) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, matrix)`` of every weight analysed; under FSDP2 each gathered in turn (a collective on every rank)."""
        for name, module in self._weight_modules.items():
            yield name, full(module.weight.detach())
        for name, stack in self._stacks.items():
            whole = full(stack.detach())
            for i, matrix in enumerate(whole.reshape(-1, *whole.shape[-2:])):
                yield f"{name}.{i}", matrix

    def _jacobian_points(self, batch: Any) -> tuple[Any, str | None]:
        """The first ``jacobian_points`` probe inputs, and for a Hugging Face batch the real-valued entry to differentiate."""
        points, wrt = batch_inputs(batch, owner="RankMonitor(jacobian_points=...)"), None
        if isinstance(points, ModelKwargs):
            wrt = next((k for k in HF_INPUT_KEYS if isinstance(points.get(k), torch.Tensor) and points[k].is_floating_point()), None)
        real = points[wrt] if wrt is not None else points
        if not isinstance(real, torch.Tensor) or not real.is_floating_point():
            raise ValueError(
                f"RankMonitor(jacobian_points={self.jacobian_points}): the input-output Jacobian needs real-valued "
                f"inputs, but the probe inputs are {_describe(points)} (integer token ids have no derivative); "
                "set jacobian_points=0"
            )
        if wrt is None:
            return points[: self.jacobian_points], None
        first = ModelKwargs((k, v[: self.jacobian_points] if isinstance(v, torch.Tensor) else v) for k, v in points.items())
        first.labels = None if points.labels is None else points.labels[: self.jacobian_points]
        return first, wrt

    def _check_features(self, features: Mapping[str, torch.Tensor], n: int) -> None:
        """Every representation layer ran on the probe and gives one row per sample."""
        unused = [name for name in self._repr_modules if name not in features or not _per_sample(features[name], n)]
        if unused and self.layers is None:  # a default layer with no per-sample output has no representation rank
            rank_zero_info(
                f"RankMonitor: layers {unused} are not called by the forward pass or give no per-sample output "
                "(e.g. a position embedding); no representation rank for them"
            )
            self._repr_modules = {k: m for k, m in self._repr_modules.items() if k not in unused}
        for name in self._repr_modules:
            if name not in features:
                raise ValueError(
                    f"RankMonitor(layers=...): module {name!r} was not called by the forward pass on the probe batch; "
                    "remove it from `layers`"
                )
            if not _per_sample(features[name], n):
                raise ValueError(
                    f"RankMonitor(layers=...): the output of {name!r} has shape {tuple(features[name].shape)}, not one row "
                    f"per probe sample ({n}); it does not depend on the sample (e.g. a position embedding): remove it from `layers`"
                )


#: The largest input-output Jacobian (per point) RankMonitor builds: 2**25 entries, 128 MB in float32.
MAX_JACOBIAN_ENTRIES = 2**25
_WEIGHT_TAGS = ("weight_stable", "weight_above", "weight_near_one", "weight_fro_sq")
_REPR_TAGS = ("repr_effective", "repr_participation", "repr_numerical")


def _per_sample(features: torch.Tensor, n: int) -> bool:
    return features.ndim > 0 and features.shape[0] == n


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)}"
    if isinstance(x, Mapping):
        return "model keyword inputs " + ", ".join(f"{k}: {_describe(v)}" for k, v in x.items())
    return type(x).__name__


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _has_matrix_weight(module: torch.nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2
