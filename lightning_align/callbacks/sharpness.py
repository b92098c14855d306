"""Sharpness: extreme Hessian eigenvalues of the training loss during training (super consistency)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_align.arguments import Count, Name, NonNegativeFloat, Seed, argument_error
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.callbacks.checkpoint_state import read_tensor
from lightning_align.figures import plottable
from lightning_align.logging import log_figure, new_figure, tag
from lightning_align.measure.hessian import SpectralDensity, float64_rayleigh_ritz, spectral_density, trace_estimate
from lightning_align.measure.optim import ADAM_LIKE, adam_preconditioner, lr_preconditioner, stability_threshold
from lightning_align.measure.operators import FlatOperator, Method, hessian_operator
from lightning_align.measure.sharded import finite_difference_hessian, local
from lightning_align.measure.warm_start import WarmStart, operator_key
from lightning_align.measure.certified import CertifiedEigs, certified_extremes
from lightning_align.schedules import MaxOverhead, ScheduleName


#: Largest relative change of the top Rayleigh quotient when the finite-difference step is halved (FSDP2) for
#: which the sharded estimate is trusted; smooth models give ~1e-5 in float32, ReLU networks 1e-2 and more.
FD_CONSISTENCY_LIMIT = 1e-3


class Sharpness(MeasurementCallback):
    """Top (and bottom) Hessian eigenvalues of the training loss on a fixed probe batch.

    The sharpness ``λ_max`` of the training-loss Hessian, times the learning rate, is the
    edge-of-stability figure: gradient descent is stable on a quadratic while ``lr · λ_max < 2``
    (Cohen et al. 2021), and under μP the LR-rescaled sharpness is the same at every width (super
    consistency, Noci et al. 2024). For Adam the relevant quantity is the *preconditioned* sharpness
    ``lr · λ_max(P^{-1} H)`` with ``P = diag(sqrt(v̂) + eps)``, compared with ``2 (1 + β1) / (1 - β1)``
    (Cohen et al. 2022).

    Eigenvalues come from Lanczos with full re-orthogonalisation on Hessian-vector products, warm-started from
    the previous top/bottom vectors (kept in the callback's ``state_dict``, so a resumed run stays warm), and are
    *certified*: reported only when a check can tell they are the top (bottom) ones to ``tol``, NaN otherwise
    (below). Top and bottom come from one Krylov space. The
    Hessian is that of the training objective: BatchNorm uses batch statistics (buffers restored;
    ``bn_mode="eval"`` for running statistics), dropout is off. Under DDP the probe is split over
    ranks and every product all-reduced, so every rank logs the same values.

    Logged (``<i>`` = 2..k):

    - ``sharpness/max_eig``, ``sharpness/eig_<i>``: the top ``k`` eigenvalues of ``H``;
    - ``sharpness/min_eig`` (``min_eig=True``): the smallest eigenvalue (negative: non-convexity);
    - ``sharpness/lr_x_max_eig``: ``lr · λ_max(H)`` for SGD and other optimizers when every param group
      has the same ``lr``; with per-group learning rates (μP, per-layer control) ``λ_max(D H D)`` with
      ``D² = lr`` of each parameter's group (one more Lanczos run, warm-started); for Adam/AdamW (``preconditioned``) ``λ_max(D H D)`` with
      ``D² = lr / (sqrt(v̂) + eps)`` per parameter (each param group's own ``lr``), i.e. the
      preconditioned ``lr · λ_max(P^{-1} H)``;
    - ``sharpness/preconditioned_max_eig`` (Adam): ``λ_max(P^{-1} H)`` (= ``lr_x_max_eig / lr``);
    - ``sharpness/threshold``: where ``lr_x_max_eig`` becomes unstable: 2 for plain SGD,
      ``2 (1 + μ)`` with momentum ``μ`` (``2 (1 + μ) / (1 + 2μ)`` Nesterov), ``2 (1 + β1) / (1 - β1)``
      for Adam (38 at β1 = 0.9);
    - ``sharpness/eos_ratio``: ``lr_x_max_eig / threshold`` (1 = at the edge of stability);
    - ``sharpness/max_eig_residual``: Ritz residual ``‖H y - θ y‖`` of ``max_eig`` (the stop test's quantity);
    - ``sharpness/certified``: 1 when every eigenvalue of the measurement is certified, 0 when some are NaN;
    - ``sharpness/matvecs``: Hessian-vector products used by this measurement (checks and recoveries included);
    - ``sharpness/fd_consistency`` (FSDP2, or finite-difference products on one process): relative change of the top Rayleigh quotient when the
      finite-difference step is halved;
    - ``sharpness/probe_loss``: the loss on the probe batch;
    - ``sharpness/trace``, ``sharpness/trace_stderr`` (``trace=True``);
    - ``sharpness/density`` (``density=True``): the SLQ spectral density as a TensorBoard figure.

    For Adam the preconditioned tags start after the first optimizer step (there is no ``v̂`` before it).
    Several optimizers (manual optimization): ``lr_x_max_eig``, ``preconditioned_max_eig``, ``threshold`` and
    ``eos_ratio`` are not logged (one learning rate and one threshold do not describe them), said at fit start.

    Under ``ModelParallelStrategy`` with FSDP2 (``DTensor`` parameters) the products are central finite
    differences of two gradients through the model's own backward (:class:`~lightning_align.measure.sharded.
    FiniteDifferenceHessian`; exact double backward cannot reach sharded parameters) and Lanczos runs on each
    rank's slice; ``sharpness/fd_consistency`` logs how much the top Rayleigh quotient moves when the step is
    halved (two more products): above 1e-3 the loss is not smooth at that scale (ReLU networks) and the
    eigenvalues are logged as NaN, with a warning. ``trace``, ``density`` and ``gradient_check`` are refused
    there.

    Certified values (:mod:`~lightning_align.measure.certified`): a residual says an eigenvalue lies near a Ritz
    value, not that none lies above it (a warm start from a vector that another eigenvalue has just overtaken, or
    a gradient almost orthogonal to the top, converges on the second one). Each solve (``λ_max`` with ``k``,
    ``min_eig``, and the preconditioned one) runs Lanczos until the residuals' norm is ``<= tol · |λ_max| / 2``,
    then a check: Lanczos on the rest of the spectrum (the found vectors projected out) from a fresh random vector,
    until a bound on where the rest can lie (it holds with probability ``>= 0.998`` whatever the spectrum) shows
    every reported value within ``tol · |λ_max|`` of its eigenvalue. A check that finds a larger direction, or
    next values it cannot separate in time, adds them to the solve, which restarts from all of them (at most
    twice). A value that cannot be certified in ``max_matvecs`` products per run is logged as NaN, with one
    warning per fit naming the step and the remedy; never the second eigenvalue in place of the first.

    Cost per measurement: one forward and one ``create_graph`` backward, then one backward per product: the
    main run (a warm start: a few products in a smooth run, more as the top eigenvector moves) and the check
    (~10-20 products where the top stands out, up to ``max_matvecs`` where the next eigenvalues crowd it; none
    when the parameters and gradient are those of the last certified measurement); twice that for Adam; plus
    ``trace_basis + trace_samples`` for the trace and ``density_steps · density_vectors`` for the density;
    ``min_eig=True`` about doubles it. Measured products per estimate, before and after certification, and
    shares of training time: ``docs/speed.md``.

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0). The default (1000) is sparse
            enough to leave on (measured shares: README, "Speed and overhead").
        k: number of top eigenvalues.
        min_eig: also the smallest eigenvalue (from the same Lanczos run; off by default: a warm-started
            measurement then needs about twice the Hessian-vector products).
        trace: log a Hutch++-style trace estimate and its standard error.
        density: log the spectral density figure (stochastic Lanczos quadrature).
        preconditioned: the Adam-preconditioned sharpness: ``None`` = when the (single) optimizer is
            Adam or AdamW, ``True`` = required (error otherwise), ``False`` = never.
        tol: every logged eigenvalue is certified within ``tol · |λ_max|`` of the true one (``λ_max`` lies in
            ``[max_eig, max_eig + tol · |max_eig|]``; ``min_eig``: ``tol · max(|λ_max|, |λ_min|)``), else NaN; the
            Lanczos runs stop when the residual norm is ``<= tol · |λ_max| / 2``. For a top eigenvalue separated by
            a gap the error is about ``residual² / gap``, so the default 1e-2 typically gives ``λ_max`` to ~1e-4
            relative (see ``benchmarks/sharpness.py``).
        max_matvecs: most Hessian-vector products per Lanczos run (the main run, the check, each recovery).
        warm_start: start Lanczos from the previous eigenvectors (and, before there are any, from the loss
            gradient, which lies close to the top eigenvectors, mixed with a random vector); False: random starts.
        trace_samples: Hutchinson samples of the trace.
        trace_basis: Lanczos steps of the trace's exact low-rank part.
        density_steps: Lanczos steps per density vector.
        density_vectors: random vectors of the density.
        method: Hessian-vector product method (``"auto"``, ``"double_backward"``, ``"forward"``,
            ``"finite_difference"``; see :func:`~lightning_align.measure.operators.hessian_operator`). ``"auto"``:
            double backward; through an op that has none (``embedding_bag``, a ``@once_differentiable`` custom
            function; ``hardsigmoid`` and attention run as exact equivalents) forward-over-reverse where it is
            exact and runs, else central finite differences of two gradients for the rest of the fit, checked as
            under FSDP2 (``sharpness/fd_consistency``; NaN above 1e-3), with one warning naming the op.
        gradient_check: warm starts also take the current loss gradient as a start direction (the first step is
            a Rayleigh-Ritz on the previous top vector and the gradient: one more product, two more when the top
            vector moved). The gradient leans towards a new top, so the main run more often finds an eigenvalue
            that has overtaken the previous top itself instead of the check finding it (the check is there either
            way: this only moves products between the two).
        high_precision: Lanczos vectors in float64 and a final Rayleigh-Ritz step on each Ritz vector with the
            Hessian evaluated in float64 (float64 copies of the parameters, buffers and inputs: one float64 forward,
            backward and product; the model is untouched), reporting its true residual. With ``tol <= 1e-4`` it gives
            ``λ_max`` to ~1e-8 relative on float32 models, where float32 products stop at 1e-7-1e-6
            (``benchmarks/sharpness.py``). Under DDP, and for the preconditioned run, the last step is in float32.
        seed: seed of the random start vectors (the same on every rank).
        schedule, max_overhead, probe_size, probe_seed, bn_mode, dropout, name: shared by every callback; see "Arguments every
            callback shares" in ``docs/callbacks.md``.

    Raises:
        ValueError: bad arguments; at fit start: a model without trainable parameters, more
            eigenvalues than parameters, ``preconditioned=True`` without a single Adam/AdamW optimizer.

    Example::

        trainer = Trainer(callbacks=[Sharpness(every_n_steps=50, probe_size=256, min_eig=True)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.Sharpness
              init_args: {every_n_steps: 100, k: 1, trace: true}
    """

    family = "sharpness"
    needs_loss = True
    headlines = (
        Headline("sharpness", "λmax (top Hessian eigenvalue)", r"sharpness/max_eig"),
        Headline("sharpness", "lr·λmax", r"sharpness/lr_x_max_eig", bar="lr*eig"),
        Headline("sharpness", "lr·λmax / threshold", r"sharpness/eos_ratio"),
    )
    charts = {
        "lr·λmax vs threshold (LR units)": ["Multiline", [r"^sharpness/lr_x_max_eig$", r"^sharpness/threshold$"]],
        "top Hessian eigenvalues": ["Multiline", [r"^sharpness/(max_eig|eig_\d+|preconditioned_max_eig)$"]],
        "smallest Hessian eigenvalue": ["Multiline", [r"^sharpness/min_eig$"]],
        "Hessian trace": ["Multiline", [r"^sharpness/trace$"]],
    }

    def dashboard_charts(self) -> dict[str, list[Any]]:
        off = {"smallest Hessian eigenvalue": not self.min_eig, "Hessian trace": not self.trace}
        return {title: chart for title, chart in self.charts.items() if not off.get(title, False)}
    shard_probe = True  # every Hessian-vector product is all-reduced over ranks
    sharded_refusal = None  # finite-difference products through the model's own backward, Lanczos on local slices

    def __init__(
        self,
        every_n_steps: Count = 1000,
        k: Count = 1,
        *,
        min_eig: bool = False,
        trace: bool = False,
        density: bool = False,
        preconditioned: bool | None = None,
        tol: NonNegativeFloat = 1e-2,
        max_matvecs: Count = 50,
        warm_start: bool = True,
        trace_samples: Count = 16,
        trace_basis: Count = 8,
        density_steps: Count = 30,
        density_vectors: Count = 1,
        method: Method = "auto",
        gradient_check: bool = False,
        high_precision: bool = False,
        seed: Seed = 0,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "train",
        dropout: bool = False,
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, dropout=dropout,
            name=name,
        )
        if max_matvecs < k + int(min_eig):
            raise argument_error(
                self, "max_matvecs", max_matvecs, f"at least k{' + 1' if min_eig else ''} = {k + int(min_eig)}",
                detail=f" (Lanczos needs a product per eigenvalue asked for: k={k}, min_eig={min_eig})",
                remedy="lower k or raise max_matvecs",
            )
        self.k = k
        self.min_eig = min_eig
        self.trace = trace
        self.density = density
        self.preconditioned = preconditioned
        self.tol = float(tol)
        self.max_matvecs = max_matvecs
        self.warm_start = warm_start
        self.trace_samples = trace_samples
        self.trace_basis = trace_basis
        self.density_steps = density_steps
        self.density_vectors = density_vectors
        self.method = method
        self.gradient_check = bool(gradient_check)
        self.high_precision = bool(high_precision)
        self.seed = seed
        self._warm = WarmStart()  # previous top [and bottom] eigenvectors, more columns, the certificate
        self._pre_warm = WarmStart()  # the same for the preconditioned top eigenvector
        self._certified = True
        self._warned_uncertified = False
        self._loss = math.nan  # the probe loss of the measurement running (in the operator's fingerprint)
        self._use_preconditioner = False
        self._refine64: Any = None
        self._warned_rough = False
        self._fallback: Method | None = None  # the products "auto" fell back to, kept for the rest of the fit
        self._missing: str | None = None  # the op without a double backward that made it fall back
        self.last_density: SpectralDensity | None = None

    # ----------------------------------------------------------------------------------------------
    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
        owner = type(pl_module).__name__
        if n == 0:
            raise ValueError(
                f"Sharpness: {owner} has no trainable parameters (none with requires_grad=True): "
                "there is no Hessian to measure; unfreeze parameters or remove the callback."
            )
        wanted = self.k + int(self.min_eig)
        if wanted > n:
            raise ValueError(
                f"Sharpness(k={self.k}, min_eig={self.min_eig}) asks for {wanted} eigenvalues, but {owner} has "
                f"only {n} trainable parameters; lower k."
            )
        optimizers = trainer.optimizers
        adam = len(optimizers) == 1 and isinstance(optimizers[0], ADAM_LIKE)
        if len(optimizers) > 1:
            rank_zero_info(
                f"Sharpness: {owner} has {len(optimizers)} optimizers, so lr_x_max_eig, threshold and eos_ratio are not "
                "logged (one learning rate and one threshold do not describe them); max_eig is the probe loss's."
            )
        if self.preconditioned is True and not adam:
            kinds = [type(o).__name__ for o in optimizers] or ["none"]
            raise ValueError(
                f"Sharpness(preconditioned=True) needs a single Adam or AdamW optimizer, got {kinds}; "
                "set preconditioned=None (auto) or False."
            )
        self._use_preconditioner = adam and self.preconditioned is not False
        if self.shard_layout is not None:
            self._validate_sharded()
            return
        for name in ("_warm", "_pre_warm"):
            vec = getattr(self, name).vectors
            if vec is not None and vec.shape[0] != n:
                rank_zero_warn(
                    f"Sharpness: the saved warm-start vectors have {vec.shape[0]} entries but {owner} has {n} "
                    "trainable parameters; starting cold."
                )
                setattr(self, name, WarmStart())

    def _validate_sharded(self) -> None:
        """What the finite-difference route on sharded parameters cannot do, refused at fit start."""
        unavailable = [name for name, on in (("trace", self.trace), ("density", self.density),
                                             ("gradient_check", self.gradient_check)) if on]
        if self.method != "auto":
            unavailable.append(f"method={self.method!r}")
        if unavailable:
            raise ValueError(
                f"Sharpness: {', '.join(unavailable)} is not available on FSDP2-sharded parameters (Hessian-vector "
                "products there are finite differences of two gradients, and Lanczos runs on each rank's slice); "
                "turn it off, or train with strategy='ddp'."
            )

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        if self.shard_layout is not None:
            return self._measure_sharded(trainer, pl_module, batch)
        reduce = (lambda t: self.all_reduce_mean(trainer, t)) if trainer.world_size > 1 else None
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        loss_model = self.probe_loss_model(pl_module)
        method = self._fallback or self.method  # "auto" left double backward once (an op without one): not again
        with contextlib.ExitStack() as stack:
            try:
                op = stack.enter_context(
                    hessian_operator(loss_model, _identity_loss, (batch, None), method=method, reduce=reduce, owner="Sharpness")
                )
            except ValueError as err:
                raise ValueError(str(err) if str(err).startswith("Sharpness") else f"Sharpness on {type(pl_module).__name__}: {err}") from err
            loss = self._loss = float(op.loss if reduce is None else reduce(op.loss.reshape(1)))  # the same on every rank
            if not math.isfinite(loss):
                return self._nan_metrics(trainer, loss)
            self._refine64 = None
            if self.high_precision and reduce is None and method != "finite_difference":  # a float64 Rayleigh-Ritz step
                self._refine64 = lambda vectors: float64_rayleigh_ritz(loss_model, _identity_loss, (batch, None), vectors)
            previous = self._warm.vectors
            metrics = self._eigs(trainer, op, generator)
            if self.method == "auto" and op.method != "double_backward":  # an op without a double backward: for the fit
                self._fallback, self._missing = op.method, op.missing or self._missing
            if op.method == "finite_difference":
                metrics, rough = self._step_halving_check(trainer, op, previous, loss, metrics)
                if rough:
                    return metrics
            if self.trace:
                est = trace_estimate(op, op.dim, self.trace_samples, self.trace_basis, generator, op.dtype, op.device)
                metrics[tag("sharpness", "trace")] = est.value
                metrics[tag("sharpness", "trace_stderr")] = est.stderr
            if self.density:
                self._log_density(trainer, op, generator)
            metrics[tag("sharpness", "matvecs")] = op.num_matvecs
            metrics[tag("sharpness", "probe_loss")] = loss
        return metrics

    def _measure_sharded(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> dict[str, Any]:
        """FSDP2: ``H v`` by central differences of the strategy's own backward (gradients averaged over the
        ranks' probe slices by FSDP's reduce-scatter); vectors are the local slices."""
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step + 7919 * trainer.global_rank)
        loss_model = self.probe_loss_model(pl_module)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with finite_difference_hessian(lambda: loss_model(batch), params, self.shard_layout, richardson=self.high_precision) as op:
            loss = self._loss = float(self.all_reduce_mean(trainer, op.loss.reshape(1)))
            if not math.isfinite(loss):
                return self._nan_metrics(trainer, loss)
            self._refine64 = None
            previous = self._warm.vectors
            metrics, _ = self._step_halving_check(trainer, op, previous, loss, self._eigs(trainer, op, generator))
            metrics[tag("sharpness", "matvecs")] = op.num_matvecs
            metrics[tag("sharpness", "probe_loss")] = loss
        return metrics

    def _step_halving_check(self, trainer: pl.Trainer, op: Any, previous: torch.Tensor | None, loss: float,
                            metrics: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Finite-difference products: ``sharpness/fd_consistency`` on the new top vector, and whether it is above
        ``FD_CONSISTENCY_LIMIT`` (every eigenvalue NaN then, one warning); NaN when Lanczos did not converge (the
        residual says so)."""
        if self._warm.vectors is None or self._warm.vectors is previous:
            metrics[tag("sharpness", "fd_consistency")] = math.nan
            return metrics, False
        consistency = op.consistency(self._warm.vectors[:, 0])
        metrics[tag("sharpness", "fd_consistency")] = consistency
        metrics[tag("sharpness", "matvecs")] = op.num_matvecs
        if consistency > FD_CONSISTENCY_LIMIT:
            return self._rough_loss(trainer, loss, consistency, metrics), True
        return metrics, False

    def _rough_loss(self, trainer: pl.Trainer, loss: float, consistency: float, measured: dict[str, Any]) -> dict[str, Any]:
        """Every eigenvalue tag NaN, with one warning: finite differences do not resolve this loss's Hessian."""
        if not self._warned_rough:
            self._warned_rough = True
            why, remedy = ("(FSDP2)", "strategy='ddp' (exact products)") if self.shard_layout is not None else (
                (f"(no double backward through {self._missing})", f"{self._missing} in a twice-differentiable form (exact)")
                if self._missing else ("(method='finite_difference')", "method='auto' (exact products where it can)")
            )
            rank_zero_warn(
                f"Sharpness {why}: the finite-difference Hessian-vector products change by {consistency:.1e} (more "
                f"than {FD_CONSISTENCY_LIMIT:g}) when their step is halved, on the top eigenvector at step "
                f"{trainer.global_step}: the loss is not smooth at the step's scale (piecewise-linear activations such "
                "as ReLU switch between θ ± h·v), so the eigenvalues are logged as NaN. Use smooth activations (GELU, "
                f"SiLU, tanh) or {remedy} to measure sharpness on this model."
            )
        metrics = self._nan_metrics(trainer, loss)
        metrics[tag("sharpness", "fd_consistency")] = consistency
        metrics[tag("sharpness", "matvecs")] = measured.get(tag("sharpness", "matvecs"), 0)
        return metrics

    def extra_state(self) -> dict[str, Any]:
        if self.shard_layout is not None:  # each rank's slice: a resumed sharded run starts its Lanczos cold
            return {}
        state: dict[str, Any] = {}
        state.update(self._warm.state(""))
        state.update(self._pre_warm.state("preconditioned_"))
        return state

    def load_extra_state(self, state: dict[str, Any]) -> None:
        keys = [f"{prefix}{what}" for prefix in ("", "preconditioned_") for what in ("vectors", "extra_vectors")]
        checked = {key: read_tensor(self, state.get(key), key, ndim=2) for key in keys}
        self._warm, self._pre_warm = WarmStart.of(checked, ""), WarmStart.of(checked, "preconditioned_")
        self._warned_uncertified = False

    # ----------------------------------------------------------------------------------------------
    def _dtype(self, op: FlatOperator) -> torch.dtype:
        return torch.float64 if self.high_precision else op.dtype

    def _solve(
        self, trainer: pl.Trainer, op: FlatOperator, matvec: Any, warm: WarmStart, k: int, bottom: int, generator: torch.Generator,
        sentinel: torch.Tensor | None = None, extra: list[torch.Tensor | None] = (), refine: Any = False, what: str = "λmax",
    ) -> CertifiedEigs:
        """One certified solve (:func:`~lightning_align.measure.certified.certified_extremes`), warm-started from and
        kept in ``warm``; an uncertified one warns once per fit."""
        all_reduce = getattr(op, "all_reduce", None)
        # the operator's fingerprint: the parameters, the gradient and the loss on the probe, the same on every rank
        key = operator_key([*map(local, op.tensors), op.gradient, torch.tensor([self._loss]), *extra], all_reduce)
        res = certified_extremes(
            matvec, op.dim, k, bottom, tol=self.tol, max_matvecs=self.max_matvecs, generator=generator, dtype=self._dtype(op),
            device=op.device, warm=warm.start(op.dim) if self.warm_start else None,
            cold=op.gradient if self.warm_start else None, sentinel=sentinel if self.gradient_check else None,
            all_reduce=all_reduce, global_dim=getattr(op, "global_dim", None),
            refine=refine, key=key, previous=warm.certificate,
        )
        warm.keep(res, op.dtype)
        self._certified &= res.certified
        if not res.certified and not self._warned_uncertified:
            self._warned_uncertified = True
            remedy = ("Look for NaN/inf in the loss's derivatives on the probe batch." if "non-finite" in res.reason else
                      f"Raise max_matvecs (now {self.max_matvecs}, per Lanczos run) or tol.")
            rank_zero_warn(
                f"Sharpness: {what} at step {trainer.global_step} is logged as NaN: it could not be certified as the top "
                f"eigenvalue to tol={self.tol:g} ({res.reason}). {remedy} Warned once per fit."
            )
        return res

    def _eigs(self, trainer: pl.Trainer, op: FlatOperator, generator: torch.Generator) -> dict[str, Any]:
        if self._warm.vectors is not None and self._warm.vectors.shape[0] != op.dim:  # e.g. a backbone unfrozen
            rank_zero_info(
                f"Sharpness: the trainable parameters changed ({self._warm.vectors.shape[0]} -> {op.dim} entries); "
                "the warm start restarts from the loss gradient"
            )
            self._warm, self._pre_warm = WarmStart(), WarmStart()
        self._certified = True
        res = self._solve(trainer, op, op, self._warm, self.k, int(self.min_eig), generator, op.gradient, refine=self._refine(op))
        value = (lambda x: float(x)) if res.certified else (lambda x: math.nan)
        metrics: dict[str, Any] = {tag("sharpness", "max_eig"): value(res.top.values[0])}
        for i in range(1, self.k):
            metrics[tag("sharpness", f"eig_{i + 1}")] = value(res.top.values[i])
        metrics[tag("sharpness", "max_eig_residual")] = float(res.top.residuals[0])
        if res.bottom is not None:
            metrics[tag("sharpness", "min_eig")] = value(res.bottom.values[0])
        optimizer = trainer.optimizers[0] if len(trainer.optimizers) == 1 else None  # several: no LR tags
        if optimizer is not None:
            metrics.update(self._lr_sharpness(trainer, op, optimizer, value(res.top.values[0]), generator))
        metrics[tag("sharpness", "certified")] = float(self._certified)
        return metrics

    def _lr_sharpness(
        self, trainer: pl.Trainer, op: FlatOperator, optimizer: torch.optim.Optimizer, top: float, generator: torch.Generator
    ) -> dict[str, Any]:
        """``lr_x_max_eig``, ``threshold``, ``eos_ratio`` (and ``preconditioned_max_eig`` for Adam)."""
        threshold = stability_threshold(optimizer)
        metrics: dict[str, Any] = {}
        lr = float(optimizer.param_groups[0]["lr"])
        if self._use_preconditioner:
            lr_x = self._preconditioned(trainer, op, adam_preconditioner(optimizer, op.tensors), generator)
            if lr_x is None:
                return metrics
            metrics[tag("sharpness", "preconditioned_max_eig")] = lr_x / lr
        else:
            d = lr_preconditioner(optimizer, op.tensors)  # None: one lr for every parameter
            lr_x = lr * top if d is None else self._preconditioned(trainer, op, d, generator)
        metrics[tag("sharpness", "lr_x_max_eig")] = lr_x
        metrics[tag("sharpness", "threshold")] = threshold
        metrics[tag("sharpness", "eos_ratio")] = lr_x / threshold
        return metrics

    def _refine(self, op: FlatOperator) -> Any:
        """The final Rayleigh-Ritz step: in float64 through the model (one process), else on ``op``, or none."""
        if self._refine64 is None:
            return self.high_precision

        def refine64(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
            if self._refine64 is None:
                return None
            try:
                out = self._refine64(vectors)
            except (RuntimeError, TypeError) as err:  # e.g. a module that mixes dtypes internally
                rank_zero_warn(f"Sharpness(high_precision=True): the float64 refinement failed ({err}); refining in float32")
                self._refine64 = None
                return None
            op.num_matvecs += vectors.shape[1]
            return out

        return refine64

    def _preconditioned(self, trainer: pl.Trainer, op: FlatOperator, d: torch.Tensor | None, generator: torch.Generator) -> float | None:
        """``λ_max(D H D)``, certified and warm-started; ``None`` without ``D`` (before Adam's first step)."""
        if d is None:
            return None
        d = d.to(device=op.device, dtype=self._dtype(op))
        sentinel = None if op.gradient is None else d * op.gradient.to(d)
        # float32 Rayleigh-Ritz: D H D has no float64 operator here
        res = self._solve(trainer, op, lambda v: d * op(d * v), self._pre_warm, 1, 0, generator, sentinel, [d],
                          self.high_precision, "the preconditioned λmax")
        return float(res.top.values[0]) if res.certified else math.nan

    def _log_density(self, trainer: pl.Trainer, op: FlatOperator, generator: torch.Generator) -> None:
        dens = spectral_density(
            op, op.dim, self.density_steps, self.density_vectors, generator=generator, dtype=op.dtype, device=op.device
        )
        self.last_density = dens
        if not bool(torch.isfinite(dens.density).all()):
            return
        step = trainer.global_step

        def draw() -> Any:
            fig, ax = new_figure()
            ax.plot(plottable(dens.grid.tolist()), dens.density.clamp_min(1e-12).numpy())
            ax.set_yscale("log")
            ax.set_xlabel("Hessian eigenvalue")
            ax.set_ylabel("density (SLQ)")
            ax.set_title(f"step {step}")
            return fig

        log_figure(trainer, tag("sharpness", "density"), draw)

    def _nan_metrics(self, trainer: pl.Trainer, loss: float) -> dict[str, Any]:
        """Every tag as NaN (same keys on every rank); the warm start is kept for later steps."""
        nan = float("nan")
        metrics: dict[str, Any] = {tag("sharpness", "max_eig"): nan, tag("sharpness", "probe_loss"): loss}
        for i in range(1, self.k):
            metrics[tag("sharpness", f"eig_{i + 1}")] = nan
        metrics[tag("sharpness", "max_eig_residual")] = nan
        metrics[tag("sharpness", "certified")] = 0.0
        if self.min_eig:
            metrics[tag("sharpness", "min_eig")] = nan
        if self.trace:
            metrics[tag("sharpness", "trace")] = metrics[tag("sharpness", "trace_stderr")] = nan
        if len(trainer.optimizers) == 1:
            metrics[tag("sharpness", "lr_x_max_eig")] = metrics[tag("sharpness", "eos_ratio")] = nan
            metrics[tag("sharpness", "threshold")] = stability_threshold(trainer.optimizers[0])
        metrics[tag("sharpness", "matvecs")] = 0
        return metrics


def _identity_loss(outputs: torch.Tensor, _targets: Any) -> torch.Tensor:
    """The probe-loss adapter already returns the loss."""
    return outputs
