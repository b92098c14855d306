"""Contexts that let higher-order and forward-mode autodiff run through common layers.

- :func:`math_attention`: ``scaled_dot_product_attention`` on its math backend; the fused (flash /
  memory-efficient / CPU) kernels have no forward-mode AD and no double backward (pytorch#116350, #128971).
- :func:`batch_statistics_without_update`: train-mode BatchNorm normalises with batch statistics (the
  objective being optimized) without its in-place running-statistics update, which ``torch.func``
  transforms cannot run (pytorch#85533) and which a measurement must not do anyway.
- :func:`call_with_fresh_buffers`: a functional call on read-only copies of the buffers, so a forward that
  updates its own buffers in place runs under ``torch.func`` transforms.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on the math backend inside the block."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


@contextlib.contextmanager
def batch_statistics_without_update(model: nn.Module) -> Iterator[None]:
    """Train-mode BatchNorm layers of ``model`` use batch statistics but leave their buffers alone inside.

    Example:
        >>> import torch
        >>> bn = nn.BatchNorm1d(3)
        >>> with batch_statistics_without_update(bn):
        ...     _ = bn(torch.randn(8, 3) + 5)
        >>> bool(bn.running_mean.abs().max() == 0)
        True
    """
    changed = [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats
    ]
    for m in changed:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


class _FrozenBuffer(torch.Tensor):
    """A buffer copy whose in-place updates are dropped: the forward reads the value it had when the call began."""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        in_place = (name.endswith("_") and not name.endswith("__")) or (name.startswith("__i") and name.endswith("__"))
        if in_place and args and isinstance(args[0], _FrozenBuffer):
            return args[0]
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def call_with_fresh_buffers(model: nn.Module, params: Mapping[str, Tensor], args: tuple[Any, ...]) -> Any:
    """``functional_call(model, params, args)`` with read-only copies of the module's buffers.

    Inside ``torch.func`` transforms a forward that updates a buffer in place (``self.calls += 1``, a running
    average of its inputs) would mutate a tensor captured from outside, or write a per-sample value into a
    shared one, which functorch refuses. Here each buffer is a copy whose in-place updates are dropped, so
    the function measured is the model at the state the probe began in; the real buffers are never touched.

    Example:
        >>> class Counting(nn.Linear):
        ...     def forward(self, x):
        ...         self.calls += 1
        ...         return super().forward(x)
        >>> m = Counting(2, 1); m.register_buffer("calls", torch.zeros(()))
        >>> p = dict(m.named_parameters())
        >>> torch.func.jacrev(lambda w: call_with_fresh_buffers(m, {**p, "weight": w}, (torch.ones(1, 2),)))(m.weight).shape
        torch.Size([1, 1, 1, 2])
        >>> float(m.calls)
        0.0
    """
    buffers = {n: b.clone().as_subclass(_FrozenBuffer) for n, b in model.named_buffers() if n not in params}
    return functional_call(model, {**buffers, **params}, args)
