"""The probe protocol: a fixed batch, and how a callback gets a loss or outputs from a module.

How a callback evaluates a LightningModule on the probe batch without any change to the model's code:

- **loss**: ``pl_module.probe_loss(batch)`` if the module defines it, else the loss returned by the
  module's own ``training_step(batch, 0)`` (a tensor, or a mapping with ``"loss"``), with
  ``self.log``/``self.log_dict`` silenced while it runs.
- **outputs** (kernels, features): ``pl_module.probe_outputs(batch)`` if defined, else the prediction
  tensor of ``pl_module(batch[0])``: the output itself, the first tensor of a tuple, or ``.logits`` /
  ``.last_hidden_state`` of a Hugging Face ``ModelOutput``.
- **inputs/targets**: ``batch[0]`` and ``batch[1]`` for a tuple/list batch, ``batch["x"]``/``batch["y"]``
  (or ``"input"``/``"target"``) for a mapping; a Hugging Face mapping (``input_ids``, ``pixel_values``, ...)
  goes to the model as keyword arguments, less its ``labels`` (the targets).

:class:`ProbeLoss` and :class:`ProbeOutputs` wrap a module as an ``nn.Module`` whose ``forward`` takes the
whole batch, so the ``measure`` functions (which take ``(model, loss_fn, batch)``) and ``torch.func``
can use them like any model. Their parameters are the wrapped module's, under the prefix ``module.``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from lightning_align.measure.batch import batch_inputs, batch_size_of, call_model, prediction
from lightning_align.measure.state import floating_to, map_tensors, preserved_rng

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


def single_dataloader(loader: Any) -> DataLoader:
    """The one training DataLoader (the first of several), with a clear error otherwise."""
    if isinstance(loader, CombinedLoader):
        loader = loader.iterables
    if isinstance(loader, Mapping) and loader:
        loader = next(iter(loader.values()))
    if isinstance(loader, (list, tuple)) and loader:
        loader = loader[0]
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"lightning_align needs a torch DataLoader to draw its probe batch from, got {type(loader).__name__}; "
            "pass a probe batch explicitly with `callback.set_probe_batch(batch)` before fit."
        )
    return loader


def draw_probe_batch(
    loader: Any, size: int, seed: int, rank: int = 0, world_size: int = 1, *, owner: str = "lightning_align"
) -> Any:
    """A fixed probe batch: ``size`` samples drawn once with ``seed``, this rank's shard of them.

    A ``size`` above the data set's length is capped to it, with a warning naming ``owner``.

    Map-style datasets are indexed directly (seeded permutation, collated with the loader's
    ``collate_fn``), so no training randomness is consumed. Iterable datasets are read from a fresh
    iterator under forked random streams.

    Raises:
        ValueError: if the data set is empty or this rank's shard would be empty.
    """
    loader = single_dataloader(loader)
    dataset = loader.dataset
    if not isinstance(dataset, IterableDataset) and hasattr(dataset, "__len__"):
        n = len(dataset)
        if n == 0:
            raise ValueError(f"the training data set ({type(dataset).__name__}) is empty: no probe batch can be drawn")
        if size > n:
            rank_zero_warn(
                f"{owner}(probe_size={size}): the training data set has only {n} samples; the probe is all {n} of them. "
                "Lower probe_size to silence this."
            )
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(size, n)]
        shard = order[rank::world_size].tolist()
        if not shard:
            raise ValueError(f"probe of {len(order)} samples is too small to shard over {world_size} processes")
        return loader.collate_fn([dataset[i] for i in shard])
    with preserved_rng():
        parts, count = [], 0
        for batch in loader:
            parts.append(batch)
            count += batch_size_of(batch)
            if count >= size:
                break
    if not parts:
        raise ValueError(f"the training data loader over {type(dataset).__name__} yielded no batch: no probe batch")
    return _concat_batches(parts, size)


def slice_batch(batch: Any, size: int) -> Any:
    """The first ``size`` samples of every tensor in a (nested) batch."""
    return map_tensors(batch, lambda t: t[:size] if t.ndim else t)


def _concat_batches(parts: list[Any], size: int) -> Any:
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)[:size]
    if isinstance(first, Mapping):
        return {k: _concat_batches([p[k] for p in parts], size) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_concat_batches([p[i] for p in parts], size) for i in range(len(first)))
    return first


def prepare_probe_batch(batch: Any, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    """A detached copy of ``batch`` on ``device`` (so later training cannot change it), floats in ``dtype``.

    ``dtype`` is float32 (the probe arithmetic, also for a bf16/fp16 model), or float64 for a float64 model
    (see :func:`~lightning_align.measure.state.probe_dtype`); integer tensors (labels, token ids) keep theirs.
    """
    detached = map_tensors(batch, lambda t: t.detach().clone())
    return floating_to(move_data_to_device(detached, device), dtype)

