"""FeatureAlignment and FeatureSpeedControl under ModelParallelStrategy with FSDP2 (2 CPU processes, gloo).

One pair of processes runs every sharded fit of this file in turn: a fit without callbacks, one with
FeatureAlignment at every step (SGD with momentum, each Linear and the root sharded), the same under Adam with
the root as the only FSDP unit, and one with FeatureSpeedControl at every step (with FeatureAlignment). The same
fits run in one process on the same global batches (as in test_sharded.py). Checked: every logged value at every
step equals the one-process value, both ranks log bit-identical values (so FeatureSpeedControl sets the same
learning rates on every rank), no rank hangs (a timeout) or keeps a gathered parameter after a measurement,
and FeatureAlignment leaves the sharded weights bit-identical to the fit without callbacks.

Tolerances: sharded, ``J·Δθ`` comes from Richardson-extrapolated central differences of float32 forwards (one
process: exact double vjp): ``speed``, ``cos`` and ``predicted_speed`` within 2e-4 relative (observed: 3e-5);
loss decreases are sums of exact inner products (1e-5; observed 7e-6). FeatureSpeedControl's multipliers follow
from those values and then steer training, so every value of that fit: 1e-3 (observed 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from sharded_helpers import ShardedNet, StepMetrics, fit_same_data, run_sharded
from torch.distributed.fsdp import fully_shard

from lightning_align import FeatureAlignment
from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.measure.alignment import feature_speed, finite_difference_feature_speed

pytestmark = pytest.mark.distributed

PREFIXES = ("align/",)
MAX_STEPS = 4
LAYERS = [r"net\.0", r"net\.3", r"net\.5"]

SUITES = {
    "none": lambda: [],
    "align": lambda: [FeatureAlignment(every_n_steps=1, probe_size=32, layers=LAYERS)],
    "adam_root": lambda: [FeatureAlignment(every_n_steps=1, probe_size=32, layers=LAYERS)],
    "control": lambda: [
        FeatureSpeedControl(target_speed=0.02, every_n_steps=1, probe_size=32, layers=LAYERS, smoothing=0.0),
        FeatureAlignment(every_n_steps=2, probe_size=32, layers=LAYERS),
    ],
}



class RootShardedNet(ShardedNet):
    """ShardedNet trained by Adam and sharded as one unit (the root only): every parameter in one FSDP group."""

    def __init__(self) -> None:
        super().__init__(optimizer="adam", lr=0.01)

    def configure_model(self) -> None:
        if self.device_mesh is not None:
            fully_shard(self, mesh=self.device_mesh["data_parallel"])


MODELS = {"none": ShardedNet, "align": ShardedNet, "adam_root": RootShardedNet, "control": ShardedNet}


def fit(folder: str, suite: str, sharded: bool) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    callbacks = [*SUITES[suite](), StepMetrics(folder, PREFIXES)]
    fit_same_data(MODELS[suite], callbacks, sharded, MAX_STEPS, None)


def sharded_fits(folder: str) -> None:
    for suite in SUITES:
        fit(str(Path(folder, suite)), suite, True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sharded_alignment")
    run_sharded(sharded_fits, str(root / "sharded"), timeout=300)
    for suite in ("align", "adam_root", "control"):
        fit(str(root / "single" / suite), suite, False)
    return root


def read(runs: Path, kind: str, suite: str, rank: int = 0) -> dict[str, Any]:
    world = 2 if kind == "sharded" else 1
    return json.loads((runs / kind / suite / f"rank{rank}_of{world}.json").read_text())


def tolerance(key: str, steered: bool = False) -> float:
    if steered:  # FeatureSpeedControl's decisions steer the training: every later value inherits their error
        return 1e-3
    if key.endswith("loss_decrease"):
        return 1e-5
    return 2e-4


def assert_close(sharded: dict[str, dict[str, float]], single: dict[str, dict[str, float]], steered: bool = False) -> None:
    """The same tags at the same steps, the values within :func:`tolerance` (relative, or absolute near 0)."""
    assert sharded.keys() == single.keys()
    for step in single:
        assert sharded[step].pop("gathered") == 0, f"a parameter was left gathered at step {step}"
        assert sharded[step].keys() == single[step].keys(), step
        for key, expected in single[step].items():
            rel = tolerance(key, steered)
            assert sharded[step][key] == pytest.approx(expected, rel=rel, abs=rel), (step, key)


def test_feature_alignment_sharded_equals_one_process_on_every_rank_and_leaves_training_unchanged(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "align"), read(runs, "sharded", "align", 1), read(runs, "single", "align")
    assert r0["steps"] == r1["steps"]  # every rank logs the same values, bit for bit
    logged = set().union(*(values.keys() for values in r0["steps"].values()))
    for layer in ("net.0", "net.3", "net.5"):
        for what in ("cos", "speed", "predicted_speed"):
            assert f"align/{what}/{layer}" in logged
    for step in range(MAX_STEPS + 1):  # measured at every step (step 0: the gradient step)
        assert "align/speed/net.3" in r0["steps"][str(step)], step
    assert_close(r0["steps"], single["steps"])
    # net.5 (the output) is a cut of the network: the feature speed formula holds, sharded too
    for step in range(MAX_STEPS + 1):
        values = r0["steps"][str(step)]
        assert values["align/predicted_speed/net.5"] == pytest.approx(values["align/speed/net.5"], rel=1e-3)
    assert r0["weights"] == r1["weights"] == read(runs, "sharded", "none")["weights"]  # bit-identical without it


def test_feature_alignment_sharded_under_adam_with_one_fsdp_unit(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "adam_root"), read(runs, "sharded", "adam_root", 1), read(runs, "single", "adam_root")
    assert r0["steps"] == r1["steps"]
    assert_close(r0["steps"], single["steps"])
    assert r0["steps"]["2"]["align/speed/net.0"] > 0


def test_feature_speed_control_sharded_takes_the_same_decisions_on_every_rank_as_one_process(runs: Path) -> None:
    r0, r1, single = read(runs, "sharded", "control"), read(runs, "sharded", "control", 1), read(runs, "single", "control")
    assert r0["steps"] == r1["steps"] and r0["weights"] == r1["weights"]  # the same learning rates on every rank
    multipliers = [r0["steps"][str(s)]["align/control_multiplier/net.3"] for s in range(1, MAX_STEPS + 1)]
    assert any(abs(m - 1) > 0.05 for m in multipliers), multipliers  # it acted
    assert_close(r0["steps"], single["steps"], steered=True)
    assert r0["weights"] == pytest.approx(single["weights"], rel=1e-3, abs=1e-5)


class BatchLoss(torch.nn.Module):
    """``forward((x, y)) -> cross-entropy`` of ``module`` (parameter names ``module.*``, as a ProbeLoss's)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.module(batch[0]), batch[1])


def test_finite_difference_feature_speed_matches_the_exact_one_in_one_process() -> None:
    """The measurement the sharded fits use, on whole tensors: the same upstream sets and loss decreases as
    :func:`feature_speed`, speeds and angles within 1e-4 relative, for a gradient step and for a given update;
    the parameters and their ``.grad`` are as before, bit for bit."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 15), torch.nn.LayerNorm(15), torch.nn.Tanh(), torch.nn.Linear(15, 15), torch.nn.GELU(), torch.nn.Linear(15, 3))
    model = BatchLoss(net)
    batch = (torch.randn(32, 8), torch.randint(0, 3, (32,)))
    layers = ["module.0", "module.3", "module.5"]
    before = [p.detach().clone() for p in model.parameters()]
    net[0].weight.grad = torch.ones_like(net[0].weight)
    grads = torch.autograd.grad(model(batch), list(model.parameters()))
    update = {n: -1e-2 * g.sign() for (n, _), g in zip(model.named_parameters(), grads)}  # an Adam-like step
    point = {n: p.detach() + 1e-2 * torch.randn_like(p) for n, p in model.named_parameters()}
    for kwargs in (dict(lr=0.5), dict(update=update, params=point)):
        exact = feature_speed(model, None, batch, layers, **kwargs)
        approx = finite_difference_feature_speed(model, batch, layers, None, **kwargs)
        assert approx.loss == pytest.approx(exact.loss, rel=1e-6)
        assert approx.loss_decrease == pytest.approx(exact.loss_decrease, rel=1e-5)
        for name in layers:
            assert approx[name].upstream == exact[name].upstream
            for what in ("speed", "cos_angle", "predicted_speed", "backward_norm", "feature_rms"):
                assert getattr(approx[name], what) == pytest.approx(getattr(exact[name], what), rel=1e-4, abs=1e-5), (name, what)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight)) and net[3].weight.grad is None
