"""FeatureAlignment: the real optimizer update, values against a brute-force oracle, no effect on training."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit, tiny_loader
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_align.callbacks.alignment import FeatureAlignment
from lightning_align.measure.modules import select_modules
from lightning_align.measure.modules import captured_outputs


class Recorder(Callback):
    """Weights before and after each optimizer step."""

    def __init__(self) -> None:
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.before[trainer.global_step + 1] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.after[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def oracle(module: TinyClassifier, theta: dict[str, torch.Tensor], delta: dict[str, torch.Tensor], batch, layers):
    """Float64 brute force: features by hooks, b by autograd, δf by central finite differences."""
    net = copy.deepcopy(module).double()
    net.train()
    for m in net.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    x, y = batch[0].double(), batch[1]
    mods = {n: net.get_submodule(n) for n in layers}

    def run(t: float):
        with torch.no_grad():
            for n, p in net.named_parameters():
                p.copy_(theta[n].double() + t * delta[n].double())
        with captured_outputs(mods) as st:
            loss = nn.functional.cross_entropy(net(x), y)
        return st, loss

    st, loss = run(0.0)
    bs = torch.autograd.grad(loss, [st[n] for n in layers])
    eps = 1e-5
    plus, _ = run(eps)
    minus, _ = run(-eps)
    out = {}
    for n, b in zip(layers, bs):
        df = ((plus[n] - minus[n]) / (2 * eps)).detach()
        f = st[n].detach()
        out[n] = (float(-(b * df).sum() / (b.norm() * df.norm())), float(df.norm() / f.norm()))
    return out


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_logged_values_use_the_real_update(optimizer):
    layers = ["net.0", "net.4", "net.7"]
    rec, cb, logger = Recorder(), FeatureAlignment(every_n_steps=2, probe_size=32, figure_every=0), MemoryLogger()
    module, trainer = fit([rec, cb], module=TinyClassifier(optimizer=optimizer), max_steps=4, logger=logger)
    for step in (2, 4):
        theta = rec.before[step]
        delta = {n: rec.after[step][n] - theta[n] for n in theta}
        ref = oracle(module, theta, delta, cb.probe_batch, layers)
        logged = logger.at(step, "align/")
        for n in layers:
            assert logged[f"align/cos/{n}"] == pytest.approx(ref[n][0], rel=1e-3, abs=1e-4)
            assert logged[f"align/speed/{n}"] == pytest.approx(ref[n][1], rel=1e-3)
            # sequential net: every layer output is a cut, so the formula is exact at first order
            assert logged[f"align/predicted_speed/{n}"] == pytest.approx(logged[f"align/speed/{n}"], rel=1e-3)


def test_step_zero_uses_the_gradient_step_at_the_optimizer_lr():
    layers = ["net.0", "net.7"]
    cb, logger = FeatureAlignment(every_n_steps=5, layers=layers, probe_size=32, figure_every=0), MemoryLogger()
    pl.seed_everything(0)
    module = TinyClassifier(optimizer="sgd", lr=0.05)
    init = copy.deepcopy(module)
    fit([cb], module=module, max_steps=1, logger=logger)
    # oracle: Δθ = −lr·∇L on the probe at the initial weights
    net = copy.deepcopy(init)
    net.train()
    net.net[3].eval()
    loss = nn.functional.cross_entropy(net(cb.probe_batch[0]), cb.probe_batch[1])
    grads = torch.autograd.grad(loss, list(net.parameters()))
    theta = {n: p.detach() for n, p in init.named_parameters()}
    delta = {n: -0.05 * g for (n, _), g in zip(init.named_parameters(), grads)}
    ref = oracle(init, theta, delta, cb.probe_batch, layers)
    logged = logger.at(0, "align/")
    for n in layers:
        assert logged[f"align/cos/{n}"] == pytest.approx(ref[n][0], rel=1e-3, abs=1e-4)
        assert logged[f"align/speed/{n}"] == pytest.approx(ref[n][1], rel=1e-3)


def seeded(optimizer: str) -> TinyClassifier:
    pl.seed_everything(0, verbose=False)
    return TinyClassifier(optimizer=optimizer)


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_is_bit_identical_with_the_callback(optimizer):
    plain = fit(module=seeded(optimizer), max_steps=5)
    measured = fit([FeatureAlignment(every_n_steps=1, probe_size=32, figure_every=2)], module=seeded(optimizer), max_steps=5)
    assert_same_training_state(plain, measured)


def test_unknown_module_fails_before_training_naming_it():
    pl.seed_everything(0)
    module = TinyClassifier()
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match="'net.99'"):
        fit([FeatureAlignment(every_n_steps=1, layers=["net.0", "net.99"])], module=module)
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k])


def test_default_modules_are_linear_conv_and_attention():
    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_scale, self.head_dim = 0.5, 4
            self.qkv = nn.Linear(4, 12)

    model = nn.Sequential(nn.Conv1d(1, 2, 3), Attn(), nn.MultiheadAttention(4, 1), nn.Embedding(3, 4), nn.ReLU())
    assert list(select_modules(model, None, "features", owner="x")) == ["0", "1", "1.qkv", "2", "2.out_proj"]
    with pytest.raises(ValueError, match="no Linear"):
        select_modules(nn.Sequential(nn.ReLU()), None, "features", owner="x")


def test_figure_and_tags_with_tensorboard_on_an_example_module(tmp_path):
    import example_modules
    module = example_modules.ResMLP(width=32, depth=3, branch_multiplier=None, optimizer="adam", lr=1e-3)
    cb = FeatureAlignment(every_n_steps=2, layers=["embed", r"blocks\.\d+", "readout"], probe_size=64, figure_every=1)
    loader = tiny_loader(n=64, in_features=64, num_classes=10, batch_size=32)
    _, trainer = fit([cb], module=module, loader=loader, max_steps=2, logger=TensorBoardLogger(tmp_path))
    metrics = trainer.callback_metrics
    for n in ["embed", "blocks.0", "blocks.2", "readout"]:
        assert 0 < float(metrics[f"align/cos/{n}"]) <= 1
        # residual-stream outputs are cuts: the formula holds
        assert float(metrics[f"align/predicted_speed/{n}"]) == pytest.approx(float(metrics[f"align/speed/{n}"]), rel=1e-3)
    assert list(tmp_path.rglob("events.out.tfevents*"))
    assert cb.state_dict()["num_measurements"] == 2
