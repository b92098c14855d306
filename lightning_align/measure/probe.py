"""The probe protocol: how a measurement gets a loss or outputs from a module, with no change to its code.

- **loss**: ``module.probe_loss(batch)`` if the module defines it, else the loss returned by the module's own
  ``training_step(batch, 0)`` (a tensor, a mapping with ``"loss"``, or an output with ``.loss``); on both paths
  ``self.log``/``self.log_dict`` are silenced while it runs.
- **outputs** (kernels, features): ``module.probe_outputs(batch)`` if defined, else the prediction tensor of
  ``module(batch[0])`` (see :func:`~lightning_align.measure.batch.prediction`; a Hugging Face batch goes to
  the model as keyword arguments).

:class:`ProbeLoss` and :class:`ProbeOutputs` wrap a module as an ``nn.Module`` whose ``forward`` takes the
whole batch, so the measure functions (which take ``(model, loss_fn, batch)``) and ``torch.func`` can use
them like any model. Their parameters are the wrapped module's, under the prefix ``module.``. No Lightning
import: the callbacks and the offline coordinate check share this one protocol.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lightning_align.measure.batch import batch_inputs, call_model, prediction


def extract_loss(output: Any, where: str) -> torch.Tensor:
    """The scalar loss from what ``training_step`` returned."""
    if output is None:
        raise TypeError(
            f"{where} returned None on the probe batch (Lightning skips the optimizer step of such a batch), so there is "
            "no loss to measure: define `probe_loss(self, batch)` on the LightningModule returning the scalar training loss."
        )
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

    def __init__(self, module: nn.Module, owner: str | None = None) -> None:
        super().__init__()
        self.module = module
        self.owner = owner  # the callback asking, named in error messages

    def forward(self, batch: Any) -> torch.Tensor:
        module = self.module
        method = "probe_loss" if hasattr(module, "probe_loss") else "training_step"
        with silenced_logging(module):
            out = module.probe_loss(batch) if method == "probe_loss" else module.training_step(batch, 0)
        where = f"{type(module).__name__}.{method}"
        return extract_loss(out, where if self.owner is None else f"{self.owner}: {where}")


class ProbeOutputs(nn.Module):
    """``forward(batch) -> prediction tensor`` of a module (``probe_outputs(batch)`` or ``module(batch[0])``)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: Any) -> torch.Tensor:
        if hasattr(self.module, "probe_outputs"):
            return prediction(self.module.probe_outputs(batch), f"{type(self.module).__name__}.probe_outputs")
        return prediction(call_model(self.module, batch_inputs(batch)), type(self.module).__name__)


@contextlib.contextmanager
def silenced_logging(module: nn.Module) -> Iterator[None]:
    """``log``/``log_dict`` of ``module`` (a LightningModule) are no-ops inside: a probe's values never reach
    Lightning's logged results, ``trainer.callback_metrics`` or a logger. Nests."""
    names = [name for name in ("log", "log_dict") if hasattr(module, name)]
    saved = {name: module.__dict__.get(name, _ABSENT) for name in names}
    for name in names:
        setattr(module, name, _no_op)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is _ABSENT:
                module.__dict__.pop(name, None)
            else:
                module.__dict__[name] = value


_ABSENT = object()


def _no_op(*args: Any, **kwargs: Any) -> None:
    return None

