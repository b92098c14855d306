"""Reading a batch: which part is the input, which the target, how many samples.

A batch is ``(inputs, targets, ...)`` or a mapping with input/target keys (``x``/``y``, ``input``/``target``, ...).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

INPUT_KEYS = ("x", "input", "inputs")
TARGET_KEYS = ("y", "target", "targets", "label", "labels")


def batch_inputs(batch: Any, owner: str = "lightning_align") -> Any:
    """The model inputs of a batch (``batch[0]`` or ``batch["x"]``-like).

    Example:
        >>> batch_inputs({"x": 1, "y": 2})
        1
    """
    return _batch_part(batch, 0, INPUT_KEYS, "inputs", owner)


def batch_targets(batch: Any, owner: str = "lightning_align") -> Any:
    """The targets of a batch (``batch[1]`` or ``batch["y"]``-like).

    Example:
        >>> batch_targets((torch.zeros(2, 3), torch.tensor([0, 1])))
        tensor([0, 1])
    """
    return _batch_part(batch, 1, TARGET_KEYS, "targets", owner)


def _batch_part(batch: Any, index: int, keys: tuple[str, ...], what: str, owner: str) -> Any:
    if isinstance(batch, (tuple, list)) and len(batch) > index:
        return batch[index]
    if isinstance(batch, Mapping):
        for k in keys:
            if k in batch:
                return batch[k]
    raise TypeError(
        f"{owner}: cannot find the {what} in a batch of type {type(batch).__name__}: expected a tuple/list "
        f"(inputs, targets, ...) or a mapping with one of the keys {list(keys)}; or define "
        f"`probe_loss(batch)` / `probe_outputs(batch)` on your LightningModule."
    )


def batch_size_of(batch: Any) -> int:
    """Number of samples in a batch (leading dimension of its first tensor)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for part in batch:
            if isinstance(part, (torch.Tensor, tuple, list, Mapping)):
                return batch_size_of(part)
    raise TypeError(f"cannot find a tensor in a batch of type {type(batch).__name__}")
