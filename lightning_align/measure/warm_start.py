"""What a certified Sharpness solve keeps between measurements: its vectors, and a fingerprint of the operator.

:class:`WarmStart` holds the reported Ritz vectors, the extra columns of the next warm start (vectors a recovery
locked beyond those asked) and the last certificate;
:func:`operator_key` tells when an operator is the one a certificate was made on (the same parameters and the same
gradient on the probe), so that :func:`~lightning_align.measure.certified.certified_extremes` can reuse it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_align.measure.certificate import Certificate
from lightning_align.measure.certified import CertifiedEigs
from lightning_align.measure.lanczos import Reduce


@dataclass
class WarmStart:
    """What one solve keeps between measurements: the reported vectors, the extra columns and the certificate (in
    memory only: it holds for the operator it was made on)."""

    vectors: Tensor | None = None
    extra: Tensor | None = None
    certificate: Certificate | None = None

    def start(self, dim: int) -> Tensor | None:
        """All columns of the right size, or ``None``."""
        cols = [t for t in (self.vectors, self.extra) if t is not None and t.shape[0] == dim]
        return torch.cat(cols, 1) if cols else None

    def keep(self, res: CertifiedEigs, dtype: torch.dtype) -> None:
        """Keep what ``res`` leaves (nothing when its main run did not converge: the last vectors stay)."""
        if res.vectors is None:
            return
        self.vectors = res.vectors.detach().to(dtype)
        self.extra = None if res.extra is None else res.extra.detach().to(dtype)
        self.certificate = res.certificate

    def state(self, prefix: str) -> dict[str, object]:
        """The checkpointed part (not the certificate)."""
        state: dict[str, object] = {}
        if self.vectors is not None:
            state[f"{prefix}vectors"] = self.vectors.detach().cpu()
        if self.extra is not None:
            state[f"{prefix}extra_vectors"] = self.extra.detach().cpu()
        return state

    @classmethod
    def of(cls, state: dict[str, object], prefix: str) -> WarmStart:
        """From :meth:`state` (missing keys: a cold start)."""
        vectors, extra = state.get(f"{prefix}vectors"), state.get(f"{prefix}extra_vectors")
        return cls(vectors if isinstance(vectors, Tensor) else None, extra if isinstance(extra, Tensor) else None)


def operator_key(tensors: list[Tensor | None], all_reduce: Reduce | None = None) -> Tensor:
    """A float64 fingerprint of ``tensors`` (per tensor: the sum, the sum of squares and a position-weighted sum, summed
    over the ranks when split; one host read): equal keys mean equal tensors for every practical purpose."""
    present = [t for t in tensors if t is not None]
    device = present[0].device if present else torch.device("cpu")
    parts = []
    for t in tensors:
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        for chunk in ([] if t is None else t.detach().reshape(-1).split(1 << 22)):
            c = chunk.double()
            weights = torch.arange(c.numel(), device=c.device, dtype=torch.float64).remainder_(1009).add_(1)
            stats += torch.stack([c.sum(), c.square().sum(), (c * weights).sum()]).to(device)
        parts.append(stats)
    key = torch.cat(parts)
    return (key if all_reduce is None else all_reduce(key)).cpu()
