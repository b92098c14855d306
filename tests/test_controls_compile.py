"""The control callbacks on a ``torch.compile``d module: Parametrization("mup") + FeatureSpeedControl + ELRWarmup
act on a compiled LightningModule exactly as on the eager one (same logged decisions, learning rates and final
weights), and CoordCheck measures the parametrized, compiled module like the eager one.

Dynamo's eager backend runs the captured graph with the same kernels as eager PyTorch, so any difference would
come from the callbacks (e.g. multipliers attached by forward hooks that the compiled graph ignored, or a
probe through the compiled forward). Inductor is covered for the measurement callbacks in
``test_compile_inductor.py``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import fit
from test_controls_ddp import CONTROL_TAGS, NormalizedMLP, controls, loader

from lightning_align.callbacks.coord_check import CoordCheck
from lightning_align.logging import MemoryLogger


def run(compiled: bool) -> tuple[dict[tuple[int, str], float], dict[str, torch.Tensor], list[float]]:
    def build() -> Any:
        module = NormalizedMLP()
        return torch.compile(module, backend="eager") if compiled else module

    logger = MemoryLogger()
    _, trainer = fit(
        [*controls(), CoordCheck(every_n_steps=2, probe_size=32)], module=build, loader=loader(batch_size=16), max_steps=6, logger=logger
    )
    logged = {(s, k): v for s, row in logger.rows for k, v in row.items() if k.startswith((*CONTROL_TAGS, "coord/"))}
    weights = {k: v.detach().clone() for k, v in trainer.lightning_module.state_dict().items()}
    return logged, weights, [g["lr"] for g in trainer.optimizers[0].param_groups]


def test_controls_act_on_a_compiled_module_as_on_the_eager_one() -> None:
    eager_logged, eager_weights, eager_lrs = run(compiled=False)
    compiled_logged, compiled_weights, compiled_lrs = run(compiled=True)
    assert any(k.startswith("align/control") for _, k in eager_logged) and any(k == "elr/warmup_factor" for _, k in eager_logged)
    assert any(k.startswith("coord/") for _, k in eager_logged)
    assert compiled_logged.keys() == eager_logged.keys()
    for key, value in eager_logged.items():
        assert compiled_logged[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert compiled_lrs == pytest.approx(eager_lrs, rel=1e-6)
    assert compiled_weights.keys() == eager_weights.keys()
    for name, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
