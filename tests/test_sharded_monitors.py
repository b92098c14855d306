"""EffectiveLR, ELRWarmup, CoordCheck and RankMonitor under ModelParallelStrategy with FSDP2 (2 CPU processes, gloo).

One pair of processes runs every sharded fit of this file in turn (a process start and Lightning's set-up cost
more than the fits): a fit without callbacks, one with the three monitors, one with ELRWarmup (saving a
checkpoint after step 2), its resume from that checkpoint, one with ELRWarmup and EffectiveLR on a zero-initialised
readout, and a fit that RankMonitor(jacobian_points>0) must refuse at fit start. The same fits run in one process on the same global
batches (as in test_sharded.py). Checked: every logged value at every step equals the one-process value to 1e-5
relative (float32 gradients, activations and norms reduced in another order: FSDP's reduce-scatter of two
half-batch means against one mean over the whole batch; observed differences are below 2e-7), both ranks log
bit-identical values (so ELRWarmup scales the learning rates alike on every rank), no rank hangs (a timeout),
no rank keeps a gathered (whole) parameter after a measurement, and the monitors leave the sharded weights
bit-identical to the fit without callbacks. The resumed run logs, bit for bit, what the uninterrupted one logs
after the checkpoint (ELRWarmup's state and CoordCheck's h_0 come back from a sharded checkpoint).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sharded_helpers import SaveAt, ShardedNet, StepMetrics, fit_same_data, run_sharded
from torch.distributed.fsdp import fully_shard

from lightning_align import CoordCheck, EffectiveLR, ELRWarmup, RankMonitor

pytestmark = pytest.mark.distributed

PREFIXES = ("elr/", "coord/", "rank/")
MAX_STEPS = 4


class SmallInitNet(ShardedNet):
    """ShardedNet whose first Linear (weight and bias feed a LayerNorm: scale-invariant) starts 100 times smaller,
    so its critical learning rate starts far below the optimizer's and ELRWarmup acts for several steps. Sharded
    as one unit (the root only): FSDP keeps the root's parameters gathered after a forward without backward, so
    the scale-invariance test must free them before each scaled forward."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        with torch.no_grad():
            self.net[0].weight.mul_(0.01)
            self.net[0].bias.mul_(0.01)

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            fully_shard(self, mesh=self.device_mesh["data_parallel"])


class ZeroHeadNet(ShardedNet):
    """ShardedNet with a zero-initialised readout: at init no weight moves the outputs, so only the test at a
    perturbed point (each rank perturbing its slices) tells net.0 (invariant) from net.3 and the readout (not)."""

    def __init__(self) -> None:
        super().__init__(lr=0.5)
        with torch.no_grad():
            self.net[5].weight.zero_()
            self.net[5].bias.zero_()


SUITES = {
    "none": lambda: [],
    "monitors": lambda: [
        EffectiveLR(every_n_steps=1, probe_size=32),
        CoordCheck(every_n_steps=1, probe_size=32),  # alone at odd steps: its forward must not leave weights gathered
        RankMonitor(every_n_steps=2, probe_size=32, histograms=False),
    ],
    "warmup": lambda: [
        ELRWarmup(probe_size=32),
        EffectiveLR(every_n_steps=1, probe_size=32),
        CoordCheck(every_n_steps=1, probe_size=32),
    ],
    "jacobian": lambda: [RankMonitor(every_n_steps=2, probe_size=32, jacobian_points=2)],
    "zero_head": lambda: [ELRWarmup(probe_size=32), EffectiveLR(every_n_steps=1, probe_size=32)],
}
MODELS = {"none": ShardedNet, "monitors": ShardedNet, "warmup": SmallInitNet, "jacobian": ShardedNet, "zero_head": ZeroHeadNet}


def fit(folder: str, suite: str, sharded: bool, save: str = "", resume: str = "") -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    callbacks = [*SUITES[suite](), StepMetrics(folder, PREFIXES), *([SaveAt(save, 2)] if save else [])]
    fit_same_data(MODELS[suite], callbacks, sharded, MAX_STEPS, resume or None)


def sharded_fits(folder: str) -> None:
    """Every sharded fit of this file, one after the other in the same 2 processes."""
    checkpoint = str(Path(folder, "warmup_step2"))  # the warm-up run saved after step 2, then resumed from there
    for suite in ("none", "monitors", "warmup", "zero_head"):
        fit(str(Path(folder, suite)), suite, True, save=checkpoint if suite == "warmup" else "")
    fit(str(Path(folder, "warmup_resumed")), "warmup", True, resume=checkpoint)
    try:
        fit(str(Path(folder, "jacobian")), "jacobian", True)
    except ValueError as err:  # refused at fit start, on every rank
        Path(folder, f"jacobian_refusal_rank{torch.distributed.get_rank()}.txt").write_text(str(err))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded_monitors")
    run_sharded(sharded_fits, str(root / "sharded"), timeout=300)
    for suite in ("monitors", "warmup", "zero_head"):
        fit(str(root / "single" / suite), suite, False)
    return root


def read(runs: Path, kind: str, suite: str, rank: int = 0) -> dict[str, Any]:
    world = 2 if kind == "sharded" else 1
    return json.loads((runs / kind / suite / f"rank{rank}_of{world}.json").read_text())


def assert_close(sharded: dict[str, dict[str, float]], single: dict[str, dict[str, float]], rel: float = 1e-5) -> None:
    """The same tags at the same steps, the values within ``rel`` (relative, or absolute near 0; NaN where NaN)."""
    assert sharded.keys() == single.keys()
    for step in single:
        assert sharded[step].pop("gathered") == 0, f"a parameter was left gathered at step {step}"
        assert sharded[step].keys() == single[step].keys(), step
        for key, expected in single[step].items():
            assert sharded[step][key] == pytest.approx(expected, rel=rel, abs=rel, nan_ok=True), (step, key)


def test_monitors_sharded_equal_one_process_same_on_every_rank_and_leave_training_unchanged(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "monitors"), read(runs, "sharded", "monitors", 1), read(runs, "single", "monitors")
    assert r0["steps"] == r1["steps"]  # every rank logs the same values, bit for bit
    logged = set().union(*(values.keys() for values in r0["steps"].values()))
    for expected in ("elr/net.0", "elr/net.3", "elr/spread", "elr/critical_lr", "elr/si/net.0", "coord/rms/net.0",
                     "coord/delta/net.5", "rank/weight_stable/net.3", "rank/repr_effective/net.0"):
        assert expected in logged, expected
    # net.0 (weight and bias before the LayerNorm) is found scale-invariant, net.3 is not, as in one process
    assert r0["steps"]["0"]["elr/si/net.0"] == 1.0 and r0["steps"]["0"]["elr/si/net.3"] == 0.0
    assert_close(r0["steps"], single["steps"])
    assert r0["weights"] == read(runs, "sharded", "none")["weights"]  # bit-identical with and without the monitors


def test_elr_warmup_sharded_takes_the_same_decisions_on_every_rank_as_one_process(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "warmup"), read(runs, "sharded", "warmup", 1), read(runs, "single", "warmup")
    assert r0["steps"] == r1["steps"] and r0["weights"] == r1["weights"]  # the same factor on every rank
    factors = [r0["steps"][str(s)].get("elr/warmup_factor") for s in range(1, MAX_STEPS + 1)]
    assert all(f is not None for f in factors) and sum(f < 1 for f in factors) >= 2, factors  # it acted
    assert_close(r0["steps"], single["steps"])
    # training under the warm-up: the same weights as in one process, to float32 reductions in another order
    assert r0["weights"] == pytest.approx(single["weights"], rel=1e-5, abs=1e-6)


def test_a_zero_readout_does_not_fool_the_sharded_scale_invariance_test(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "zero_head"), read(runs, "sharded", "zero_head", 1), read(runs, "single", "zero_head")
    assert r0["steps"] == r1["steps"] and r0["weights"] == r1["weights"]
    si = {k: v for k, v in r0["steps"]["0"].items() if k.startswith("elr/si/")}
    assert si == {"elr/si/net.0": 1.0, "elr/si/net.3": 0.0, "elr/si/net.5": 0.0}  # as in one process
    assert_close(r0["steps"], single["steps"])
    assert r0["weights"] == pytest.approx(single["weights"], rel=1e-5, abs=1e-6)


def test_warmup_and_coord_check_state_survive_a_sharded_resume(runs: Path) -> None:
    whole, resumed = read(runs, "sharded", "warmup"), read(runs, "sharded", "warmup_resumed")
    # ELRWarmup's done/factor and CoordCheck's h_0 come back from the checkpoint: the resumed steps log the same
    # values (coord/delta from the same h_0, the warm-up factor at the same steps) and end at the same weights
    for step in range(MAX_STEPS // 2 + 1, MAX_STEPS + 1):
        assert resumed["steps"][str(step)] == whole["steps"][str(step)], step
    assert resumed["weights"] == whole["weights"]


def test_rank_monitor_refuses_jacobian_points_when_sharded(runs: Path) -> None:
    messages = {(runs / "sharded" / f"jacobian_refusal_rank{r}.txt").read_text() for r in (0, 1)}
    assert len(messages) == 1, "every rank refuses, with the same message"
    message = messages.pop()
    assert "RankMonitor(jacobian_points=2)" in message and "set jacobian_points=0" in message
    assert not (runs / "sharded" / "jacobian" / "rank0_of2.json").exists()  # refused before training
