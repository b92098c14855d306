"""NTKSpectrum: the empirical NTK on a fixed probe batch during training (Day, Kahn & Roberts; Noci et al.)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lightning_align.arguments import (
    Bound,
    Count,
    Name,
    NonNegativeFloat,
    NonNegativeInt,
    Patterns,
    PositiveFloat,
    Seed,
    argument_error,
)
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.callbacks.checkpoint_state import PROBE_SETTINGS, read_int, read_tensor, refusal
from lightning_align.callbacks.probe import slice_batch
from lightning_align.measure.batch import batch_size_of, batch_targets
from lightning_align.measure.census import unfused_transformer_layers
from lightning_align.measure.sequence import SequenceReduced, padding_key
from lightning_align.figures import spectrum
from lightning_align.logging import log_figure, log_histogram
from lightning_align.measure.ntk import (
    MAX_MEMORY_GB,
    check_sample_independent,
    kernel_distance,
    kernel_target_alignment,
    ntk_spectrum,
    ntk_summary,
)
from lightning_align.schedules import MaxOverhead, ScheduleName

PREFIX = "model.module."  # parameter names of the differentiated model: SequenceReduced(ProbeOutputs(pl_module))

NTKSolver = Literal["auto", "exact", "lanczos"]
SequenceOutput = Literal["mean", "last", "all"]


class NTKSpectrum(MeasurementCallback):
    """Top eigenvalues, trace, condition number and kernel-target alignment of the empirical NTK.

    The NTK ``K = J Jᵀ`` (``J`` the Jacobian of the outputs on a fixed probe batch with respect to the
    parameters) governs how gradient descent moves the function; its top eigenvalue bounds the stable
    learning rate (with MSE, the GGN's ``λ_max`` is ``λ_max(K)/n``). Under μP its top eigenvalues keep
    gaining width dependence during training while the sharpness does not (Noci et al. 2024);
    how far the kernel moves from its value at the start (``distance_from_init``) is the feature-learning
    indicator (0 in the lazy/NTK regime).

    Logged every ``every_n_steps`` optimizer steps and at step 0 (the kernel is ``(n·c) × (n·c)``, ``n`` the
    probe size, ``c`` the outputs per sample; ``(n × n)`` with ``trace_outputs=True``):

    - ``ntk/max_eig``, ``ntk/trace``, and the top-``k`` spectrum as the TensorBoard histogram
      ``ntk/eigenvalues`` (plus a figure ``ntk/spectrum`` every ``figure_every`` measurements);
    - exact path only (the kernel is built when its size is at most ``max_exact_size``; ``solver="exact"``
      refuses a larger one): ``ntk/cond`` (``inf`` when numerically singular), ``ntk/effective_rank``,
      ``ntk/alignment`` (``yᵀKy/(‖K‖_F‖y‖²)``, class labels one-hot; off with ``alignment=False``) and
      ``ntk/distance_from_init`` (``1 − <K₀,K>/(‖K₀‖‖K‖)``, ``K₀`` the kernel at the first measurement)
      and ``ntk/velocity`` (the same distance to the previous measurement's kernel; from the second
      measurement on). Both reference kernels are kept across a resume. On the matrix-free path (Lanczos on
      ``J(Jᵀv)``) these need the whole kernel and are not logged; a warning says so once. There ``ntk/trace``
      is the Hutch++ estimate (exact on the Lanczos basis, ``trace_samples`` Hutchinson samples on the rest)
      and ``ntk/trace_stderr`` its standard error; ``ntk/matvecs`` counts the kernel-vector products.

    Sequence models (outputs ``(n, T, c)``, e.g. a language model's logits; Hugging Face ``ModelOutput`` gives
    ``.logits``) are reduced over positions by ``sequence_output``: ``"mean"`` (the default: the kernel of the
    position-averaged output, ``n·c`` rows), ``"last"`` (the last position, the next-token prediction of a
    causal LM) or ``"all"`` (every position, ``n·T·c`` rows). With padding (a Hugging Face ``attention_mask``; for an
    encoder-decoder ``decoder_attention_mask`` or the labels' ``-100``) ``"mean"`` averages over the unpadded
    positions, ``"last"`` takes the last unpadded one per sequence and ``"all"`` is refused (``docs/callbacks.md``,
    "Sequence outputs and padding"). A kernel above ``max_rows`` rows is refused,
    naming the argument to change, and so is a measurement whose memory estimate (from one sample's forward,
    before anything is built) exceeds ``max_memory_gb``; the exact path is taken only when it fits.

    BatchNorm in train mode mixes samples, so the per-sample kernel is undefined: probes use running
    statistics (``bn_mode="eval"``, the default; ``"train"`` is refused). Dropout is off during probes.
    Every rank measures the whole probe (no collective), so all ranks log the same values.

    Cost: exact path, one ``vmap(jacrev)`` pass over the probe with respect to the layer outputs plus a
    Gram contraction (``≈ n²c²`` times the summed layer widths for MLPs), then one ``eigh`` of the kernel;
    matrix-free, one forward with its graph kept, then two backward passes per kernel-vector product
    (warm-started from the previous eigenvectors) and one per trace sample. On the example GPT (width 128,
    depth 4, 64 tokens, probe 32: an 8,192-row kernel) that is ~1 GB at most (``docs/speed.md``).

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0). The default (1000) and the
            small default probe make it cheap enough to leave on (measured shares: README, "Speed and overhead").
        k: number of top eigenvalues to compute and log as a spectrum.
        trace_outputs: use the ``(n, n)`` kernel summed over outputs.
        solver: the eigensolver: ``"auto"`` (exact up to ``max_exact_size``), ``"exact"`` (build the kernel, ``eigh``)
            or ``"lanczos"`` (matrix-free).
        max_exact_size: largest kernel size built: above it ``"auto"`` is matrix-free and ``"exact"`` is refused
            (before anything is built).
        weights: the parameters the Jacobian is taken with respect to: *parameter* names or regexes (full match)
            of the LightningModule, e.g. ``"readout.weight"`` or ``r"blocks\\.0\\..*"`` (a module's name alone
            matches none of its parameters); default all trainable ones.
        alignment: log the kernel-target alignment: ``True`` requires targets matching the outputs (class
            labels, or real targets of the output's shape), ``None`` (the default) logs it when they match and
            says once when they do not (e.g. token targets of a language model), ``False`` never.
        sequence_output: ``"mean"``, ``"last"`` or ``"all"`` positions of a sequence output (see above).
        max_rows: the largest kernel (``n·c`` rows) measured at all, exact or matrix-free.
        max_memory_gb: memory budget of one measurement in GiB (estimated before anything is built; ``None``: no
            check). ``"auto"`` builds the kernel only when that fits; a matrix-free measurement above it is refused.
        trace_samples: Hutchinson samples of the matrix-free path's trace estimate (one VJP each).
        histograms: log the spectrum as a TensorBoard histogram.
        figure_every: log a log-scale plot of the top-``k`` spectrum to TensorBoard every this many measurements
            (0, the default: never).
        tol, max_matvecs: Lanczos settings of the matrix-free path.
        schedule, max_overhead, probe_size, probe_seed, bn_mode, name: shared by every callback; see "Arguments every callback
            shares" in ``docs/callbacks.md`` (``probe_size`` defaults to 32 here: the kernel is ``(probe_size·c)²``
            and its eigendecomposition cubic).

    Example::

        trainer = Trainer(callbacks=[NTKSpectrum(every_n_steps=50, k=10, probe_size=64)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.NTKSpectrum
              init_args: {every_n_steps: 50, k: 10, probe_size: 64}
    """

    family = "ntk"
    sharded_refusal = (
        "the kernel is built from Jacobians taken with torch.func over every parameter at once, and under FSDP2 "
        "the forward pass swaps in its own gathered parameters (a finite-difference Jacobian would cost two "
        "forward passes per probe output)."
    )
    headlines = (
        Headline("ntk", "NTK max eigenvalue", r"ntk/max_eig"),
        Headline("ntk", "NTK condition number", r"ntk/cond"),
        Headline("ntk", "NTK distance from init", r"ntk/distance_from_init"),
        Headline("ntk", "kernel-target alignment", r"ntk/alignment"),
    )
    charts = {
        "NTK max eigenvalue": ["Multiline", [r"^ntk/max_eig$"]],
        "NTK trace": ["Multiline", [r"^ntk/trace$"]],
        "NTK distance from init and velocity": ["Multiline", [r"^ntk/(distance_from_init|velocity)$"]],
        "NTK condition number": ["Multiline", [r"^ntk/cond$"]],
        "NTK effective rank": ["Multiline", [r"^ntk/effective_rank$"]],
        "kernel-target alignment": ["Multiline", [r"^ntk/alignment$"]],
    }

    state_settings = (*PROBE_SETTINGS, "weights", "trace_outputs", "sequence_output")  # the reference kernels'

    def dashboard_charts(self) -> dict[str, list[Any]]:
        return {t: c for t, c in self.charts.items() if self.alignment is not False or t != "kernel-target alignment"}

    def __init__(
        self,
        every_n_steps: Count = 1000,
        k: Count = 10,
        *,
        trace_outputs: bool = False,
        solver: NTKSolver = "auto",
        max_exact_size: Count = 2048,
        weights: Patterns | None = None,
        alignment: bool | None = None,
        sequence_output: SequenceOutput = "mean",
        max_rows: Count = 65536,
        max_memory_gb: PositiveFloat | None = MAX_MEMORY_GB,
        trace_samples: Annotated[int, Bound(2, note="for a standard error")] = 8,
        histograms: bool = True,
        figure_every: NonNegativeInt = 0,
        tol: NonNegativeFloat = 1e-4,
        max_matvecs: Count = 100,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 32,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "eval",
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, name=name
        )
        if bn_mode != "eval":
            raise argument_error(
                self, "bn_mode", bn_mode, "'eval'",
                detail=" (BatchNorm with batch statistics mixes samples, so the per-sample NTK is undefined)",
                remedy="use bn_mode='eval' (running statistics, the default)",
            )
        self.k = k
        self.trace_outputs = trace_outputs
        self.solver = solver
        self.max_exact_size = max_exact_size
        self.weights = weights
        self.alignment = alignment
        self.sequence_output = sequence_output
        self.max_rows = max_rows
        self.max_memory_gb = max_memory_gb
        self.trace_samples = trace_samples
        self._alignment_skipped = False
        self.histograms = histograms
        self.figure_every = figure_every
        self.num_measurements = 0
        self.tol = tol
        self.max_matvecs = max_matvecs
        self._param_names: list[str] | None = None
        self._k0: torch.Tensor | None = None
        self._k_prev: torch.Tensor | None = None
        self._warm: torch.Tensor | None = None
        self._warned_matrix_free = False

    # ----------------------------------------------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainable = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"NTKSpectrum: {type(pl_module).__name__} has no trainable parameter")
        if self.weights is None:
            self._param_names = None
            return
        chosen: set[str] = set()
        for pattern in self.weights:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"NTKSpectrum(weights=...): {pattern!r} is not a valid regular expression: {err}") from err
            hits = [n for n in trainable if n == pattern or regex.fullmatch(n)]
            if not hits:
                raise ValueError(
                    f"NTKSpectrum(weights=...): {pattern!r} matches no trainable parameter of {type(pl_module).__name__}. "
                    f"Trainable names include: {', '.join(trainable[:20])}{' ...' if len(trainable) > 20 else ''}"
                )
            chosen.update(hits)
        self._param_names = [n for n in trainable if n in chosen]

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        check_sample_independent(pl_module, owner="NTKSpectrum")
        model, rows = self._reduced_outputs(pl_module, batch)
        # Targets are checked before the kernel is built: a mismatch costs nothing
        targets = self._targets(batch, batch_size_of(batch) if self.trace_outputs else rows) if self.alignment is not False else None
        params = None if self._param_names is None else [re.escape(PREFIX + n) for n in self._param_names]
        try:
            res = ntk_spectrum(
                model, batch, self.k, self.trace_outputs, solver=self.solver, max_exact_size=self.max_exact_size,
                tol=self.tol, max_matvecs=self.max_matvecs, init=self._warm, params=params,
                generator=torch.Generator().manual_seed(self.probe_seed), return_vectors=False,
                trace_samples=self.trace_samples, max_memory_gb=self.max_memory_gb,
            )
        except ValueError as err:
            raise ValueError(f"NTKSpectrum (probe_size={self.probe_size}, k={self.k}): {err}") from err
        except torch.linalg.LinAlgError:  # a non-finite kernel (NaN/Inf in the probe or the weights)
            exact_tags = ("ntk/cond", "ntk/effective_rank", "ntk/distance_from_init") + (("ntk/alignment",) if targets is not None else ())
            return dict.fromkeys(("ntk/max_eig", "ntk/trace", *exact_tags), math.nan)  # logged with a warning
        values = res.values
        metrics: dict[str, float] = {"ntk/max_eig": float(values[0])}
        if res.kernel is not None:
            kernel = res.kernel
            summary = ntk_summary(kernel, eigenvalues=res.eigenvalues)
            metrics.update({"ntk/trace": summary.trace, "ntk/cond": summary.cond, "ntk/effective_rank": summary.effective_rank})
            if targets is not None:
                metrics["ntk/alignment"] = kernel_target_alignment(kernel, targets)
            metrics.update(self._distances(kernel))
        else:
            if bool(torch.isfinite(res.vectors).all()):  # a NaN warm start would stick
                self._warm = res.vectors.detach()
            metrics["ntk/trace"] = math.nan if res.trace is None else res.trace
            metrics["ntk/trace_stderr"] = math.nan if res.trace_stderr is None else res.trace_stderr
            metrics["ntk/matvecs"] = res.num_matvecs
            if not self._warned_matrix_free:
                self._warned_matrix_free = True
                rank_zero_warn(
                    f"NTKSpectrum: the kernel ({res.vectors.shape[0]} rows) is larger than max_exact_size="
                    f"{self.max_exact_size} (or solver='lanczos'), so only ntk/max_eig, ntk/trace and the top-{self.k} "
                    "spectrum are logged; ntk/cond, ntk/effective_rank, ntk/alignment and ntk/distance_from_init need "
                    "the whole kernel (raise max_exact_size or lower probe_size to get them)."
                )
        if self.histograms:
            log_histogram(trainer, "ntk/eigenvalues", values)
        if self.figure_every and self.num_measurements % self.figure_every == 0:
            title = f"top-{len(values)} NTK eigenvalues, step {trainer.global_step}"
            log_figure(trainer, "ntk/spectrum", lambda: spectrum(values.tolist(), ylabel="NTK eigenvalue", title=title))
        self.num_measurements += 1
        return metrics

    # ----------------------------------------------------------------------------------------------
    def _reduced_outputs(self, pl_module: pl.LightningModule, batch: Any) -> tuple[nn.Module, int]:
        """The differentiated model (sequence outputs reduced by ``sequence_output``, padding left out) and its kernel
        rows; a kernel above ``max_rows`` rows is refused before anything is built (one sample's forward to count)."""
        outputs = self.probe_outputs_model(pl_module)
        with torch.no_grad(), unfused_transformer_layers():  # as the kernel's passes (with grad) run it
            raw = outputs(slice_batch(batch, 1))
        sequence = raw.ndim >= 3
        padding = padding_key(outputs, batch, raw.shape[1], self.sequence_output, owner="NTKSpectrum") if sequence else None
        per_sample = raw[0, 0].numel() if sequence and self.sequence_output != "all" else raw[0].numel()
        rows = per_sample * batch_size_of(batch)
        if rows > self.max_rows:
            raise ValueError(
                f"NTKSpectrum: the kernel would have {rows} rows ({batch_size_of(batch)} probe samples x {per_sample} "
                f"outputs each), above max_rows={self.max_rows}; lower probe_size, use sequence_output='mean' or "
                "'last' for a sequence model, or raise max_rows"
            )
        size = batch_size_of(batch) if self.trace_outputs else rows
        if self.solver == "exact" and size > self.max_exact_size:
            raise ValueError(
                f"NTKSpectrum(solver='exact', max_exact_size={self.max_exact_size}): the kernel would be {size}x{size}, "
                "above max_exact_size, so it was not built; raise max_exact_size, lower probe_size, or use solver='auto' "
                "(matrix-free above max_exact_size)"
            )
        return SequenceReduced(outputs, self.sequence_output, padding), rows

    def _targets(self, batch: Any, size: int) -> torch.Tensor | None:
        """Targets matching the kernel, or ``None`` (said once) when they cannot and ``alignment`` is ``None``."""
        try:
            return self._matching_targets(batch, size)
        except ValueError as err:
            if self.alignment:
                raise
            if not self._alignment_skipped:
                self._alignment_skipped = True
                rank_zero_info(f"{err}; ntk/alignment is not logged")
            return None

    def _matching_targets(self, batch: Any, size: int) -> torch.Tensor:
        """Targets as an ``(n, c)`` real matrix matching the kernel (class labels one-hot)."""
        try:
            y = batch_targets(batch)
        except TypeError as err:
            raise ValueError(f"NTKSpectrum(alignment=...): {err}; or set alignment=False") from err
        if not isinstance(y, torch.Tensor):
            raise ValueError(f"NTKSpectrum(alignment=...): the probe targets are {type(y).__name__}, not a tensor; set alignment=False")
        n = y.shape[0] if y.ndim else 0
        c = size // n if n and not self.trace_outputs else None
        if not y.is_floating_point():
            classes = c if c is not None else int(y.max()) + 1
            if y.ndim != 1 or (c is not None and int(y.max()) >= c):
                raise ValueError(
                    f"NTKSpectrum(alignment=...): integer targets of shape {tuple(y.shape)} cannot be one-hot encoded "
                    f"to the model's {c} outputs; set alignment=False or define `probe_outputs`"
                )
            y = torch.nn.functional.one_hot(y.long(), classes).to(torch.float64)
        y = y.reshape(y.shape[0], -1)
        if self.trace_outputs:
            if y.shape[0] != size:
                raise ValueError(f"NTKSpectrum(alignment=...): {y.shape[0]} targets for a kernel over {size} samples")
        elif y.numel() != size:
            raise ValueError(
                f"NTKSpectrum(alignment=...): targets of shape {tuple(y.shape)} do not match the {size} kernel rows "
                "(n samples × c outputs); set alignment=False or make the targets match the outputs"
            )
        return y if self.trace_outputs else y.reshape(-1)

    def _distances(self, kernel: torch.Tensor) -> dict[str, float]:
        current = kernel.detach().float().cpu()
        if self._k0 is not None and self._k0.shape != current.shape:  # e.g. a checkpoint saved without its settings
            rank_zero_warn(
                f"NTKSpectrum: the reference kernel (first measurement or checkpoint) has shape {tuple(self._k0.shape)}, "
                f"the kernel now {tuple(current.shape)}: the probe or the model's outputs changed, so distance_from_init "
                "is measured from here."
            )
            self._k0 = self._k_prev = None
        if self._k0 is None:
            self._k0 = current
        out = {"ntk/distance_from_init": kernel_distance(self._k0, current)}
        if self._k_prev is not None:
            out["ntk/velocity"] = kernel_distance(self._k_prev, current)
        self._k_prev = current
        return out

    def extra_state(self) -> dict[str, Any]:
        return {"k0": self._k0, "k_prev": self._k_prev, "num_measurements": self.num_measurements}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self._warm = None
        self.num_measurements = read_int(self, state, "num_measurements", 0)
        k0, k_prev = (read_tensor(self, state.get(key), key, ndim=2, square=True) for key in ("k0", "k_prev"))
        if k0 is not None and k_prev is not None and k0.shape != k_prev.shape:
            raise refusal(self, "k_prev", k_prev, f"a kernel of the shape of k0, {tuple(k0.shape)}")
        self._k0, self._k_prev = (None if t is None else t.float().cpu() for t in (k0, k_prev))

    def rereference(self, changed: Mapping[str, tuple[Any, Any]]) -> str | None:
        self._k0 = self._k_prev = None
        return "distance_from_init and velocity are measured from the resume point"
