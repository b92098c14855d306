"""Lightning callbacks: one public class per file, all configurable from LightningCLI YAML."""

from lightning_align.callbacks.alignment import FeatureAlignment
from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.callbacks.coord_check import CoordCheck
from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.callbacks.ntk import NTKSpectrum
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.callbacks.rank import RankMonitor
from lightning_align.callbacks.sharpness import Sharpness
from lightning_align.callbacks.strategy import check_strategy
from lightning_align.callbacks.summary import AlignSummary
from lightning_align.callbacks.warmup import ELRWarmup

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
    "check_strategy",
]
