"""Strategies with flat parameter shards (FSDP1, DeepSpeed) are refused at fit start by every callback, clearly;
ModelParallelStrategy (FSDP2) by the callbacks that declare a ``sharded_refusal`` (the others run there:
tests/test_sharded.py, tests/test_sharded_monitors.py, tests/test_sharded_alignment.py).

On this CPU machine no FSDP1 fit can run: Lightning refuses ``FSDPStrategy`` without a GPU when the Trainer
is built. So the strategy objects are built without running them and handed to each callback's first hook
through a stub trainer; real single-device and DDP trainers must pass.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_align import FeatureAlignment, NTKSpectrum, Sharpness
from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.callbacks.rank import RankMonitor
from lightning_align.callbacks.strategy import check_strategy, flat_sharding_strategy_classes, model_parallel_strategy_classes
from lightning_align.callbacks.warmup import ELRWarmup


def deepspeed_strategy() -> DeepSpeedStrategy:
    # Its __init__ needs the deepspeed package; the check only looks at the class.
    return DeepSpeedStrategy.__new__(DeepSpeedStrategy)


SHARDING = {"FSDPStrategy": FSDPStrategy, "DeepSpeedStrategy": deepspeed_strategy}


def test_fsdp_cannot_even_be_built_on_cpu() -> None:
    """Documents why the tests below use a stub trainer (fails, i.e. becomes testable, if Lightning changes)."""
    with pytest.raises(ValueError, match="requires a GPU"):
        pl.Trainer(strategy=FSDPStrategy(), accelerator="cpu", devices=1, logger=False)


def test_the_sharding_classes_are_found() -> None:
    assert {FSDPStrategy, DeepSpeedStrategy} <= set(flat_sharding_strategy_classes())
    assert ModelParallelStrategy in model_parallel_strategy_classes()
    assert ModelParallelStrategy not in flat_sharding_strategy_classes()


@pytest.mark.parametrize("name", list(SHARDING))
def test_sharding_strategy_error_names_owner_strategy_and_remedy(name: str) -> None:
    with pytest.raises(ValueError) as err:
        check_strategy(SimpleNamespace(strategy=SHARDING[name]()), "Sharpness")
    message = str(err.value)
    assert message.startswith("Sharpness:")
    assert name in message
    assert "ddp" in message and "remove the callback" in message


@pytest.mark.parametrize("callback", [NTKSpectrum])
def test_model_parallel_is_refused_with_the_callbacks_reason(callback: type) -> None:
    reason = callback.sharded_refusal
    assert reason, f"{callback.__name__} declares no reason"
    with pytest.raises(ValueError) as err:
        check_strategy(SimpleNamespace(strategy=ModelParallelStrategy()), callback.__name__, reason)
    message = str(err.value)
    assert message.startswith(f"{callback.__name__} cannot run under ModelParallelStrategy")
    assert reason in message and "strategy='ddp'" in message


@pytest.mark.parametrize("callback", [Sharpness, FeatureAlignment, FeatureSpeedControl])
def test_model_parallel_passes_for_callbacks_that_run_sharded(callback: type) -> None:
    assert callback.sharded_refusal is None
    check_strategy(SimpleNamespace(strategy=ModelParallelStrategy()), callback.__name__, callback.sharded_refusal)
    check_strategy(SimpleNamespace(strategy=ModelParallelStrategy()), "Parametrization")


def test_single_device_and_ddp_trainers_pass() -> None:
    common: dict[str, Any] = dict(accelerator="cpu", logger=False, enable_checkpointing=False)
    check_strategy(pl.Trainer(devices=1, **common), "Sharpness")
    check_strategy(pl.Trainer(strategy="ddp_spawn", devices=2, **common), "Sharpness")
    check_strategy(pl.Trainer(strategy=DDPStrategy(), devices=1, **common), "Sharpness")
    check_strategy(SimpleNamespace(strategy=None), "Sharpness")


class Normalized(pl.LightningModule):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.LayerNorm(width), torch.nn.ReLU(), torch.nn.Linear(width, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.mark.parametrize("strategy", [FSDPStrategy, deepspeed_strategy])
@pytest.mark.parametrize(
    "make, hook, owner",
    [
        (lambda: RankMonitor(), "on_fit_start", "RankMonitor"),
        (lambda: FeatureSpeedControl(target_speed=0.05), "on_fit_start", "FeatureSpeedControl"),
        (lambda: ELRWarmup(), "on_fit_start", "ELRWarmup"),
        (lambda: Parametrization("mup", base_width=16, verbose=False), "setup", "Parametrization"),
    ],
)
def test_each_callback_refuses_at_its_first_hook_and_changes_nothing(make, hook, owner, strategy) -> None:
    callback = make()
    module = Normalized()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    configure = module.__dict__.get("configure_optimizers")
    trainer = SimpleNamespace(strategy=strategy(), optimizers=[], ckpt_path=None, callbacks=[callback], loggers=[])
    args = (trainer, module, "fit") if hook == "setup" else (trainer, module)
    with pytest.raises(ValueError, match=rf"^{owner}: the \w+Strategy strategy flattens and shards"):
        getattr(callback, hook)(*args)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights changed before the error"
    assert module.__dict__.get("configure_optimizers") is configure, "configure_optimizers was wrapped before the error"
    assert not getattr(callback, "applied", False)

