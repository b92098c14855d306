"""Side-effect guards shared by every measurement.

A measurement must leave the model exactly as it found it: parameter values, buffers (BatchNorm
running statistics), ``.grad`` tensors, train/eval flags and every random number stream. The
:func:`preserved_state` context manager snapshots what a probe could touch and puts it back on exit,
so each measure function (and each callback) gets that guarantee from one place.

Parameters are not copied: measurements never write to them (they use ``torch.func`` or
``torch.autograd.grad``), and copying them would double memory. ``.grad`` tensors are detached from
the parameters for the duration of the probe and re-attached afterwards, so even a stray
``backward()`` inside a probe cannot accumulate into the training gradients.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

try:  # numpy is optional for the measure layer
    import numpy as _np
except ImportError:  # pragma: no cover - numpy ships with torch wheels in practice
    _np = None


def _devices_with_rng(module: nn.Module) -> list[torch.device]:
    """CUDA devices whose RNG a probe on ``module`` could advance."""
    return sorted(
        {t.device for t in module.parameters() if t.device.type == "cuda"},
        key=lambda d: d.index or 0,
    )


@contextlib.contextmanager
def preserved_rng(devices: list[torch.device] | None = None) -> Iterator[None]:
    """Fork torch (CPU and the given CUDA devices), Python and NumPy random streams.

    Example:
        >>> with preserved_rng():
        ...     _ = torch.rand(3)  # does not advance the caller's stream
    """
    py_state = random.getstate()
    np_state = _np.random.get_state() if _np is not None else None
    cuda_indices = [d.index if d.index is not None else 0 for d in devices or []]
    try:
        with torch.random.fork_rng(devices=cuda_indices, enabled=True):
            yield
    finally:
        random.setstate(py_state)
        if _np is not None:
            _np.random.set_state(np_state)


@contextlib.contextmanager
def preserved_state(model: nn.Module, *, rng: bool = True) -> Iterator[None]:
    """Restore buffers, ``.grad``, train/eval flags and RNG streams of ``model`` on exit.

    Args:
        model: the module a probe will run on.
        rng: also fork the torch, Python and NumPy random streams.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        >>> before = net[1].running_mean.clone()
        >>> with preserved_state(net):
        ...     _ = net(torch.randn(8, 3))  # train-mode BatchNorm updates its statistics...
        >>> torch.equal(net[1].running_mean, before)  # ...which are put back
        True
    """
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    params = list(model.parameters())
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    rng_guard = preserved_rng(_devices_with_rng(model)) if rng else contextlib.nullcontext()
    try:
        with rng_guard:
            yield
    finally:
        with torch.no_grad():
            for live, saved in buffers:
                if live.shape == saved.shape:
                    live.copy_(saved)
        for p, g in zip(params, grads):
            p.grad = g
        for m, was_training in flags:
            m.training = was_training


def map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested lists/tuples/named tuples/dicts."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, dict):
        return {k: map_tensors(v, fn) for k, v in data.items()}
    if isinstance(data, (tuple, list)):
        mapped = [map_tensors(x, fn) for x in data]
        return type(data)(*mapped) if hasattr(data, "_fields") else type(data)(mapped)
    return data


def floating_to(data: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor inside nested containers to ``dtype``."""
    return map_tensors(data, lambda t: t.to(dtype) if t.is_floating_point() else t)
