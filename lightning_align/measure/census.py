"""What one forward pass runs and reads, found by watching it rather than by class or attribute names.

:func:`take_census` runs a forward with a pre/post hook on every module (which modules ran, and which one is
innermost at each operation) and a ``TorchFunctionMode`` (which torch functions each module's own code calls, on
which parameters). From that:

- **ran**: the modules whose ``forward`` was called (``nn.MultiheadAttention``'s ``out_proj`` never is: the
  attention reads its weight directly; a tied embedding's second owner, an unused pooler neither);
- **read**: the parameters some operation read (``out_proj.weight`` is);
- **attention**: the modules whose own code computes attention: a fused attention function
  (``scaled_dot_product_attention``, ``flex_attention``, ``multi_head_attention_forward``), or a softmax together
  with a product of two activations (``q·kᵀ`` in an eager implementation), whatever their attributes;
- **experts**: the mixture-of-experts blocks: for each ``topk`` (the routing), the innermost module that holds both
  it and the next module to run (the experts; the module itself when it runs them inline);
- **stacks**: parameters of three or more dimensions read other than as a convolution kernel, more than one matrix
  deep: stacks of matrices such as the experts of a mixture of experts held as one ``(experts, out, in)`` tensor
  (not a ``(1, T, d)`` position embedding).

PyTorch's fused transformer fast path (eval mode without grad) skips the submodules of ``nn.TransformerEncoderLayer``
and ``nn.MultiheadAttention``; :func:`unfused_transformer_layers` turns it off, so that probes run the modules
training runs (the same arithmetic, and no nested-tensor zeros at padded positions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

_ATTENTION_FUNCTIONS = {"scaled_dot_product_attention", "flex_attention", "multi_head_attention_forward"}
_PRODUCTS = {"matmul", "bmm", "baddbmm", "einsum", "__matmul__", "__rmatmul__"}
_CONVOLUTIONS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution"}


@dataclass
class Census:
    """What a forward ran and read (see the module docstring); names are qualified ``named_modules`` names."""

    ran: set[str] = field(default_factory=set)
    read: set[int] = field(default_factory=set)  # ids of the parameters read
    attention: set[str] = field(default_factory=set)
    experts: set[str] = field(default_factory=set)  # mixture-of-experts blocks
    stacks: dict[str, nn.Parameter] = field(default_factory=dict)  # qualified parameter name -> parameter


@contextlib.contextmanager
def unfused_transformer_layers() -> Iterator[None]:
    """PyTorch's fused transformer fast path off inside the block (its modules then run one by one)."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


def take_census(model: nn.Module, run: Callable[[], Any]) -> tuple[Census, Any]:
    """Run ``run()`` (a forward of ``model`` or of a wrapper around it) and return what it ran and read, and its result.

    Example:
        >>> net = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval()
        >>> with torch.no_grad():
        ...     census, _ = take_census(net, lambda: net(torch.randn(2, 3, 8)))
        >>> sorted(census.attention), "self_attn.out_proj" in census.ran, id(net.self_attn.out_proj.weight) in census.read
        (['self_attn'], False, True)
    """
    names = {id(m): n for n, m in model.named_modules()}
    params = {id(p): p for p in model.parameters()}
    stack: list[str] = []
    watch = _Watch(params, stack)

    handles = []
    for module in model.modules():
        name = names[id(module)]
        handles.append(module.register_forward_pre_hook(lambda _m, _a, name=name: watch.enter(name)))
        handles.append(module.register_forward_hook(lambda *_a: watch.leave(), always_call=True))
    try:
        with unfused_transformer_layers(), watch:
            result = run()
    finally:
        for h in handles:
            h.remove()
    census = Census(ran=watch.ran - {""}, read=set(watch.read))
    census.attention = {n for n in watch.attention | (watch.softmax & watch.products) if n}
    census.experts = {n for n in watch.experts | {s[-1] for s in watch.routing} if n}
    census.stacks = {
        f"{name}.{p_name}" if name else p_name: p
        for name, m in model.named_modules() for p_name, p in matrix_stacks(m).items()
        if id(p) in watch.read and id(p) not in watch.kernels
    }  # fmt: skip
    return census, result


def matrix_stacks(module: nn.Module) -> dict[str, nn.Parameter]:
    """``module``'s own parameters that are stacks of matrices: three or more dimensions, more than one matrix deep
    (``(experts, out, in)``; not a ``(1, T, d)`` position embedding), and not a convolution's kernel."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {}
    return {n: p for n, p in module.named_parameters(recurse=False) if p.ndim >= 3 and p.shape[:-2].numel() > 1}


class _Watch(TorchFunctionMode):
    """Records, per innermost running module, the torch functions its own code calls and the parameters they read."""

    def __init__(self, params: dict[int, nn.Parameter], stack: list[str]) -> None:
        super().__init__()
        self.params, self.stack = params, stack
        self.ran: set[str] = set()
        self.read: set[int] = set()
        self.kernels: set[int] = set()  # parameters read as convolution kernels
        self.attention: set[str] = set()
        self.softmax: set[str] = set()
        self.products: set[str] = set()
        self.routing: list[tuple[str, ...]] = []  # module stacks of topk calls not yet followed by a module
        self.experts: set[str] = set()

    def enter(self, name: str) -> None:
        """A module's forward starts: the block of every routing waiting for its experts is what holds both."""
        self.stack.append(name)
        self.ran.add(name)
        for routed in self.routing:
            common = [a for a, b in zip(routed, self.stack) if a == b]  # qualified names: a common prefix
            self.experts.add(common[-1] if common else routed[-1])
        self.routing.clear()

    def leave(self) -> None:
        if self.stack:
            self.stack.pop()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        owner = self.stack[-1] if self.stack else ""
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        read = [id(t) for t in tensors if id(t) in self.params]
        self.read.update(read)
        name = getattr(func, "__name__", "")
        if name in _CONVOLUTIONS:
            self.kernels.update(read)
        elif name in _ATTENTION_FUNCTIONS:
            self.attention.add(owner)
        elif name == "softmax":
            self.softmax.add(owner)
        elif name in _PRODUCTS and len(tensors) >= 2 and not read:
            self.products.add(owner)
        elif name == "topk":
            self.routing.append(tuple(self.stack))
        return func(*args, **kwargs)
