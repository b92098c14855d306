"""Probes run in fp32 whatever the training precision.

With ``precision="bf16-true"``/``"16-true"`` the parameters themselves are low precision: inside the probe
context they are float32 copies (same Parameter objects), and the original tensors are put back, so
(a) the whole suite runs and training is bit-identical to a run without callbacks; (b) ORACLE: the values
logged on a bf16 model equal those logged on an fp32 model whose weights are the bf16 weights cast to fp32
(the measurement really is fp32, not bf16); (c) a NaN in a probe (or NaN weights of a diverged fp16 run) is
logged with a warning and training goes on. ``"64-true"`` models are measured in float64.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, measurement_suite
from torch import nn

from lightning_align.callbacks.alignment import FeatureAlignment
from lightning_align.callbacks.coord_check import CoordCheck
from lightning_align.callbacks.ntk import NTKSpectrum
from lightning_align.callbacks.rank import RankMonitor
from lightning_align.callbacks.sharpness import Sharpness
from lightning_align.measure.state import at_least_fp32, probe_dtype, upcast_floating

FAMILIES = ("align", "sharpness", "ntk", "elr", "rank", "coord")


# --------------------------------------------------------------------------------------------------
# upcast_floating: the mechanism
# --------------------------------------------------------------------------------------------------
def test_upcast_swaps_low_precision_tensors_in_place_and_restores_the_originals() -> None:
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).to(torch.bfloat16)
    net[0].bias.requires_grad_(False)
    params, buffers = list(net.parameters()), list(net.buffers())
    originals = {id(t): (t.data, t.data.data_ptr(), t.detach().clone()) for t in params + buffers}
    grad = torch.ones_like(net[0].weight)
    net[0].weight.grad = grad
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with upcast_floating(net):
        assert [p for p in net.parameters()] == params  # same objects: the optimizer's references stay valid
        assert all(p.dtype == torch.float32 for p in params)
        assert all(b.dtype == torch.float32 for b in buffers if b.is_floating_point())
        assert net[1].num_batches_tracked.dtype == torch.int64
        assert net[0].weight.grad is None  # training's bf16 gradient is set aside...
        assert net[0].weight.requires_grad and not net[0].bias.requires_grad
        assert torch.equal(net[0].weight, originals[id(net[0].weight)][2].float())  # exact copies
        net.train()
        net(torch.randn(5, 3)).square().sum().backward()  # fp32 grads, BatchNorm statistics updated on the copies
        assert opt.param_groups[0]["params"][0].dtype == torch.float32
    for t in params + buffers:
        data, ptr, value = originals[id(t)]
        assert t.dtype == value.dtype and t.data.data_ptr() == ptr
        if t.is_floating_point():  # the probe's updates went to the copies (integer buffers: preserved_state's job)
            assert torch.equal(t, value)
    assert net[0].weight.grad is grad  # ...and restored
    assert net[1].weight.grad is None  # the probe's fp32 gradient does not survive


def test_upcast_leaves_float32_and_float64_alone() -> None:
    net32, net64 = nn.Linear(2, 2), nn.Linear(2, 2).double()
    ptrs = [p.data_ptr() for p in [*net32.parameters(), *net64.parameters()]]
    with upcast_floating(net32), upcast_floating(net64):
        assert [p.data_ptr() for p in [*net32.parameters(), *net64.parameters()]] == ptrs
        assert net64.weight.dtype == torch.float64
    assert probe_dtype(net32) == probe_dtype(nn.Linear(2, 2).to(torch.bfloat16)) == torch.float32
    assert probe_dtype(net64) == torch.float64
    w = torch.ones(2, dtype=torch.float16)
    assert at_least_fp32(w.dtype) == torch.float32 and at_least_fp32(net64.weight.dtype) == torch.float64


# --------------------------------------------------------------------------------------------------
# (a) the whole suite runs and training is bit-identical
# --------------------------------------------------------------------------------------------------
def _sgd() -> TinyClassifier:
    return TinyClassifier(optimizer="sgd", lr=0.05)  # Adam's eps=1e-8 underflows in fp16: NaN weights


@pytest.mark.parametrize(
    "precision,module",
    [("bf16-true", TinyClassifier), ("16-true", _sgd), ("64-true", TinyClassifier)],
)
def test_suite_runs_and_training_is_bit_identical_with_low_or_double_precision_parameters(
    precision: str, module: Callable[[], TinyClassifier]
) -> None:
    plain = fit([], module=module, max_steps=4, precision=precision)
    measured = fit(measurement_suite(), module=module, max_steps=4, precision=precision)
    assert_same_training_state(plain, measured)
    want = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}[precision]
    assert all(p.dtype == want for p in measured[0].parameters())  # the training precision is left as it was
    metrics = measured[1].callback_metrics
    keys = [k for k in metrics if k.split("/")[0] in FAMILIES]
    assert {k.split("/")[0] for k in keys} == set(FAMILIES)
    bad = [k for k in keys if not math.isfinite(float(metrics[k])) and not k.startswith("ntk/cond")]
    assert not bad, bad


# --------------------------------------------------------------------------------------------------
# (b) ORACLE: a bf16 model is measured exactly like its fp32 copy
# --------------------------------------------------------------------------------------------------
def _rounded_to_bf16() -> TinyClassifier:
    """TinyClassifier (same seed, same init) whose parameters and buffers hold bf16-representable values."""
    module = TinyClassifier()
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(t.to(torch.bfloat16).float())
    return module


def _step0(callback: Callable[[], object], precision: str, module: Callable[[], TinyClassifier]) -> dict[str, float]:
    logger = MemoryLogger()
    fit([callback()], module=module, max_steps=1, precision=precision, logger=logger)
    values = {k: v for step, row in logger.rows if step == 0 for k, v in row.items() if k.split("/")[0] in FAMILIES}
    assert values
    return values


ORACLE_CALLBACKS = {
    "Sharpness": lambda: Sharpness(every_n_steps=1, probe_size=32, k=2, trace=True, trace_samples=4, tol=1e-4),
    "NTKSpectrum": lambda: NTKSpectrum(every_n_steps=1, probe_size=8, k=4),
    "RankMonitor": lambda: RankMonitor(every_n_steps=1, probe_size=32, jacobian_points=2),
    "FeatureAlignment": lambda: FeatureAlignment(every_n_steps=1, probe_size=32),
    "CoordCheck": lambda: CoordCheck(every_n_steps=1, probe_size=32),
}


@pytest.mark.parametrize("name", list(ORACLE_CALLBACKS))
def test_bf16_model_is_measured_in_fp32(name: str) -> None:
    callback = ORACLE_CALLBACKS[name]
    bf16 = _step0(callback, "bf16-true", TinyClassifier)
    fp32 = _step0(callback, "32-true", _rounded_to_bf16)
    assert bf16.keys() == fp32.keys()
    for key in fp32:
        assert bf16[key] == pytest.approx(fp32[key], rel=1e-5, abs=1e-7), key
    # The tolerance is tight enough to see bf16 rounding: the unrounded fp32 model measures differently.
    unrounded = _step0(callback, "32-true", TinyClassifier)
    assert max(abs(unrounded[k] - fp32[k]) / (abs(fp32[k]) + 1e-7) for k in fp32) > 1e-4


def test_float64_model_is_measured_in_float64() -> None:
    """``64-true``: the probe batch and the arithmetic are float64 (not rounded down to fp32)."""
    seen: list[torch.dtype] = []

    class Spy(Sharpness):
        def measure(self, trainer, pl_module, batch):  # type: ignore[no-untyped-def]
            seen.extend([batch[0].dtype, next(pl_module.parameters()).dtype])
            return super().measure(trainer, pl_module, batch)

    _, trainer = fit([Spy(every_n_steps=1, probe_size=32, k=1)], max_steps=1, precision="64-true")
    assert seen and set(seen) == {torch.float64}
    assert math.isfinite(float(trainer.callback_metrics["sharpness/max_eig"]))


# --------------------------------------------------------------------------------------------------
# (c) non-finite probes are logged with a warning; training goes on unchanged
# --------------------------------------------------------------------------------------------------
def _nan_probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    x[3, 2] = float("nan")
    return x, y


def test_nan_in_the_probe_is_logged_and_warned_for_every_callback_and_training_goes_on() -> None:
    suite = measurement_suite()
    for cb in suite:
        cb.set_probe_batch(_nan_probe())
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        measured = fit(suite, max_steps=2, logger=logger)
    assert_same_training_state(fit([], max_steps=2), measured)
    messages = [str(w.message) for w in caught]
    for family in ("align", "sharpness", "ntk", "rank", "coord"):
        nan_tags = [k for _, row in logger.rows for k, v in row.items() if k.startswith(family + "/") and not math.isfinite(v)]
        assert nan_tags, f"{family}: no non-finite value logged"
        assert any(f"{nan_tags[0]}=nan" in m for m in messages), family
    assert any("EffectiveLR: the probe batch gives non-finite outputs" in m for m in messages)
    assert logger.values("elr/net.0")  # weight-based ELRs are still measured


def test_diverged_fp16_run_with_nan_weights_is_measured_as_nan_without_crashing() -> None:
    """Adam in pure fp16 (eps underflows) makes NaN weights: every callback logs NaN and training goes on."""
    logger = MemoryLogger()
    with pytest.warns(UserWarning, match="non-finite values at step 2"):
        _, trainer = fit(measurement_suite(), max_steps=2, precision="16-true", logger=logger)
    assert trainer.global_step == 2
    at2 = {k: v for step, row in logger.rows if step == 2 for k, v in row.items()}
    for family in ("sharpness", "ntk", "rank", "coord"):
        assert any(k.startswith(family + "/") and math.isnan(v) for k, v in at2.items()), family
