"""EffectiveLR / ELRWarmup's scale-invariance test on models whose output is zero at init.

A zero-initialised classification head, LoRA's zero ``B`` matrices, μP's zero readout: at init scaling any
weight upstream changes nothing (the output stays zero) and a zero weight is the same after scaling, so a test
at the probe point alone calls them all scale-invariant. Oracle: brute force on a float64 copy, multiplying a
weight (and weight with bias) by 2 and by 0.5 and comparing the loss and the outputs on the probe batch, at init
and after training steps: a weight found scale-invariant must be invariant at both; one found not invariant must
move the outputs after training, whichever group is scaled.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import NetClassifier, fit
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_align import ELRWarmup, EffectiveLR, Parametrization
from lightning_align.measure.elr import detect_scale_invariance

IN, CLASSES, N = 8, 3, 32
VOCAB, T = 24, 8


def zero_(layer: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        layer.weight.zero_()
        if layer.bias is not None:
            layer.bias.zero_()
    return layer


class ZeroHeadNet(NetClassifier):
    """``Linear -> norm -> act`` twice, then a zero-initialised classification head; Adam."""

    def __init__(self, norm: str = "batch") -> None:
        super().__init__()
        make = {"batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
        act = nn.ReLU if norm == "batch" else nn.GELU
        self.net = nn.Sequential(nn.Linear(IN, 16), make(16), act(), nn.Linear(16, 16), make(16), act(), zero_(nn.Linear(16, CLASSES)))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=3e-2)


class LoraGPT2(pl.LightningModule):
    """A tiny Hugging Face GPT-2 under PEFT LoRA adapters (``B`` zero at init; only the adapters train)."""

    def __init__(self) -> None:
        super().__init__()
        transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=T, n_embd=16, n_layer=2, n_head=2)
        lora = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0)
        self.model = peft.get_peft_model(transformers.GPT2LMHeadModel(config), lora)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        (ids,) = batch
        return nn.functional.cross_entropy(self(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=3e-2)


def vector_loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(N, IN, generator=g), torch.randint(0, CLASSES, (N,), generator=g)), batch_size=N)


def token_loader() -> DataLoader:
    return DataLoader(TensorDataset(torch.randint(0, VOCAB, (N, T), generator=torch.Generator().manual_seed(0))), batch_size=N)


def mup_mlp() -> pl.LightningModule:
    from example_modules import MLP

    return MLP(in_features=IN, num_classes=CLASSES, width=16, depth=2, optimizer="adam", lr=3e-2)


#: case -> (module factory, loader, callbacks before EffectiveLR, the scale-invariant layers (brute force, after training))
CASES: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], DataLoader], Callable[[], list[Callback]], dict[str, tuple[str, ...]]]] = {
    "batchnorm_zero_readout": (ZeroHeadNet, vector_loader, list, {"net.0": ("weight",), "net.3": ("weight",)}),
    "mup_readout_zero_init": (mup_mlp, vector_loader, lambda: [Parametrization("mup", readout_zero_init=True, verbose=False)], {}),
    "gpt2_lora": (LoraGPT2, token_loader, list, {}),
    "layernorm_zero_head": (lambda: ZeroHeadNet("layer"), vector_loader, list, {"net.0": ("weight", "bias"), "net.3": ("weight", "bias")}),
}


# --------------------------------------------------------------------------------------------------
# The brute-force oracle
# --------------------------------------------------------------------------------------------------
def loss_and_outputs(module: pl.LightningModule, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss and the outputs on ``batch``: BatchNorm on batch statistics, dropout off."""
    module.eval()
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.train()
    with torch.no_grad():
        return module.training_step(batch, 0).detach(), module(batch[0]).detach()


def brute_force_change(module: pl.LightningModule, batch: Any, layer: str, attrs: tuple[str, ...]) -> float:
    """Largest relative change of the loss and of the outputs when ``layer``'s ``attrs`` are multiplied by 2 and
    by 0.5, on a float64 copy of ``module`` whose norm layers' ``eps`` is 1e-30 (``eps`` alone breaks invariance by
    about ``eps/variance``, 1e-4 after these few steps)."""
    model = copy.deepcopy(module).double()
    for m in model.modules():
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
            m.eps = 1e-30
    batch = [t.double() if t.is_floating_point() else t for t in batch]
    tensors = [getattr(model.get_submodule(layer), a) for a in attrs]
    loss, out = loss_and_outputs(model, batch)
    worst = 0.0
    for c in (2.0, 0.5):
        with torch.no_grad():
            for t in tensors:
                t.mul_(c)
        loss_c, out_c = loss_and_outputs(model, batch)
        with torch.no_grad():
            for t in tensors:
                t.div_(c)  # exact: a power of 2
        worst = max(worst, float((loss_c - loss).abs() / loss.abs()), float((out_c - out).norm() / out.norm().clamp_min(1e-300)))
    return worst


class Snapshot(Callback):
    """A copy of the module as training starts (after Parametrization's init) and the ``elr/`` values logged by then."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.module = copy.deepcopy(pl_module)
        self.logged = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("elr/")}


class Logged(Callback):
    """The ``elr/`` values logged at every optimizer step."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("elr/")})
        trainer.callback_metrics.clear()


# --------------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:You are trying to `self.log")  # the oracle calls training_step outside a fit
@pytest.mark.parametrize("case", list(CASES))
def test_effective_lr_scale_invariance_holds_by_brute_force_at_init_and_after_training(case: str, caplog: Any) -> None:
    make, loader, before, expected = CASES[case]
    cb, start, logged = EffectiveLR(every_n_steps=1, probe_size=N), Snapshot(), Logged()
    with caplog.at_level(logging.INFO):
        trained, _ = fit([*before(), cb, start, logged], module=make, loader=loader(), max_steps=8)
    assert cb.invariance is not None
    found = {n: r.params for n, r in cb.invariance.items() if r.scale_invariant}
    assert found == expected
    assert {k[len("elr/si/"):]: v for k, v in start.logged.items() if k.startswith("elr/si/")} == {
        n: float(n in expected) for n in cb.invariance
    }
    batch = next(iter(loader()))
    hidden = [n for n, r in cb.invariance.items() if r.hidden]
    assert hidden, "the case must have weights that the probe point alone calls scale-invariant"
    for name, result in cb.invariance.items():
        if result.scale_invariant:
            assert brute_force_change(start.module, batch, name, result.params) < 1e-9, name
            assert brute_force_change(trained, batch, name, result.params) < 1e-9, name
            continue
        groups = [("weight",), *([("weight", "bias")] if getattr(trained.get_submodule(name), "bias", None) is not None else [])]
        for attrs in groups:  # not scale-invariant however it is grouped: the outputs move after training
            assert brute_force_change(trained, batch, name, attrs) > 1e-2, (name, attrs)
        if name in hidden:  # ... though at init they did not (what fooled the test at the probe point alone)
            assert brute_force_change(start.module, batch, name, ("weight",)) < 1e-9, name
    message = next(r.getMessage() for r in caplog.records if "count as not scale-invariant" in r.getMessage())
    assert message.startswith("EffectiveLR:") and all(n in message for n in hidden)
    # elr/spread and elr/critical_lr come from the scale-invariant layers only, or are not logged at all
    for row in logged.rows:
        if not expected:
            assert "elr/spread" not in row and "elr/critical_lr" not in row
        elif "elr/spread" in row:
            elrs = [row[f"elr/{n}"] for n in expected]  # none moves at step 1: the zero head passes no gradient back
            want = max(elrs) / min(elrs) if min(elrs) > 0 else (math.inf if max(elrs) > 0 else math.nan)
            assert row["elr/spread"] == pytest.approx(want, rel=1e-6, nan_ok=True)  # logged as float32
    assert any("elr/spread" in row for row in logged.rows) == bool(expected)


def test_elr_warmup_refuses_a_model_whose_invariance_was_only_a_zero_output() -> None:
    """LoRA adapters on GPT-2: no weight is scale-invariant; the warm-up must not act on the adapters."""
    module = LoraGPT2()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match="ELRWarmup: LoraGPT2 has no scale-invariant weights"):
        fit([ELRWarmup(probe_size=N)], module=module, loader=token_loader(), max_steps=2)
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items())


def test_elr_warmup_acts_on_the_truly_invariant_weights_only() -> None:
    warmup = ELRWarmup(probe_size=N)
    fit([warmup], module=ZeroHeadNet, loader=vector_loader(), max_steps=1)
    assert warmup._invariant is not None and set(warmup._invariant) == {"net.0", "net.3"}  # not the zero head


# --------------------------------------------------------------------------------------------------
# The measurement alone
# --------------------------------------------------------------------------------------------------
def test_a_zero_bias_before_layer_norm_is_grouped_with_its_weight() -> None:
    """A zero bias makes the weight alone look invariant at init; once the bias moves only weight and bias together are."""
    torch.manual_seed(0)
    net = nn.Sequential(zero_bias(nn.Linear(4, 8)), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3))
    found = detect_scale_invariance(net, torch.randn(16, 4))
    assert found["0"].scale_invariant and found["0"].params == ("weight", "bias")
    assert not found["3"].scale_invariant and not found["3"].hidden


def zero_bias(layer: nn.Linear) -> nn.Linear:
    with torch.no_grad():
        layer.bias.zero_()
    return layer


@pytest.mark.parametrize("gate", [0.0, 1e-6])
def test_a_zero_or_tiny_gate_hides_nothing(gate: float) -> None:
    """A residual branch behind a zero scalar gate (ReZero) or a 1e-6 layer scale (ConvNeXt): its weights are not
    scale-invariant, though scaling them at init moves the outputs by less than ``rtol``."""

    class Gated(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branch, self.gate, self.out = nn.Linear(6, 6), nn.Parameter(torch.full((6,), gate)), nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(x + self.gate * torch.tanh(self.branch(x)))

    torch.manual_seed(0)
    found = detect_scale_invariance(Gated(), torch.randn(16, 6))
    assert not found["branch"].scale_invariant and found["branch"].hidden


def test_when_nothing_trainable_moves_the_outputs_the_test_cannot_tell() -> None:
    """A frozen zero head: no perturbation of the trainable weights moves the outputs, so nothing is called invariant."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), zero_(nn.Linear(8, 3)))
    net[3].requires_grad_(False)
    found = detect_scale_invariance(net, torch.randn(16, 4), {"0": net[0]})
    assert not found["0"].scale_invariant and math.isnan(found["0"].relative_change)


def test_effective_lr_warns_when_it_cannot_tell() -> None:
    class FrozenZeroHead(ZeroHeadNet):
        def __init__(self) -> None:
            super().__init__()
            self.net[6].requires_grad_(False)

    cb = EffectiveLR(every_n_steps=1, probe_size=N)
    with pytest.warns(UserWarning, match=r"EffectiveLR: cannot tell whether net\.0, net\.3 of FrozenZeroHead are scale-invariant"):
        fit([cb], module=FrozenZeroHead, loader=vector_loader(), max_steps=1)
    assert cb.invariance is not None and not any(r.scale_invariant for r in cb.invariance.values())
