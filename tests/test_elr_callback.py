"""EffectiveLR: logged ELRs against hand-computed ones, bit-identical training, skipped steps, errors, deep BN spread."""

from __future__ import annotations

import math
import statistics
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import NetClassifier, TinyClassifier, assert_same_training_state, fit
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.measure.elr import critical_lr


# --------------------------------------------------------------------------------------------------
# A deep BatchNorm-ReLU net without skips (shared with test_warmup.py)
# --------------------------------------------------------------------------------------------------
class DeepBN(NetClassifier):
    """``depth`` x (Linear -> BatchNorm -> ReLU) -> Linear, small init (so ``η*`` at init is small), plain SGD."""

    def __init__(self, depth: int = 20, width: int = 32, in_features: int = 16, num_classes: int = 4, lr: float = 0.1,
                 init_scale: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        d = in_features
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(depth):
                layers += [nn.Linear(d, width), nn.BatchNorm1d(width), nn.ReLU()]
                d = width
            layers.append(nn.Linear(d, num_classes))
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for m in self.net[:-1]:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(init_scale)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def full_batch_loader(n: int = 128, in_features: int = 16, num_classes: int = 4, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, in_features, generator=g), torch.randint(0, num_classes, (n,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=n, shuffle=False)


class Recorder(Callback):
    """Copies the ``elr/`` metrics after every optimizer step (put it after the callbacks it records)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.callback_metrics.clear()  # drop what was logged before training

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("elr/")})
        trainer.callback_metrics.clear()


def spreads(rows: list[dict[str, float]]) -> list[float]:
    return [r["elr/spread"] for r in rows]


def geo_mean(values: list[float]) -> float:
    return math.exp(statistics.mean(math.log(v) for v in values))


# --------------------------------------------------------------------------------------------------
class UpdateOracle(Callback):
    """Brute force: weights before/after each step and the gradients, to recompute what EffectiveLR logs."""

    def __init__(self) -> None:
        self.expected: list[dict[str, float]] = []
        self.logged: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.before = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        p = dict(pl_module.named_parameters())
        # scale-invariant: net.0 (before BN: weight alone), net.4 (before LayerNorm: weight and bias together)
        with torch.no_grad():
            e0 = float(p["net.0.weight"].grad.norm() / p["net.0.weight"].norm())
            g4 = torch.cat([p["net.4.weight"].grad.flatten(), p["net.4.bias"].grad])
            w4 = torch.cat([p["net.4.weight"].flatten(), p["net.4.bias"]])
        self.critical = critical_lr({"a": e0, "b": float(g4.norm() / w4.norm())})

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        after = {n: p.detach() for n, p in pl_module.named_parameters()}

        def elr(*names: str) -> float:
            d = sum(float((after[n] - self.before[n]).pow(2).sum()) for n in names)
            return math.sqrt(d / sum(float(self.before[n].pow(2).sum()) for n in names))

        e = {"net.0": elr("net.0.weight"), "net.4": elr("net.4.weight", "net.4.bias"), "net.7": elr("net.7.weight")}
        self.expected.append({**{f"elr/{k}": v for k, v in e.items()}, "elr/spread": max(e["net.0"], e["net.4"]) / min(e["net.0"], e["net.4"]),
                              "elr/critical_lr": self.critical})
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("elr/")})


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_logged_elrs_match_hand_computed(optimizer: str) -> None:
    oracle = UpdateOracle()
    cb = EffectiveLR(every_n_steps=1)
    fit([cb, oracle], module=TinyClassifier(optimizer=optimizer), max_steps=4)
    assert cb.invariance is not None
    assert {n: r.scale_invariant for n, r in cb.invariance.items()} == {"net.0": True, "net.4": True, "net.7": False}
    assert cb.invariance["net.4"].params == ("weight", "bias")
    assert len(oracle.expected) == 4
    for want, got in zip(oracle.expected, oracle.logged):
        for k, v in want.items():
            assert got[k] == pytest.approx(v, rel=1e-5), k
        assert got["elr/skipped_step"] == 0.0
        assert got["elr/log_spread_std"] == pytest.approx(0.5 * math.log(want["elr/spread"]), rel=1e-5)


def test_scale_invariance_flags_logged_once_before_training() -> None:
    rec = Recorder()

    class AtStart(Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}

    start = AtStart()
    fit([EffectiveLR(), start, rec], max_steps=2)
    assert {k: v for k, v in start.metrics.items() if k.startswith("elr/si/")} == {
        "elr/si/net.0": 1.0, "elr/si/net.4": 1.0, "elr/si/net.7": 0.0
    }
    assert not any(k.startswith("elr/si/") for r in rec.rows for k in r)


def test_training_is_bit_identical_with_effective_lr(tmp_path: Any) -> None:
    cb = EffectiveLR(every_n_steps=2, figure_every=2)
    with_cb = fit([cb], max_steps=6, logger=TensorBoardLogger(tmp_path))
    without = fit([], max_steps=6)
    assert_same_training_state(with_cb, without)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*")).parent)).Reload()
    tags = events.Tags()
    assert "elr/profile" in tags["images"]
    assert [e.step for e in events.Images("elr/profile")] == [2, 6]  # every 2nd measurement with ELRs (none at step 0)
    assert "elr/spread" in tags["scalars"] and "elr/net.7" in tags["scalars"]
    assert [e.step for e in events.Scalars("elr/spread")] == [2, 4, 6]


def test_skipped_steps_are_reported_not_divided_by_zero() -> None:
    rec = Recorder()
    fit([EffectiveLR(every_n_steps=1), rec], module=TinyClassifier(optimizer="sgd", lr=0.0), max_steps=2)
    assert [r["elr/skipped_step"] for r in rec.rows] == [1.0, 1.0]
    assert not any(k in r for r in rec.rows for k in ("elr/net.0", "elr/spread"))


@pytest.mark.parametrize(
    ("weights", "match"),
    [(["nope"], "'nope' matches no module"), (["net.2"], r"\['net.2'\] of TinyClassifier have no trainable `weight`")],
)
def test_bad_weight_names_fail_before_training(weights: list[str], match: str) -> None:
    module = TinyClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fit([EffectiveLR(weights=weights)], module=module)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_deep_bn_spread_starts_large_and_shrinks_under_small_constant_lr() -> None:
    rec = Recorder()
    cb = EffectiveLR(every_n_steps=1)
    fit([cb, rec], module=DeepBN(lr=1e-3), loader=full_batch_loader(), max_steps=12)
    assert cb.invariance is not None
    si = [n for n, r in cb.invariance.items() if r.scale_invariant]
    assert si == [f"net.{3 * i}" for i in range(20)]  # every hidden Linear, not the readout
    s = spreads(rec.rows)
    assert s[0] > 10
    assert geo_mean(s[-4:]) < s[0] / 3
    assert geo_mean(s[6:]) < geo_mean(s[:6])
    # the logged critical LR is far above this small LR after the first steps
    assert all(r["elr/lr_over_critical"] < 1 for r in rec.rows)
