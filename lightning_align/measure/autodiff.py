"""Contexts that let higher-order and forward-mode autodiff run through common layers.

- :func:`math_attention`: ``scaled_dot_product_attention`` on its math backend; the fused (flash /
  memory-efficient / CPU) kernels have no forward-mode AD and no double backward (pytorch#116350, #128971).
- :func:`twice_differentiable`: math attention, and every op that has no double backward but an exact
  twice-differentiable equivalent (``hardsigmoid``, chunked ``linear_cross_entropy``) run as that equivalent; for
  probes that differentiate a gradient. :func:`missing_double_backward` and :func:`once_differentiable_functions` name what is left.
- :func:`batch_statistics_without_update`: train-mode BatchNorm normalises with batch statistics (the
  objective being optimized) without its in-place running-statistics update, which ``torch.func``
  transforms cannot run (pytorch#85533) and which a measurement must not do anyway.
- :func:`call_with_fresh_buffers`: a functional call on read-only copies of the buffers, so a forward that
  updates its own buffers in place runs under ``torch.func`` transforms.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Run ``scaled_dot_product_attention`` on the math backend inside the block."""
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(x + 3) / 6``: hardsigmoid's values (bit for bit on CPU) and gradient (0 at ±3 too), plus hardtanh's
    double backward (second derivative 0 almost everywhere), which ``aten::hardsigmoid_backward`` lacks."""
    out = F.relu6(input + 3) / 6
    return input.copy_(out) if inplace else out


def _linear_cross_entropy(*args: Any, options: Any = None, **kwargs: Any) -> Tensor:
    """``F.linear_cross_entropy`` on its reference path (``options=None``): the same loss; the chunked path computes
    its gradient inside the forward, so a double backward through it silently misses terms."""
    return F.linear_cross_entropy(*args, options=None, **kwargs)


#: Ops without a double backward in torch 2.14 and the exact equivalent each runs as inside
#: :func:`twice_differentiable` (Python functions, and the bindings code may call directly).
EQUIVALENTS: dict[Callable[..., Any], Callable[..., Any]] = {
    F.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid: _hardsigmoid,
    torch._C._nn.hardsigmoid_: lambda input: _hardsigmoid(input, inplace=True),
}
if hasattr(F, "linear_cross_entropy"):  # torch >= 2.14 (nn.LinearCrossEntropyLoss calls it)
    EQUIVALENTS[F.linear_cross_entropy] = _linear_cross_entropy


class _Equivalents(TorchFunctionMode):
    """Calls to an op of :data:`EQUIVALENTS` run its equivalent; every other call runs as it is."""

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        try:
            func = EQUIVALENTS.get(func, func)
        except TypeError:  # an unhashable callable
            pass
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def twice_differentiable() -> Iterator[None]:
    """Inside, ops without a double backward run as their exact equivalent (:data:`EQUIVALENTS`) and attention on
    its math backend, so a gradient computed inside (``create_graph``) can be differentiated again.

    A torch function mode, not a patched attribute: it catches ``nn.Hardsigmoid``, ``F.hardsigmoid`` however it
    was imported (timm keeps its own reference), and nothing outside this thread or this block.

    Example:
        >>> w = torch.tensor([0.5], requires_grad=True)
        >>> with twice_differentiable():
        ...     (g,) = torch.autograd.grad(F.hardsigmoid(w).pow(2).sum(), w, create_graph=True)
        >>> torch.autograd.grad(g.sum(), w)[0]  # 2 · (1/6)²
        tensor([0.0556])
    """
    with math_attention(), _Equivalents():
        yield


_ONCE_DIFFERENTIABLE = torch.autograd.function.once_differentiable(lambda ctx: None).__code__
_MISSING = (
    re.compile(r"derivative for (?:aten::)?'?([\w.:]+?)'? is not implemented"),
    re.compile(r"forward AD with (?:aten::)?([\w.:]+) that does not support it"),
    re.compile(r"(differentiate twice) a function that was marked with @once_differentiable"),
)


class NoDoubleBackward(RuntimeError):
    """A probe needed a double backward through ``op``, which has none (or a silently wrong one)."""

    def __init__(self, message: str, op: str) -> None:
        super().__init__(message)
        self.op = op


def missing_double_backward(err: BaseException) -> str | None:
    """The op named by torch's error for a derivative it does not have (``"hardsigmoid_backward"``), or ``None``
    when ``err`` is another error."""
    if not isinstance(err, (RuntimeError, NotImplementedError)):
        return None
    for pattern in _MISSING:
        match = pattern.search(str(err))
        if match:
            return "an @once_differentiable backward" if "twice" in match.group(1) else match.group(1)
    return None


def once_differentiable_functions(outputs: Sequence[Tensor]) -> list[str]:
    """The custom ``autograd.Function``s in the graphs of ``outputs`` whose backward is ``@once_differentiable``, as
    ``"<class name>'s @once_differentiable backward"``.

    A double backward through one raises nothing in torch 2.14 when the gradient is taken with respect to given
    tensors (``torch.autograd.grad(..., inputs)``): the error node torch puts there leads to none of them, so it
    is pruned, and the terms through that backward are silently missing. Found in the graph, it is a missing
    double backward like any other.
    """
    found: dict[str, None] = {}
    for node in graph_nodes(outputs):
        cls = getattr(node, "_forward_cls", None)
        if getattr(getattr(cls, "backward", None), "__code__", None) is _ONCE_DIFFERENTIABLE:
            found[f"{cls.__name__}'s @once_differentiable backward"] = None
    return list(found)


def graph_nodes(outputs: Sequence[Tensor]) -> Iterator[Any]:
    """Every autograd node of the graphs of ``outputs``, each once (depth first from their ``grad_fn``)."""
    seen: set[Any] = set()
    stack = [t.grad_fn for t in outputs if isinstance(t, Tensor) and t.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(nxt for nxt, _ in node.next_functions)


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
