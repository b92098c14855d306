"""Measuring never changes training: every measurement callback at once, on a model with BatchNorm,
LayerNorm, dropout and Adam, ends with bit-identical weights, buffers and optimizer state (also with
gradient accumulation and with bf16 autocast)."""

import pytest
from helpers import assert_same_training_state, fit

from lightning_align import CoordCheck, EffectiveLR, FeatureAlignment, NTKSpectrum, RankMonitor, Sharpness


def full_suite() -> list:
    return [
        FeatureAlignment(every_n_steps=2, probe_size=32),
        Sharpness(every_n_steps=3, probe_size=32, k=2),
        NTKSpectrum(every_n_steps=3, probe_size=8, k=4),
        EffectiveLR(every_n_steps=1, probe_size=32),
        RankMonitor(every_n_steps=2, probe_size=32, jacobian_points=2),
        CoordCheck(every_n_steps=2, probe_size=32),
    ]


@pytest.mark.parametrize("accumulate,precision", [(1, "32-true"), (2, "32-true"), (1, "bf16-mixed")])
def test_full_suite_is_bit_identical(accumulate: int, precision: str) -> None:
    plain = fit([], max_steps=6, accumulate_grad_batches=accumulate, precision=precision)
    measured = fit(full_suite(), max_steps=6, accumulate_grad_batches=accumulate, precision=precision)
    assert_same_training_state(plain, measured)
