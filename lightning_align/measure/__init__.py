"""Pure-PyTorch measurements (no Lightning import): the math behind every callback.

Each function takes ``(model, loss_fn, batch)`` or ``(model, inputs)`` and leaves the model exactly as it
found it (parameters, buffers, ``.grad``, flags, RNG).
"""

from lightning_align.measure.alignment import FeatureKernel, FeatureSpeed, FeatureSpeedResults, feature_kernel, feature_speed
from lightning_align.measure.batch import batch_inputs, batch_targets
from lightning_align.measure.elr import (
    ELRSpread,
    ScaleInvariance,
    critical_lr,
    default_weight_modules,
    detect_scale_invariance,
    effective_lrs,
    elr_spread,
    grad_weight_ratios,
    group_norm,
    next_elr,
    weight_group,
)
from lightning_align.measure.ntk import (
    NTKSpectrumResult,
    NTKSummary,
    check_sample_independent,
    empirical_ntk,
    flatten_kernel,
    kernel_distance,
    kernel_target_alignment,
    ntk_eigs,
    ntk_matvec,
    ntk_spectrum,
    ntk_summary,
    ntk_trace,
)
from lightning_align.measure.ntk_fluctuation import NTKFluctuation, ntk_fluctuation
from lightning_align.measure.rank import (
    effective_rank,
    jacobian_rank,
    numerical_rank,
    participation_ratio,
    representation_ranks,
    singular_values,
    stable_rank,
    weight_matrix,
    weight_spectrum,
)
from lightning_align.measure.state import preserved_rng, preserved_state

__all__ = [
    "ELRSpread",
    "ScaleInvariance",
    "critical_lr",
    "default_weight_modules",
    "detect_scale_invariance",
    "effective_lrs",
    "elr_spread",
    "grad_weight_ratios",
    "group_norm",
    "next_elr",
    "weight_group",
    "NTKSpectrumResult",
    "NTKSummary",
    "check_sample_independent",
    "empirical_ntk",
    "flatten_kernel",
    "kernel_distance",
    "kernel_target_alignment",
    "ntk_eigs",
    "ntk_matvec",
    "ntk_spectrum",
    "ntk_summary",
    "ntk_trace",
    "NTKFluctuation",
    "ntk_fluctuation",
    "FeatureKernel",
    "FeatureSpeed",
    "FeatureSpeedResults",
    "batch_inputs",
    "batch_targets",
    "feature_kernel",
    "feature_speed",
    "effective_rank",
    "jacobian_rank",
    "numerical_rank",
    "participation_ratio",
    "preserved_rng",
    "preserved_state",
    "representation_ranks",
    "singular_values",
    "stable_rank",
    "weight_matrix",
    "weight_spectrum",
]
