"""The Parametrization callback inside Lightning: SP at the base, groups/schedulers, apply-once, errors."""

from __future__ import annotations

import copy
from types import MethodType

import lightning.pytorch as pl
import pytest
import torch
from helpers import assert_same_training_state, fit, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from param_nets import LazyLitMLP, LitMLP, LitResMLP

import lightning_align.callbacks.parametrization as param_cb
from lightning_align.callbacks.parametrization import Parametrization
from lightning_align.parametrize.auto import auto_parametrize


def _per_param_lr(module, optimizer):
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("scheme", ["mup", "completep", "ntk"])
def test_base_width_and_depth_is_sp_bit_exact(scheme):
    kwargs = {"branch_pattern": r"blocks\.\d+"} if scheme == "completep" else {}
    cb = Parametrization(scheme, base_width=32, base_depth=3, verbose=False, **kwargs)
    torch.manual_seed(0)
    plain = fit([], module=LitResMLP(width=32, depth=3), max_steps=4)
    torch.manual_seed(0)
    param = fit([cb], module=LitResMLP(width=32, depth=3), max_steps=4)
    assert_same_training_state(plain, param)


def test_groups_equal_pure_function_and_follow_lambda_scheduler():
    module, trainer = fit(
        [Parametrization("mup", base_width=16, verbose=False)],
        module=LitMLP(width=64, depth=3, optimizer="adamw", lr=0.01, weight_decay=0.1, scheduler="lambda"),
        max_steps=9,
    )
    opt = trainer.optimizers[0]
    reference = LitMLP(width=64, depth=3)
    p = auto_parametrize(reference, "mup", base_width=16)
    want = _per_param_lr(reference, p.rewrite_optimizer(torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.1)))
    got = {n: (g["initial_lr"], g["weight_decay"]) for n, g in _named_groups(module, opt).items()}
    assert got == want
    assert len({v[0] for v in got.values()}) == 2  # hidden η/4 and the rest η
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert sched.base_lrs == [g["initial_lr"] for g in opt.param_groups]
    assert sched.last_epoch >= 2 and len(sched.lr_lambdas) == len(opt.param_groups)
    for g in opt.param_groups:  # LambdaLR 1/(1+epoch), relative to each group's own LR
        assert g["lr"] == pytest.approx(g["initial_lr"] / (1 + sched.last_epoch))


def _named_groups(module, opt):
    names = {id(p): n for n, p in module.named_parameters()}
    return {names[id(p)]: g for g in opt.param_groups for p in g["params"]}


def test_onecycle_scheduler_max_lr_follows():
    module, trainer = fit(
        [Parametrization("mup", base_width=16, verbose=False)],
        module=LitMLP(width=64, depth=3, lr=0.02, scheduler="onecycle"),
        max_steps=2,
    )
    groups = _named_groups(module, trainer.optimizers[0])
    assert groups["layers.1.weight"]["max_lr"] == pytest.approx(0.02 / 4)
    assert groups["readout.weight"]["max_lr"] == pytest.approx(0.02)
    assert groups["layers.1.weight"]["lr"] == pytest.approx(groups["readout.weight"]["lr"] / 4)


def test_cli_style_prebuilt_optimizer_is_split_once():
    module = LitMLP(width=64, depth=3)
    prebuilt = torch.optim.SGD(module.parameters(), lr=0.1)  # as LightningCLI builds it from `optimizer:`
    module.configure_optimizers = MethodType(lambda self: prebuilt, module)
    cb = Parametrization("mup", base_width=16, verbose=False)
    fit([cb], module=module, max_steps=1)
    groups = _named_groups(module, prebuilt)
    assert groups["layers.1.weight"]["lr"] == pytest.approx(0.1)  # SGD hidden: η (fan ratio 1)
    assert groups["layers.0.weight"]["lr"] == pytest.approx(0.4)  # SGD input: η·m
    assert groups["readout.bias"]["lr"] == pytest.approx(0.1)
    fit([cb], module=module, max_steps=2)  # second fit: same optimizer object, not scaled twice
    assert _named_groups(module, prebuilt)["layers.0.weight"]["lr"] == pytest.approx(0.4)


def test_applied_once_on_second_fit_and_tables_logged(monkeypatch):
    logged = []
    monkeypatch.setattr(param_cb, "log_text", lambda trainer, name, text: logged.append(name))
    module = LitMLP(width=64, depth=3)
    cb = Parametrization("mup", base_width=16, verbose=False)
    torch.manual_seed(0)
    expected = LitMLP(width=64, depth=3)
    module.load_state_dict(expected.state_dict())
    auto_parametrize(expected, "mup", base_width=16)
    fit([cb], module=module, max_steps=0)
    assert torch.equal(module.readout.weight, expected.readout.weight)  # rescaled once (×√4)
    assert len(module.readout._forward_pre_hooks) == 1
    fit([cb], module=module, max_steps=0)
    assert torch.equal(module.readout.weight, expected.readout.weight)  # not again
    assert len(module.readout._forward_pre_hooks) == 1
    assert "param/roles" in logged and "param/lr_table" in logged
    state = cb.state_dict()
    assert state["applied"] and state["roles"]["layers.1.weight"]["role"] == "hidden"


def test_ckpt_resume_keeps_checkpoint_weights_and_multipliers(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    first, _ = fit(
        [Parametrization("mup", base_width=16, verbose=False), ckpt],
        module=LitMLP(width=64, depth=3),
        max_steps=2,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    resumed = LitMLP(width=64, depth=3)
    cb = Parametrization("mup", base_width=16, verbose=False)
    trainer = pl.Trainer(
        callbacks=[cb], max_steps=2, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(resumed, tiny_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    for k, v in first.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    x = torch.randn(4, 8)
    assert torch.equal(resumed(x), first(x))  # the readout multiplier is back on the fresh module
    assert cb.state_dict()["applied"]
    with pytest.raises(ValueError, match="trained with scheme 'mup'"):
        Parametrization("ntk").load_state_dict(cb.state_dict())
    other_base = Parametrization("mup", base_width=32, verbose=False)
    trainer = pl.Trainer(
        callbacks=[other_base], max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    with pytest.raises(ValueError, match="resume with the same base_width"):
        trainer.fit(LitMLP(width=64, depth=3), tiny_loader(), ckpt_path=str(tmp_path / "last.ckpt"))


@pytest.mark.parametrize(
    "cb_kwargs,module_kwargs,match",
    [
        ({"width_keys": ["hidden"]}, {}, r"width key\(s\) \['hidden'\]"),
        ({}, {"optimizer": "lbfgs"}, "LBFGS is not supported"),
        ({"branch_pattern": "nothing.*"}, {}, "matches no module"),
        ({"scheme": "depth_mup"}, {}, "needs the residual branches"),
    ],
)
def test_bad_input_fails_before_training(cb_kwargs, module_kwargs, match):
    module = LitMLP(width=64, **module_kwargs)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        fit([Parametrization(base_width=16, verbose=False, **cb_kwargs)], module=module, max_steps=2)
    if not cb_kwargs:  # failed at configure_optimizers: weights were rescaled but never stepped
        assert torch.equal(module.layers[1].weight, before["layers.1.weight"])
        assert "configure_optimizers" not in module.__dict__  # the wrapper is removed after the failure


def test_constructor_errors():
    with pytest.raises(ValueError, match=r"Parametrization\(scheme='mu_p'\): scheme must be one of 'sp', .*got 'mu_p' \(did you mean 'mup'\?\)"):
        Parametrization("mu_p")
    with pytest.raises(ValueError, match="init must be one of"):
        Parametrization(init="xavier")
    with pytest.raises(ValueError, match=r"Parametrization\(base_width=0\): base_width must be an int >= 1 or None; got 0"):
        Parametrization(base_width=0)
    with pytest.raises(ValueError, match="not a valid regular expression"):
        Parametrization(branch_pattern="(")


def test_model_built_in_configure_model_and_module_stays_picklable(tmp_path):
    torch.manual_seed(0)
    module = LazyLitMLP(width=64, depth=3)
    _, trainer = fit([Parametrization("mup", base_width=16, verbose=False)], module=module, max_steps=1)
    groups = _named_groups(module, trainer.optimizers[0])
    assert groups["layers.1.weight"]["lr"] == pytest.approx(1e-2 / 4)
    assert len(module.readout._forward_pre_hooks) == 1
    clone = copy.deepcopy(module)
    torch.save(module, tmp_path / "module.pt")
    loaded = torch.load(tmp_path / "module.pt", weights_only=False)
    x = torch.randn(3, 8)
    assert torch.equal(clone(x), module(x)) and torch.equal(loaded(x), module(x))
    assert "configure_optimizers" not in module.__dict__  # the wrapper is removed at teardown
