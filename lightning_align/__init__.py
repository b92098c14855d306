"""lightning_align: see and control feature learning while a model trains.

Measurement callbacks (alignment, sharpness, NTK, effective learning rates, rank, coordinate checks) and
parametrizations (μP, depth-μP, CompleteP, branch scaling, orthogonal init) for PyTorch Lightning. The
pure math lives in :mod:`lightning_align.measure` and :mod:`lightning_align.parametrize` and works
without Lightning.
"""

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
