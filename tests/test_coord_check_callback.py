"""CoordCheck callback: values against a hand computation, no effect on training, h_0 across resume."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import pytest
import torch
from helpers import TinyClassifier, assert_same_training_state, fit, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from param_nets import LitMLP

from lightning_align.callbacks.coord_check import CoordCheck


def test_training_is_bit_identical_with_and_without():
    torch.manual_seed(0)
    plain = fit([], module=TinyClassifier(), max_steps=5)
    torch.manual_seed(0)
    measured = fit([CoordCheck(every_n_steps=2, probe_size=32)], module=TinyClassifier(), max_steps=5)
    assert_same_training_state(plain, measured)


def test_values_match_hand_computation():
    torch.manual_seed(0)
    module = LitMLP(width=16, depth=2)
    initial = copy.deepcopy(module)
    cb = CoordCheck(every_n_steps=3, probe_size=24)
    _, trainer = fit([cb], module=module, max_steps=3)
    x = cb.probe_batch[0]
    with torch.no_grad():
        for name, layer_idx in (("layers.0", 0), ("layers.1", 1)):
            def hidden(m, upto=layer_idx):
                h = x
                for i in range(upto):
                    h = torch.tanh(m.layers[i](h))
                return m.layers[upto](h)

            h0, h = hidden(initial), hidden(module)
            m = trainer.callback_metrics
            assert m[f"coord/rms/{name}"].item() == pytest.approx(h.pow(2).mean().sqrt().item(), rel=1e-5)
            assert m[f"coord/l1/{name}"].item() == pytest.approx(h.abs().mean().item(), rel=1e-5)
            assert m[f"coord/delta/{name}"].item() == pytest.approx(((h - h0).norm() / h0.norm()).item(), rel=1e-4)
            assert m[f"coord/delta/{name}"].item() > 0
        out = module(x)
        assert trainer.callback_metrics["coord/rms/readout"].item() == pytest.approx(out.pow(2).mean().sqrt().item(), rel=1e-5)


def test_h0_survives_resume(tmp_path):
    torch.manual_seed(0)
    first_cb = CoordCheck(every_n_steps=1, probe_size=16)
    fit(
        [first_cb, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
        module=LitMLP(width=16),
        max_steps=2,
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    resumed_cb = CoordCheck(every_n_steps=1, probe_size=16)
    trainer = pl.Trainer(
        callbacks=[resumed_cb], max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, accelerator="cpu", devices=1,
    )  # fmt: skip
    trainer.fit(LitMLP(width=16), tiny_loader(), ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed_cb._h0.keys() == first_cb._h0.keys()
    for k, v in first_cb._h0.items():
        assert torch.equal(resumed_cb._h0[k], v)
    assert resumed_cb.last_step == 3


def test_bad_layer_name_fails_before_training():
    module = LitMLP(width=16)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(ValueError, match=r"CoordCheck\(layers=...\).*'hidden.0'"):
        fit([CoordCheck(layers=["hidden.0"])], module=module, max_steps=2)
    for k, v in before.items():
        assert torch.equal(module.state_dict()[k], v)
