"""``torch.compile`` with the default inductor backend (needs a C++ compiler; skipped without one).

Probes go through the module's original (eager) forward, so a compiled module is measured exactly like
the uncompiled one at the same weights, and measuring does not change the compiled training run.

Only step 0 is compared with the uncompiled run: after a step, inductor's training differs from eager
(its dropout masks come from its own random stream, and fused kernels round differently), so the
weights, and everything measured on them, legitimately differ from an eager run.

Cost: ~20 s with a cold inductor cache (C++ compilation of the forward and backward kernels), ~3 s warm.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, measurement_suite

FAMILIES = ("align", "sharpness", "ntk", "elr", "rank", "coord")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="inductor needs a C++ compiler"),
]


def _compiled() -> torch.nn.Module:
    return torch.compile(TinyClassifier())  # default backend: inductor


def _step0(logger: MemoryLogger) -> dict[str, float]:
    return {k: v for step, row in logger.rows if step == 0 for k, v in row.items() if k.split("/")[0] in FAMILIES}


def test_inductor_compiled_module_is_measured_like_the_eager_one_and_training_is_unchanged() -> None:
    compiled_plain = fit([], module=_compiled, max_steps=3)
    logger_c, logger_e = MemoryLogger(), MemoryLogger()
    compiled_measured = fit(measurement_suite(), module=_compiled, max_steps=3, logger=logger_c)
    fit(measurement_suite(), max_steps=3, logger=logger_e)

    # Training with inductor is bit-identical with and without the suite.
    assert_same_training_state(compiled_plain, compiled_measured)

    # Every callback measured, at every scheduled step; at step 0 (same weights) the values equal eager's.
    steps = lambda log: sorted({s for s, row in log.rows if any(k.split("/")[0] in FAMILIES for k in row)})  # noqa: E731
    assert steps(logger_c) == steps(logger_e) == [0, 1, 2, 3]
    at0_c, at0_e = _step0(logger_c), _step0(logger_e)
    assert {k.split("/")[0] for k in at0_c} == set(FAMILIES)
    assert at0_c.keys() == at0_e.keys() and len(at0_c) > 30
    for key, value in at0_e.items():
        assert at0_c[key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
    last_c = {k for s, row in logger_c.rows if s == 3 for k in row}
    last_e = {k for s, row in logger_e.rows if s == 3 for k in row}
    assert last_c == last_e
