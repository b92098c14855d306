"""The probe batch: drawn once from the training data (seeded), or the first batch of a stream.

The protocol that turns a module and a batch into a loss or outputs (:class:`ProbeLoss`,
:class:`ProbeOutputs`) is pure PyTorch and lives in :mod:`lightning_align.measure.probe`; it is
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import CombinedLoader, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from lightning_align.measure.batch import batch_size_of
from lightning_align.measure.probe import ProbeLoss, ProbeOutputs, extract_loss
from lightning_align.measure.state import floating_to, map_tensors, preserved_rng

__all__ = ["ProbeLoss", "ProbeOutputs", "draw_probe_batch", "extract_loss", "prepare_probe_batch", "single_dataloader", "slice_batch"]


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

