"""Byte-level text: any text file, or by default the Python standard library's own sources."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from example_modules.data.base import SplitDataModule


def stdlib_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the Python standard library's ``.py`` sources (sorted, so reproducible)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no Python sources found in the standard library folder {root}; pass `path` to a text file")
    chunks, total = [], 0
    for p in files:
        data = p.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


BatchFormat = Literal["tuple", "hf"]


class ByteWindows(Dataset):
    """Windows ``x = text[i : i+T]``, ``y = text[i+1 : i+T+1]`` at stride ``T`` over a byte tensor.

    ``batch_format="hf"`` serves ``{"input_ids": x, "labels": x}`` instead (Hugging Face causal LMs shift
    the labels themselves, so both are the same window).
    """

    def __init__(self, data: torch.Tensor, block_size: int, batch_format: BatchFormat = "tuple") -> None:
        if len(data) <= block_size:
            raise ValueError(f"text of {len(data)} bytes is too short for block_size {block_size}")
        self.data, self.block_size, self.batch_format = data, block_size, batch_format

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.block_size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor] | dict[str, torch.Tensor]:
        s = i * self.block_size
        if self.batch_format == "hf":
            x = self.data[s : s + self.block_size]
            return {"input_ids": x, "labels": x.clone()}
        chunk = self.data[s : s + self.block_size + 1]
        return chunk[:-1], chunk[1:]


class CharTextDataModule(SplitDataModule):
    """Next-byte prediction windows over a text (vocabulary: the 256 byte values).

    Args:
        path: a text file; ``None`` uses the Python standard library's sources (always present).
        block_size: window length (match the GPT's ``block_size``).
        max_bytes: read at most this many bytes.
        val_fraction: the last fraction of the text is the validation split.
        batch_size, num_workers: loaders.
        batch_format: ``tuple`` serves ``(x, y)`` with ``y`` shifted by one byte (for :class:`GPT`); ``hf`` serves
            Hugging Face mappings ``{"input_ids": x, "labels": x}`` (for :class:`HFCausalLM`).

    Example:
        >>> dm = CharTextDataModule(block_size=16, max_bytes=20_000, batch_size=4)
        >>> x, y = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), bool((x[:, 1:] == y[:, :-1]).all())
        ((4, 16), True)
        >>> hf = CharTextDataModule(block_size=16, max_bytes=20_000, batch_size=4, batch_format="hf")
        >>> batch = next(iter(hf.train_dataloader()))
        >>> sorted(batch), bool((batch["input_ids"] == batch["labels"]).all())
        (['input_ids', 'labels'], True)
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        max_bytes: int = 1_000_000,
        val_fraction: float = 0.1,
        batch_size: int = 32,
        num_workers: int = 0,
        batch_format: BatchFormat = "tuple",
    ) -> None:
        super().__init__(batch_size, num_workers)
        self.save_hyperparameters()
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"CharTextDataModule: val_fraction must be in (0, 1), got {val_fraction}")
        if batch_format not in ("tuple", "hf"):
            raise ValueError(f"CharTextDataModule: batch_format must be 'tuple' or 'hf', got {batch_format!r}")
        self.batch_format = batch_format
        self.path, self.block_size, self.max_bytes, self.val_fraction = path, block_size, max_bytes, val_fraction

    def build(self) -> tuple[Dataset, Dataset]:
        if self.path is None:
            raw = stdlib_corpus(self.max_bytes)
        else:
            file = Path(self.path).expanduser()
            if not file.is_file():
                raise FileNotFoundError(f"CharTextDataModule: text file {file} not found; set `path` to a text file or to null for the default corpus")
            raw = file.read_bytes()[: self.max_bytes]
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()
        split = int(len(data) * (1 - self.val_fraction))
        fmt = self.batch_format
        return ByteWindows(data[:split], self.block_size, fmt), ByteWindows(data[split:], self.block_size, fmt)
