"""The probe protocol: how a measurement gets a loss or outputs from a module, with no change to its code.

- **loss**: ``module.probe_loss(batch)`` if the module defines it, else the loss returned by the module's own
  ``training_step(batch, 0)`` (a tensor, a mapping with ``"loss"``, or an output with ``.loss``), with
  ``self.log``/``self.log_dict`` silenced while it runs.
- **outputs** (kernels, features): ``module.probe_outputs(batch)`` if defined, else the prediction tensor of
  ``module(batch[0])`` (see :func:`~lightning_align.measure.batch.prediction`; a Hugging Face batch goes to
  the model as keyword arguments).

:class:`ProbeLoss` and :class:`ProbeOutputs` wrap a module as an ``nn.Module`` whose ``forward`` takes the
whole batch, so the measure functions (which take ``(model, loss_fn, batch)``) and ``torch.func`` can use
them like any model. Their parameters are the wrapped module's, under the prefix ``module.``. No Lightning
import: the callbacks and the offline coordinate check share this one protocol.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_align.measure.batch import batch_inputs, call_model, prediction


def extract_loss(output: Any, where: str) -> torch.Tensor:
    """The scalar loss from what ``training_step`` returned."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", output)
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"{where} returned {type(output).__name__}, not a loss tensor (or a mapping with 'loss'): "
            "define `probe_loss(batch)` on the LightningModule to tell lightning_align how to get the loss."
        )
    if loss.numel() != 1:
        raise ValueError(
            f"{where} returned a loss of shape {tuple(loss.shape)}; a scalar (mean) loss is needed. "
            "Reduce it in the module or define `probe_loss(batch)`."
        )
    return loss.reshape(())


class ProbeLoss(nn.Module):
    """``forward(batch) -> scalar loss`` of a LightningModule (``probe_loss`` or ``training_step``).

    Example:
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> loss = ProbeLoss(BoringModel())(torch.randn(4, 32))
        >>> loss.shape
        torch.Size([])
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        module = self.module
        if hasattr(module, "probe_loss"):
            return extract_loss(module.probe_loss(batch), f"{type(module).__name__}.probe_loss")
        silenced = _silence_logging(module)
        try:
            out = module.training_step(batch, 0)
        finally:
            _restore_logging(module, silenced)
        return extract_loss(out, f"{type(module).__name__}.training_step")


class ProbeOutputs(nn.Module):
    """``forward(batch) -> prediction tensor`` of a module (``probe_outputs(batch)`` or ``module(batch[0])``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        if hasattr(self.module, "probe_outputs"):
            return prediction(self.module.probe_outputs(batch), f"{type(self.module).__name__}.probe_outputs")
        return prediction(call_model(self.module, batch_inputs(batch)), type(self.module).__name__)


def _silence_logging(module: nn.Module) -> list[str]:
    """Replace ``log``/``log_dict`` by no-ops on the instance; returns what to undo."""
    patched = []
    for name in ("log", "log_dict"):
        if hasattr(module, name):
            setattr(module, name, _no_op)
            patched.append(name)
    return patched


def _restore_logging(module: nn.Module, patched: list[str]) -> None:
    for name in patched:
        module.__dict__.pop(name, None)


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None

