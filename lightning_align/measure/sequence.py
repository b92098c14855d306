"""Sequence outputs reduced over their positions, padding left out (NTKSpectrum's ``sequence_output``).

The positions that count are those the loss counts. A Hugging Face batch marks them: the ``attention_mask``
for a decoder or an encoder (1: a token, 0: padding), and for an encoder-decoder, whose outputs are the
decoder's, the ``decoder_attention_mask`` or else the ``labels`` other than ``-100``. ``"mean"`` averages over
those positions, ``"last"`` takes the last of them in each sequence (right or left padding alike), ``"all"``
keeps every position and is refused when some are padding (padding rows would enter the kernel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lightning_align.measure.batch import HF_INPUT_KEYS, seq2seq_model

#: Label value that marks a position the loss ignores (PyTorch's and Hugging Face's ``ignore_index``).
IGNORE_INDEX = -100


def padding_key(model: nn.Module, batch: Any, length: int, how: str, owner: str = "lightning_align") -> str | None:
    """The batch key that marks the padding of ``model``'s sequence outputs (``length`` positions), or ``None`` when
    every position counts. Read on the whole probe, outside any ``torch.func`` transform (it branches on values).

    Raises:
        ValueError: padding marked over another number of positions than the outputs' (they cannot be matched),
            or ``how="all"`` with padding.

    Example:
        >>> batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
        >>> padding_key(nn.Identity(), batch, 3, "mean")
        'attention_mask'
    """
    if not (isinstance(batch, Mapping) and any(k in batch for k in HF_INPUT_KEYS)):
        return None
    keys = ("decoder_attention_mask", "labels") if seq2seq_model(model) is not None else ("attention_mask",)
    key = next((k for k in keys if isinstance(batch.get(k), torch.Tensor) and batch[k].ndim == 2), None)
    if key is None or bool(output_mask(batch, key).all()):
        return None
    if batch[key].shape[1] != length:
        raise ValueError(
            f"{owner}: the probe batch's `{key}` marks padding over {batch[key].shape[1]} positions, but the model's "
            f"outputs have {length} positions, so the padded ones cannot be told apart; define `probe_outputs(batch)` "
            "on the module to return outputs per sample (n, c), or use a probe without padding."
        )
    if how == "all":
        raise ValueError(
            f"{owner}(sequence_output='all'): the probe batch has padding (`{key}`), whose positions would enter the "
            "kernel as rows of their own; use sequence_output='mean' or 'last' (both leave padding out), or a probe "
            "without padding."
        )
    return key


def output_mask(batch: Mapping[str, Any], key: str) -> torch.Tensor:
    """``(n, T)`` bool mask of the positions that count: ``batch[key]`` other than 0 (labels: other than ``-100``)."""
    return batch[key] != (IGNORE_INDEX if key == "labels" else 0)


def reduce_sequence(out: torch.Tensor, how: str, mask: torch.Tensor | None) -> torch.Tensor:
    """Outputs ``(n, T, ...)`` reduced over positions: ``"mean"`` over those in ``mask`` (all: ``None``), the
    ``"last"`` of them, or ``"all"`` (as they are). No branch on values: it runs under ``vmap``.

    Example:
        >>> out = torch.arange(6.0).reshape(1, 3, 2)
        >>> reduce_sequence(out, "last", torch.tensor([[True, True, False]]))
        tensor([[2., 3.]])
    """
    if how == "all":
        return out
    if mask is None:
        return out.mean(dim=1) if how == "mean" else out[:, -1]
    weights = mask.to(out.dtype).reshape(*mask.shape, *([1] * (out.ndim - 2)))
    if how == "mean":
        return (out * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1).clamp_min(0)  # the last unmasked position per sequence
    index = last.reshape(-1, 1, *([1] * (out.ndim - 2))).expand(-1, 1, *out.shape[2:])
    return out.gather(1, index).squeeze(1)


class SequenceReduced(nn.Module):
    """Outputs of ``model`` with a sequence dimension (``(n, T, ...)``, ``ndim >= 3``) reduced over positions
    (:func:`reduce_sequence`), the padding marked by ``batch[padding]`` left out (see :func:`padding_key`)."""

    def __init__(self, model: nn.Module, how: str, padding: str | None = None) -> None:
        super().__init__()
        self.model, self.how, self.padding = model, how, padding

    def forward(self, batch: Any) -> torch.Tensor:
        out = self.model(batch)
        if out.ndim < 3:
            return out
        return reduce_sequence(out, self.how, None if self.padding is None else output_mask(batch, self.padding))
