"""Measuring never changes training: every measurement callback at once, on a model with BatchNorm,
LayerNorm, dropout and Adam, ends with bit-identical weights, buffers and optimizer state (also with
gradient accumulation and with bf16 autocast); a compiled module is probed through its original forward."""

import pytest
import torch
from helpers import TinyClassifier, assert_same_training_state, fit, measurement_suite


@pytest.mark.parametrize("accumulate,precision", [(1, "32-true"), (2, "32-true"), (1, "bf16-mixed")])
def test_full_suite_is_bit_identical(accumulate: int, precision: str) -> None:
    plain = fit([], max_steps=6, accumulate_grad_batches=accumulate, precision=precision)
    measured = fit(measurement_suite(), max_steps=6, accumulate_grad_batches=accumulate, precision=precision)
    assert_same_training_state(plain, measured)


def test_compiled_module_is_probed_through_its_original_forward() -> None:
    """``trainer.fit(torch.compile(model))``: every callback runs and measures what it measures uncompiled."""
    def compiled() -> torch.nn.Module:
        return torch.compile(TinyClassifier(), backend="eager")  # dynamo without a C++ toolchain

    _, plain = fit(measurement_suite(), max_steps=3)
    _, traced = fit(measurement_suite(), module=lambda: compiled(), max_steps=3)
    keys = [k for k in plain.callback_metrics if k.split("/")[0] in ("align", "sharpness", "ntk", "elr", "rank", "coord")]
    assert len(keys) > 20
    for key in keys:
        assert float(traced.callback_metrics[key]) == pytest.approx(float(plain.callback_metrics[key]), rel=1e-4, abs=1e-6), key
