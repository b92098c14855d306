"""Bad input catalogue: each case is a clear error that names the culprit, raised before the first optimizer step."""

from __future__ import annotations

from typing import Any, Callable

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, fit, tiny_loader
from torch import nn
from torch.utils.data import DataLoader

from example_modules import MLP, TorchvisionDataModule
from lightning_align import (
    CoordCheck,
    EffectiveLR,
    ELRWarmup,
    FeatureAlignment,
    FeatureSpeedControl,
    NTKSpectrum,
    Parametrization,
    RankMonitor,
    Sharpness,
)


class Frozen(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.requires_grad_(False)
        self.extra = nn.Parameter(torch.zeros(1))  # the optimizer needs something; the loss does not use it


class VectorLoss(TinyClassifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y, reduction="none")


class NoHparams(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()  # no save_hyperparameters(): cannot be re-instantiated at a base width
        self.net = nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def nan_loader() -> DataLoader:
    data = tiny_loader().dataset
    data.tensors[0][5, 1] = float("nan")  # one bad feature value in the training data
    return DataLoader(data, batch_size=16)


class StringOutput(TinyClassifier):
    def forward(self, x: torch.Tensor) -> Any:
        return {"scores": self.net(x)}  # no tensor the suite can read as the prediction

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return nn.functional.cross_entropy(self(batch[0])["scores"], batch[1])


class Manual(TinyClassifier):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        opt.step()


class ConfigModule(NoHparams):
    def __init__(self, config: dict | None = None) -> None:
        super().__init__((config or {"hidden": 16})["hidden"])
        self.save_hyperparameters()


def dict_loader() -> DataLoader:
    data = [{"features": torch.randn(8), "label": torch.tensor(1)} for _ in range(16)]
    return DataLoader(data, batch_size=4)


FIT_CASES: list[tuple[str, Callable[[], list[pl.Callback]], Callable[[], pl.LightningModule], Callable[[], DataLoader], str]] = [
    ("RankMonitor unknown layer", lambda: [RankMonitor(layers=["encoder.fc"])], TinyClassifier, tiny_loader, "'encoder.fc' matches no module"),
    ("RankMonitor weight without a matrix", lambda: [RankMonitor(weights=["net.2"])], TinyClassifier, tiny_loader, r"RankMonitor\(weights=...\).*net\.2"),
    ("FeatureAlignment unknown module", lambda: [FeatureAlignment(layers=["decoder"])], TinyClassifier, tiny_loader, "'decoder'"),
    ("CoordCheck unknown layer", lambda: [CoordCheck(layers=["head"])], TinyClassifier, tiny_loader, "'head'"),
    ("EffectiveLR unknown weight", lambda: [EffectiveLR(weights=["stem"])], TinyClassifier, tiny_loader, "'stem'"),
    ("Sharpness k above its product budget", lambda: [Sharpness(k=10**6)], TinyClassifier, tiny_loader, "lower k or raise max_matvecs"),
    ("Sharpness asks for more eigenvalues than trainable parameters", lambda: [Sharpness(min_eig=True)], Frozen, tiny_loader, "Frozen has only 1 trainable"),
    ("Sharpness of a loss that uses no trainable parameter", lambda: [Sharpness()], Frozen, tiny_loader, "does not depend on any trainable parameter"),
    ("Sharpness with a non-scalar loss", lambda: [Sharpness()], VectorLoss, tiny_loader, "scalar"),
    ("ELRWarmup without scale-invariant weights", lambda: [ELRWarmup()], lambda: MLP(in_features=8, num_classes=3, width=8, depth=2), tiny_loader, "MLP has no scale-invariant weights"),
    ("ELRWarmup on data with a NaN", lambda: [ELRWarmup()], TinyClassifier, nan_loader, "non-finite outputs"),
    ("probe batch without inputs", lambda: [RankMonitor()], TinyClassifier, dict_loader, "cannot find the inputs"),
    ("Parametrization of a module without saved hyper-parameters", lambda: [Parametrization("mup", base_width=8)], NoHparams, tiny_loader, "NoHparams"),
    ("Parametrization with a missing width key", lambda: [Parametrization("mup", base_width=8, width_keys=["d_model"])], TinyClassifier, tiny_loader, "d_model"),
    ("an output the suite cannot read", lambda: [CoordCheck()], StringOutput, tiny_loader, r"returned dict.*probe_outputs"),
    ("manual optimization without probe_loss", lambda: [FeatureAlignment()], Manual, tiny_loader, r"FeatureAlignment: Manual uses manual optimization.*probe_loss"),
    ("two instances of one callback without names", lambda: [RankMonitor(), RankMonitor(every_n_steps=5)], TinyClassifier, tiny_loader, "state_key"),
    ("NTK kernel above max_rows", lambda: [NTKSpectrum(probe_size=64, max_rows=100)], TinyClassifier, tiny_loader, r"max_rows=100.*lower probe_size"),
    ("Parametrization width path that does not exist", lambda: [Parametrization("mup", base_width=8, width_keys=["config.width"])],
     ConfigModule, tiny_loader, "config.width"),
    ("Parametrization branch pattern that matches nothing", lambda: [Parametrization("depth_mup", base_width=8, base_depth=1, branch_pattern=r"blocks\.\d+")],
     TinyClassifier, tiny_loader, "blocks"),
]


@pytest.mark.parametrize("case", FIT_CASES, ids=[c[0] for c in FIT_CASES])
def test_fails_before_the_first_optimizer_step(case: tuple) -> None:
    _, callbacks, make_module, make_loader, match = case
    torch.manual_seed(0)
    module = make_module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        fit(callbacks(), module=module, loader=make_loader(), max_steps=2)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k in after), "an optimizer step was taken"


INIT_CASES: list[tuple[str, Callable[[], Any], str]] = [
    ("every_n_steps < 1", lambda: RankMonitor(every_n_steps=0), "every_n_steps must be >= 1"),
    ("unknown schedule", lambda: Sharpness(schedule="cosine"), "schedule must be"),
    ("empty probe", lambda: CoordCheck(probe_size=0), "probe_size"),
    ("unknown bn_mode", lambda: FeatureAlignment(bn_mode="frozen"), "bn_mode"),
    ("NTK on train-mode BatchNorm", lambda: NTKSpectrum(bn_mode="train"), "BatchNorm"),
    ("unknown parametrization scheme", lambda: Parametrization(scheme="mup2"), "mup2"),
    ("negative target feature speed", lambda: FeatureSpeedControl(target_speed=-0.1), "target_speed"),
    ("missing local data set", lambda: TorchvisionDataModule(name="mnist", root="/nonexistent/data").setup(), "/nonexistent/data"),
]


@pytest.mark.parametrize("case", INIT_CASES, ids=[c[0] for c in INIT_CASES])
def test_bad_arguments_fail_at_once(case: tuple) -> None:
    _, build, match = case
    with pytest.raises((ValueError, TypeError, FileNotFoundError), match=match):
        build()
