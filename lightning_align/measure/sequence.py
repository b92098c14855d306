"""Sequence outputs reduced over their positions, padding left out (NTKSpectrum's ``sequence_output``).

The positions that count are those the loss counts. A Hugging Face batch marks them: the ``attention_mask``
for a decoder or an encoder (1: a token, 0: padding), and for an encoder-decoder, whose outputs are the
decoder's, the ``decoder_attention_mask`` or else the ``labels`` other than ``-100``. ``"mean"`` averages over
those positions, ``"last"`` takes the last of them in each sequence (right or left padding alike), ``"all"``
keeps every position and is refused when some are padding (padding rows would enter the kernel).

The same rule picks the positions of every layer output that count in the per-position statistics of CoordCheck,
RankMonitor and the feature speeds (:class:`PositionMasks`, :func:`counted`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
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
    key = _mask_key(batch, keys)
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


def _mask_key(batch: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if isinstance(batch.get(k), torch.Tensor) and batch[k].ndim == 2), None)


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


class PositionMasks:
    """Which positions of each layer output count on ``batch``: :func:`padding_key`'s rule, for every layer.

    A Hugging Face batch marks up to two sequences: the model's output sequence (a decoder's or an encoder's:
    ``attention_mask``; an encoder-decoder's decoder: ``decoder_attention_mask``, else ``labels`` other than ``-100``;
    no mask: every position of ``input_ids``) and an encoder-decoder's input sequence (its ``attention_mask``). A
    layer output is per position of one when it is ``(n, T, ...)`` with ``T`` that sequence's length, or ``(n·T, ...)``
    (positions flattened, as a mixture of experts routes tokens); an output shared by the samples, ``(1, T, ...)`` or
    ``(T, ...)`` (a position embedding) or ``(T, T, ...)`` (a relative position bias), counts the positions that some
    sequence counts (a pair: both). When both sequences have that length, the encoder's
    is the one of a layer that ran inside the encoder or whose (first) input is the encoder's output (a cross-attention's
    key and value projections; not the cross-attention, whose output is per decoder position): see :meth:`watching`. Other outputs (per sample ``(n, c)``, pooled, not per sample) have no positions: all count.
    A batch that is not a Hugging Face mapping marks none.

    Example:
        >>> batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])}
        >>> PositionMasks(nn.Identity(), batch).of("layer", torch.zeros(2, 3, 4)).sum().item()
        5
    """

    def __init__(self, model: nn.Module, batch: Any, owner: str = "lightning_align") -> None:
        self.owner = owner
        self.sequences: dict[str, torch.Tensor] = {}  # "output" / "encoder" -> (n, T) bool
        self.encoder: nn.Module | None = None
        self.encoder_side: set[str] = set()  # layers that ran inside the encoder or read its output
        if not (isinstance(batch, Mapping) and any(k in batch for k in HF_INPUT_KEYS)):
            return
        seq2seq = seq2seq_model(model)
        inputs = _positions(batch, ("attention_mask",), ("input_ids", "inputs_embeds"))
        decoder = _positions(batch, ("decoder_attention_mask", "labels"), ("decoder_input_ids", "decoder_inputs_embeds"))
        found = {"output": inputs} if seq2seq is None else {"output": decoder, "encoder": inputs}
        self.sequences = {k: v for k, v in found.items() if v is not None}
        if seq2seq is not None:
            get = getattr(seq2seq, "get_encoder", None)
            self.encoder = get() if callable(get) else getattr(seq2seq, "encoder", None)

    def of(self, name: str, out: torch.Tensor) -> torch.Tensor | None:
        """The bool mask of ``out``'s counted positions (``(n, T)`` or, flattened, ``(n·T,)``), ``None``: all count."""
        matches = {side: m for side, seq in self.sequences.items() if (m := _matching(out, seq)) is not None}
        if len(matches) > 1:
            return matches["encoder" if name in self.encoder_side else "output"]
        if matches:
            return next(iter(matches.values()))
        padded = [seq for seq in self.sequences.values() if not bool(seq.all()) and out.ndim >= 3 and out.shape[0] == seq.shape[0]]
        if padded:
            warnings.warn(
                f"{self.owner}: the output of {name!r} has shape {tuple(out.shape)}, whose positions the batch's padding mask "
                f"({padded[0].shape[1]} positions) does not mark, so its padded positions, if any, are counted; name "
                "layers with an output per position of the input or output sequence in `layers`.",
                stacklevel=2,
            )
        return None

    @contextlib.contextmanager
    def watching(self, modules: Mapping[str, nn.Module]) -> Iterator[None]:
        """Inside, each forward records which of ``modules`` run inside an encoder-decoder's encoder or take its output as
        their first input (last call wins). Nothing to watch for other models."""
        if self.encoder is None or "encoder" not in self.sequences:
            yield
            return
        depth, outputs = [0], set()

        def record(name: str, args: Any, kwargs: Any) -> None:
            first = next((t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)), None)
            read = first is not None and _pointer(first) in outputs  # its input is the encoder's output
            (self.encoder_side.add if depth[0] or read else self.encoder_side.discard)(name)

        def leave(_m: nn.Module, _a: Any, out: Any) -> None:
            depth[0] -= 1
            outputs.update(_pointer(t) for t in _tensors(out))

        handles = [m.register_forward_hook(lambda _m, a, k, _o, n=n: record(n, a, k), with_kwargs=True) for n, m in modules.items()]
        handles.append(self.encoder.register_forward_pre_hook(lambda *_: depth.__setitem__(0, depth[0] + 1)))
        handles.append(self.encoder.register_forward_hook(leave, always_call=True))
        try:
            yield
        finally:
            for h in handles:
                h.remove()


def counted(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``out`` at the positions that count: ``out[mask]``, one row per counted position (``mask`` from
    :meth:`PositionMasks.of`); ``out`` itself when ``mask`` is ``None``."""
    return out if mask is None else out[mask.to(out.device)]


def _positions(batch: Mapping[str, Any], mask_keys: tuple[str, ...], id_keys: tuple[str, ...]) -> torch.Tensor | None:
    key = _mask_key(batch, mask_keys)
    if key is not None:
        return output_mask(batch, key)
    ids = next((batch[k] for k in id_keys if isinstance(batch.get(k), torch.Tensor) and batch[k].ndim >= 2), None)
    return None if ids is None else torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)


def _matching(out: torch.Tensor, seq: torch.Tensor) -> torch.Tensor | None:
    """The mask of ``out``'s entries at counted positions of ``seq`` ``(n, L)``, read from ``out``'s shape (see
    :class:`PositionMasks`), or ``None`` when ``out`` is not per position of ``seq``."""
    n, length = seq.shape
    if out.ndim >= 3 and tuple(out.shape[:2]) == (n, length):
        return seq
    if out.ndim >= 2 and length > 1 and out.shape[0] == n * length:
        return seq.reshape(-1)
    if out.ndim < 2 or out.shape[0] == n:  # per sample
        return None
    anywhere = seq.any(dim=0)  # an output shared by the samples: the positions some sequence counts
    if out.ndim >= 3 and tuple(out.shape[:2]) == (1, length):
        return anywhere[None]
    if out.ndim >= 3 and tuple(out.shape[:2]) == (length, length):
        return anywhere[:, None] & anywhere[None, :]
    return anywhere if out.shape[0] == length else None


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    return [t for t in values if isinstance(t, torch.Tensor)]


def _pointer(t: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return t.data_ptr(), tuple(t.shape)
