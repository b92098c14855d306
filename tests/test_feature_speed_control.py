"""FeatureSpeedControl: reaches target speeds, composes with param groups and schedulers, resumes."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, fit, tiny_loader
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from helpers import MemoryLogger
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.feature_speed_control import FeatureSpeedControl

TARGETS = [0.01, 0.02, 0.04, 0.08]


def digits_full_batch() -> DataLoader:
    """The scikit-learn digits (standardised), one batch of everything: the probe sees the training batch."""
    from sklearn import datasets
    data = datasets.load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    return DataLoader(TensorDataset(x[:512], torch.tensor(data.target[:512])), batch_size=512)


@pytest.mark.parametrize(("optimizer", "lr"), [("adam", 1e-3), ("sgd", 0.05)])
def test_reaches_target_speeds_within_20_percent(optimizer, lr):
    import example_modules
    pl.seed_everything(0, verbose=False)
    module = example_modules.MLP(width=64, depth=3, optimizer=optimizer, lr=lr)
    cb, logger = FeatureSpeedControl(target_speed=TARGETS, every_n_steps=1, probe_size=512), MemoryLogger()
    fit([cb], module=module, loader=digits_full_batch(), max_steps=8, logger=logger)
    layers = ["layers.0", "layers.1", "layers.2", "readout"]
    first = logger.at(1, "align/control_speed/")
    assert any(abs(first[f"align/control_speed/{n}"] / t - 1) > 0.5 for n, t in zip(layers, TARGETS))  # not there by luck
    for step in (7, 8):
        speeds = logger.at(step, "align/control_speed/")
        for n, t in zip(layers, TARGETS):
            assert speeds[f"align/control_speed/{n}"] == pytest.approx(t, rel=0.2), (step, n, speeds)
    mult = logger.at(8, "align/control_multiplier/")
    lrs = logger.at(8, "align/control_lr/")
    for n in layers:
        assert lrs[f"align/control_lr/{n}"] == pytest.approx(lr * mult[f"align/control_multiplier/{n}"])


class TwoGroups(TinyClassifier):
    """Two parameter groups with their own lr/weight decay, and a per-step LambdaLR schedule."""

    def configure_optimizers(self) -> Any:
        head = list(self.net[7].parameters())
        body = [p for p in self.parameters() if all(p is not h for h in head)]
        opt = torch.optim.SGD(
            [{"params": body, "lr": 0.05, "weight_decay": 1e-3}, {"params": head, "lr": 0.02, "weight_decay": 0.0}],
            momentum=0.5,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 0.9**s, lambda s: 1.0 / (1 + s)])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class StepRecorder(Callback):
    """Scheduled lrs, weights, grads and multipliers at each step (read before the step's lr scaling)."""

    def __init__(self, control: FeatureSpeedControl) -> None:
        self.control = control
        self.rows: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        self.rows[trainer.global_step] = {
            "lrs": [g["lr"] for g in opt.param_groups],
            "mult": list(self.control.multipliers),
            "theta": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
        }

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.rows[trainer.global_step]["grad"] = {n: p.grad.clone() for n, p in pl_module.named_parameters()}


def test_splits_groups_keeps_hyperparameters_and_scales_the_scheduled_lr():
    pl.seed_everything(0, verbose=False)
    module = TwoGroups(optimizer="sgd")
    control = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, layers=["net.0", "net.4"], probe_size=32, smoothing=0.0)
    rec = StepRecorder(control)
    module, trainer = fit([control, rec], module=module, max_steps=4)
    opt = trainer.optimizers[0]
    # net.0 owns net.0.*; net.4 owns net.1.* (BatchNorm) and net.4.*; net.5 (LayerNorm) and net.7 are left alone
    assert control.plan == [["net.0.weight", "net.0.bias"], ["net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"]]
    names = {id(p): n for n, p in module.named_parameters()}
    groups = [[names[id(p)] for p in g["params"]] for g in opt.param_groups]
    assert groups == [
        ["net.0.weight", "net.0.bias"],
        ["net.1.weight", "net.1.bias", "net.4.weight", "net.4.bias"],
        ["net.5.weight", "net.5.bias"],
        ["net.7.weight", "net.7.bias"],
    ]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 1e-3, 1e-3, 0.0]
    assert all(g["momentum"] == 0.5 for g in opt.param_groups)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [0.05, 0.05, 0.05, 0.02]
    assert [g["initial_lr"] for g in opt.param_groups] == [0.05, 0.05, 0.05, 0.02]
    # the schedule is untouched by the multipliers
    for step, row in rec.rows.items():
        assert row["lrs"] == pytest.approx([0.05 * 0.9**step] * 3 + [0.02 / (1 + step)])
    assert control.multipliers != [1.0, 1.0]
    # the step applied the scheduled lr times the multiplier: check through the SGD momentum recursion
    buf: dict[str, torch.Tensor] = {}
    layer_of = {n: i for i, names_ in enumerate(control.plan) for n in names_}
    wd = {n: (0.0 if n.startswith("net.7") else 1e-3) for n in rec.rows[0]["theta"]}
    for step in range(3):
        row, nxt = rec.rows[step], rec.rows[step + 1]
        for n, theta in row["theta"].items():
            g = row["grad"][n] + wd[n] * theta
            buf[n] = g if step == 0 else 0.5 * buf[n] + g
            group = groups.index(next(gr for gr in groups if n in gr))
            lr = row["lrs"][group] * (row["mult"][layer_of[n]] if n in layer_of else 1.0)
            torch.testing.assert_close(nxt["theta"][n], theta - lr * buf[n], rtol=1e-5, atol=1e-7)


def test_unit_multipliers_leave_training_bit_identical():
    """With multipliers pinned at 1 the split groups and the probes change nothing."""

    def run(callbacks):
        pl.seed_everything(0, verbose=False)
        return fit(callbacks, module=TwoGroups(optimizer="sgd"), max_steps=5)

    pinned = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, min_multiplier=1.0, max_multiplier=1.0, probe_size=32)
    (ma, ta), (mb, tb) = run([]), run([pinned])
    sa, sb = ma.state_dict(), mb.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # optimizer states match parameter by parameter (the group layout differs by design)
    ida = {id(p): n for n, p in ma.named_parameters()}
    idb = {id(p): n for n, p in mb.named_parameters()}
    state_a = {ida[id(p)]: s for p, s in ta.optimizers[0].state.items()}
    state_b = {idb[id(p)]: s for p, s in tb.optimizers[0].state.items()}
    assert state_a.keys() == state_b.keys()
    for n in state_a:
        assert torch.equal(state_a[n]["momentum_buffer"], state_b[n]["momentum_buffer"]), n


def test_resume_restores_plan_multipliers_and_optimizer_state(tmp_path):
    pl.seed_everything(0, verbose=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3)
    first = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, layers=["net.0", "net.4"], probe_size=32)
    fit([first, ckpt], module=TwoGroups(optimizer="sgd"), max_steps=3, enable_checkpointing=True)
    saved = list(first.multipliers)
    second = FeatureSpeedControl(target_speed=0.05, every_n_steps=1, layers=["net.0", "net.4"], probe_size=32)
    trainer = pl.Trainer(
        max_steps=5, callbacks=[second], accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False,
    )
    trainer.fit(TwoGroups(optimizer="sgd"), tiny_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert trainer.global_step == 5
    assert second.plan == first.plan
    assert len(trainer.optimizers[0].param_groups) == 4
    assert second.multipliers != saved  # two more control steps ran from the restored values


def test_clear_errors():
    with pytest.raises(ValueError, match="target_speed"):
        FeatureSpeedControl(target_speed=-1.0)
    with pytest.raises(ValueError, match="smoothing"):
        FeatureSpeedControl(target_speed=0.1, smoothing=1.0)
    with pytest.raises(ValueError, match="min_multiplier"):
        FeatureSpeedControl(target_speed=0.1, min_multiplier=2.0)
    with pytest.raises(ValueError, match="3 targets for 2 layers"):
        fit([FeatureSpeedControl(target_speed=[0.1, 0.1, 0.1], layers=["net.0", "net.4"])], max_steps=1)
    with pytest.raises(ValueError, match="'net.42'"):
        fit([FeatureSpeedControl(target_speed=0.1, layers=["net.42"])], max_steps=1)
    with pytest.raises(ValueError, match="'net.2'.*no parameters of its own"):
        fit([FeatureSpeedControl(target_speed=0.1, layers=["net.1", "net.2"])], max_steps=1)
