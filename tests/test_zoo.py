"""The model zoo keeps the two promises: the whole suite at its default arguments, on every family of tests/zoo.py.

For each family (Hugging Face decoders with grouped-query attention tied and untied, a masked-LM encoder on padded
batches, an encoder-decoder, a ViT, a mixture of experts, a PEFT LoRA model, timm and torchvision convnets and
vision transformers, a MobileNetV3 with hardsigmoid gates, torch's own ``nn.TransformerEncoder``), with dropout,
drop-path and stochastic depth on:

- a fit with every measurement callback at its defaults, and one measuring after every step, end with bit-identical
  weights and optimizer state to the same fit without them, and every callback logged its headline values at step 0;
- Sharpness's step-0 ``λmax`` equals the top eigenvalue of the dense float64 Hessian of the training loss on the
  probe (autograd, row by row; ``nn.Hardsigmoid``, which has no double backward, written as its clamp form), to
  the certified tolerance;
- NTKSpectrum's step-0 top eigenvalue and trace equal those of ``J Jᵀ`` from explicit Jacobians (one backward per
  output entry, float64), with the padding mask's positions left out of the position mean.

μP against microsoft/mup on these families: tests/test_parametrization_zoo.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from helpers import MemoryLogger, assert_same_training_state, fit
from torch import nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from zoo import FAMILIES, Family

from lightning_align import CoordCheck, EffectiveLR, FeatureAlignment, NTKSpectrum, RankMonitor, Sharpness

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:.*the training data set has only.*:UserWarning"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
]
STEPS = 3
#: Every measurement callback's headline tag at step 0.
HEADLINES = ("align/cos/", "sharpness/max_eig", "ntk/max_eig", "elr/", "rank/weight_stable/", "coord/rms/")


def suite() -> list[pl.Callback]:
    return [FeatureAlignment(), Sharpness(), NTKSpectrum(), EffectiveLR(), RankMonitor(), CoordCheck()]


@dataclass
class ZooRun:
    plain: tuple[pl.LightningModule, pl.Trainer]
    measured: tuple[pl.LightningModule, pl.Trainer]
    logger: MemoryLogger
    callbacks: list[pl.Callback]

    def callback(self, kind: type) -> Any:
        return next(c for c in self.callbacks if isinstance(c, kind))


_RUNS: dict[str, ZooRun] = {}


def zoo_run(family: Family) -> ZooRun:
    """The plain and the measured fit of ``family`` (once per test session)."""
    if family.name not in _RUNS:
        callbacks, logger = suite(), MemoryLogger()
        plain = fit([], family.module, family.loader(), max_steps=STEPS)
        measured = fit(callbacks, family.module, family.loader(), max_steps=STEPS, logger=logger)
        _RUNS[family.name] = ZooRun(plain, measured, logger, callbacks)
    return _RUNS[family.name]


def oracle_dtype(family: Family) -> torch.dtype:
    return torch.float32 if family.float32_only else torch.float64


def initial_module(family: Family) -> pl.LightningModule:
    """The module as the fits start it (``fit`` seeds, then builds), in the oracles' dtype."""
    pl.seed_everything(0, verbose=False)
    return family.module().to(oracle_dtype(family))


def in_dtype(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, dict):
        return {k: in_dtype(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(in_dtype(v, dtype) for v in batch)
    return batch.to(dtype) if batch.is_floating_point() else batch


def probe_mode(module: nn.Module, batchnorm_train: bool) -> None:
    """Dropout and drop-path off; BatchNorm on batch statistics (Sharpness) or running ones (NTK)."""
    for m in module.modules():
        m.training = batchnorm_train and isinstance(m, nn.modules.batchnorm._BatchNorm)


def training_loss(family: Family, model: nn.Module, batch: Any) -> torch.Tensor:
    if family.kind == "hf":
        return model(**batch).loss
    x, y = batch
    return F.cross_entropy(model(x), y)


class ClampHardsigmoid(nn.Module):
    """``nn.Hardsigmoid`` as ``clamp(x/6 + 1/2, 0, 1)``: the same function, with the double backward torch's lacks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(x / 6 + 0.5, 0, 1)


def twice_differentiable(module: nn.Module) -> nn.Module:
    """``module`` with every ``nn.Hardsigmoid`` replaced by :class:`ClampHardsigmoid` (for the dense Hessian)."""
    for parent in list(module.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Hardsigmoid):
                setattr(parent, name, ClampHardsigmoid())
    return module


def dense_hessian(loss: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """The Hessian of ``loss``, every row by a batched backward through the gradient (float64 from float64 params)."""
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, create_graph=True)])
    n, rows = grad.numel(), []
    for eye in torch.eye(n, dtype=grad.dtype).split(256):
        parts = torch.autograd.grad(grad, params, eye, retain_graph=True, allow_unused=True, is_grads_batched=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros(len(eye), *p.shape)).reshape(len(eye), -1)
                               for g, p in zip(parts, params)], 1))
    hessian = torch.cat(rows).double()
    return (hessian + hessian.T) / 2


def model_outputs(family: Family, model: nn.Module, batch: Any) -> torch.Tensor:
    """The probe outputs NTKSpectrum differentiates: logits, sequence outputs averaged over unpadded positions."""
    if family.kind != "hf":
        return model(batch[0])
    encoder_decoder = model.config.is_encoder_decoder
    # An encoder-decoder is given its labels: the model makes the decoder inputs itself (and a loss, unused here).
    inputs = {k: v for k, v in batch.items() if k != "labels" or encoder_decoder}
    logits = model(**inputs).logits
    if logits.ndim < 3:
        return logits
    mask = None if encoder_decoder else batch.get("attention_mask")  # the zoo's decoder targets are unpadded
    if mask is None:
        return logits.mean(dim=1)
    weights = mask.to(logits.dtype)[..., None]
    return (logits * weights).sum(dim=1) / weights.sum(dim=1)


def explicit_ntk(outputs: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    flat = outputs.reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, params, retain_graph=True)]) for o in flat]
    jac = torch.stack(rows).double()
    return jac @ jac.T


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_the_suite_at_defaults_leaves_training_bit_identical(family: Family) -> None:
    run = zoo_run(family)
    assert_same_training_state(run.plain, run.measured)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_measuring_at_every_step_leaves_training_bit_identical(family: Family) -> None:
    """At the defaults a short fit measures at step 0 only; here every callback measures after every step too."""
    every_step = [FeatureAlignment(every_n_steps=1, probe_size=8), Sharpness(every_n_steps=1, probe_size=8),
                  NTKSpectrum(every_n_steps=1, probe_size=4), EffectiveLR(every_n_steps=1, probe_size=8),
                  RankMonitor(every_n_steps=1, probe_size=8), CoordCheck(every_n_steps=1, probe_size=8)]
    measured = fit(every_step, family.module, family.loader(), max_steps=STEPS)
    assert_same_training_state(zoo_run(family).plain, measured)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_every_callback_logs_its_headline_at_step_0(family: Family) -> None:
    logged = zoo_run(family).logger.at(0)
    for prefix in HEADLINES:
        values = [v for k, v in logged.items() if k.startswith(prefix)]
        assert values, f"{family.name}: nothing logged under {prefix} at step 0"
        if prefix in ("sharpness/max_eig", "ntk/max_eig", "rank/weight_stable/", "coord/rms/"):
            assert all(math.isfinite(v) for v in values), (family.name, prefix, values)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_sharpness_equals_the_dense_float64_hessian(family: Family) -> None:
    run = zoo_run(family)
    sharpness = run.callback(Sharpness)
    measured = run.logger.by_step("sharpness/max_eig")[0]
    dtype = oracle_dtype(family)
    module = twice_differentiable(initial_module(family))
    probe_mode(module, batchnorm_train=True)
    params = [p for p in module.parameters() if p.requires_grad]
    with sdpa_kernel(SDPBackend.MATH), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hessian = dense_hessian(training_loss(family, module.model, in_dtype(sharpness.probe_batch, dtype)), params)
    top = float(torch.linalg.eigvalsh(hessian)[-1])
    assert measured == pytest.approx(top, rel=sharpness.tol), (family.name, measured, top)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_ntk_equals_explicit_jacobians(family: Family) -> None:
    run = zoo_run(family)
    ntk = run.callback(NTKSpectrum)
    logged = run.logger.at(0, "ntk/")
    dtype = oracle_dtype(family)
    module = initial_module(family)
    probe_mode(module, batchnorm_train=False)
    params = [p for p in module.parameters() if p.requires_grad]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kernel = explicit_ntk(model_outputs(family, module.model, in_dtype(ntk.probe_batch, dtype)), params)
    eigenvalues = torch.linalg.eigvalsh(kernel)
    assert logged["ntk/max_eig"] == pytest.approx(float(eigenvalues[-1]), rel=1e-4), family.name
    assert logged["ntk/trace"] == pytest.approx(float(kernel.trace()), rel=1e-4), family.name
