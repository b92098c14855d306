"""lightning_align: see and control feature learning while a model trains.

Measurement callbacks (alignment, sharpness, NTK, effective learning rates, rank, coordinate checks) and
parametrizations (μP, depth-μP, CompleteP, branch scaling, orthogonal init) for PyTorch Lightning. The
pure math lives in :mod:`lightning_align.measure` and :mod:`lightning_align.parametrize` and works
without Lightning: the callbacks are imported on first use, so ``import lightning_align.measure`` does
not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "AlignSummary",
    "CoordCheck",
    "ELRWarmup",
    "EffectiveLR",
    "FeatureAlignment",
    "FeatureSpeedControl",
    "MeasurementCallback",
    "NTKSpectrum",
    "Parametrization",
    "RankMonitor",
    "Sharpness",
    "__version__",
    "measure",
    "parametrize",
]
_CALLBACKS = frozenset(name for name in __all__ if name[0].isupper())

if TYPE_CHECKING:  # pragma: no cover
    from lightning_align import measure, parametrize
    from lightning_align.callbacks import (
        AlignSummary,
        CoordCheck,
        EffectiveLR,
        ELRWarmup,
        FeatureAlignment,
        FeatureSpeedControl,
        MeasurementCallback,
        NTKSpectrum,
        Parametrization,
        RankMonitor,
        Sharpness,
    )


def __getattr__(name: str) -> Any:
    """Import the callbacks (and Lightning) or a subpackage on first access (PEP 562)."""
    if name in _CALLBACKS:
        return getattr(importlib.import_module("lightning_align.callbacks"), name)
    if name in ("measure", "parametrize"):
        return importlib.import_module(f"lightning_align.{name}")
    raise AttributeError(f"module 'lightning_align' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
