"""The control callbacks survive a resume: Parametrization("mup") + FeatureSpeedControl + ELRWarmup, stopped by a
checkpoint at step k and resumed, log what the uninterrupted run logs afterwards and end in the same state.

Also: the parametrization is not applied twice (weights not re-scaled, forward multipliers attached once,
per-group learning rates as in the uninterrupted run), ELRWarmup's done/factor and FeatureSpeedControl's
plan and (smoothed) multipliers come back. k=2: the warm-up is still running; k=4: it has finished (a
warm-up that forgot it would act again at step 5). Training is deterministic (unshuffled data, no dropout) and both checkpoints end an epoch (2 batches of 16): Lightning restarts an
unfinished epoch of a plain DataLoader from its first batch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same_training_state, fit
from lightning.pytorch.callbacks import ModelCheckpoint
from test_controls_ddp import CONTROL_TAGS, NormalizedMLP, controls, loader

from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.callbacks.summary import AlignSummary
from lightning_align.callbacks.warmup import ELRWarmup
from lightning_align.logging import MemoryLogger

STEPS = 8


class Snapshot(pl.Callback):
    """The controls' state, the optimizer's groups, the weights and the module's hooks: after step ``at`` (put it
    last, so the controls have acted), and at the start of a resumed run."""

    def __init__(self, at: int | None = None) -> None:
        self.at = at
        self.state: dict[str, Any] | None = None

    def take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        fsc = next(c for c in trainer.callbacks if isinstance(c, FeatureSpeedControl))
        warm = next(c for c in trainer.callbacks if isinstance(c, ELRWarmup))
        param = next(c for c in trainer.callbacks if isinstance(c, Parametrization))
        self.state = {
            "step": trainer.global_step,
            "groups": [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in trainer.optimizers[0].param_groups],
            "names": {id(p): n for n, p in pl_module.named_parameters()},
            "plan": fsc.plan,
            "multipliers": list(fsc.multipliers),
            "warmup": (warm.done, warm.factor),
            "param": param.state_dict(),
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
            "hooks": {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in pl_module.named_modules()},
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.at:
            self.take(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at is None:
            self.take(trainer, pl_module)


def named_groups(state: dict[str, Any]) -> list[tuple[dict[str, Any], list[str]]]:
    return [(settings, [state["names"][i] for i in ids]) for settings, ids in state["groups"]]


def run(max_steps: int, *extra: pl.Callback, **kwargs: Any) -> tuple[MemoryLogger, tuple[pl.LightningModule, pl.Trainer]]:
    logger = MemoryLogger()
    result = fit([*controls(), AlignSummary(table=False), *extra], module=NormalizedMLP, loader=loader(16, n=32), max_steps=max_steps, logger=logger, **kwargs)
    return logger, result


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    snaps = {k: Snapshot(at=k) for k in (2, 4)}
    logger, result = run(STEPS, *snaps.values())
    return {"logger": logger, "result": result, "snaps": snaps}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    run(4, ModelCheckpoint(dirpath=folder, every_n_train_steps=2, save_top_k=-1, filename="{step}"), enable_checkpointing=True)
    return {k: folder / f"step={k}.ckpt" for k in (2, 4)}


@pytest.mark.parametrize("k", [2, 4])
def test_resumed_controls_log_and_end_like_the_uninterrupted_run(k: int, uninterrupted: dict[str, Any], checkpoints: dict[int, Path]) -> None:
    start = Snapshot()
    logger, result = run(STEPS, start, ckpt_path=str(checkpoints[k]))
    expected, got = uninterrupted["snaps"][k].state, start.state
    assert expected is not None and got is not None and got["step"] == k

    # Restored, not re-applied: weights as trained (no second μP rescale), hooks attached once, the same
    # per-layer groups with the same (μP-scaled, scheduled) learning rates, the controls' state.
    for name, value in expected["weights"].items():
        assert torch.equal(got["weights"][name], value), f"{name} differs at the resumed start"
    assert got["hooks"] == expected["hooks"]
    assert named_groups(got) == named_groups(expected)
    assert got["plan"] == expected["plan"] and got["multipliers"] == expected["multipliers"]
    assert got["warmup"] == pytest.approx(expected["warmup"], nan_ok=True)
    assert got["warmup"][0] is (k == 4), "the warm-up runs until step 3 in this configuration"
    assert got["param"] == expected["param"] and got["param"]["applied"]

    # Afterwards: the same logged values at every later step, and the same end state (bit for bit on CPU).
    reference: MemoryLogger = uninterrupted["logger"]
    for step in range(k + 1, STEPS + 1):
        want = {t: v for t, v in reference.at(step).items() if t.startswith(CONTROL_TAGS)}
        have = {t: v for t, v in logger.at(step).items() if t.startswith(CONTROL_TAGS)}
        assert want, f"nothing logged at step {step}"
        assert have.keys() == want.keys(), f"step {step}: tags differ: {set(have) ^ set(want)}"
        for tag, value in want.items():
            assert have[tag] == pytest.approx(value, rel=1e-6, abs=1e-9), f"step {step}: {tag}"
    assert_same_training_state(result, uninterrupted["result"])
    (_, t_resumed), (_, t_full) = result, uninterrupted["result"]
    assert [g["lr"] for g in t_resumed.optimizers[0].param_groups] == [g["lr"] for g in t_full.optimizers[0].param_groups]
