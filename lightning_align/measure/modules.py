"""Choosing layers by name, and reading their outputs.

Layer names are qualified names from ``named_modules()``. Users give exact names or regular
expressions (full match); a pattern that matches nothing is an error that names it, never a silent skip.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)


def select_modules(
    model: nn.Module,
    patterns: Sequence[str] | None,
    default_types: tuple[type[nn.Module], ...] = WEIGHT_LAYER_TYPES,
    *,
    owner: str = "lightning_align",
) -> dict[str, nn.Module]:
    """Modules of ``model`` by qualified name, in ``named_modules()`` order.

    Args:
        model: the model to search.
        patterns: exact names or regular expressions (full match). ``None`` selects every module of
            ``default_types``.
        default_types: the module types selected when ``patterns`` is ``None``.
        owner: who is asking (named in error messages).

    Raises:
        ValueError: a pattern that matches no module (the message lists close names), or an empty selection.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> list(select_modules(net, None))
        ['0', '2']
        >>> list(select_modules(net, [r"\\d"]))
        ['0', '1', '2']
    """
    named = [(n, m) for n, m in model.named_modules() if n]
    if patterns is None:
        chosen = {n: m for n, m in named if isinstance(m, default_types)}
        if not chosen:
            kinds = ", ".join(t.__name__ for t in default_types)
            raise ValueError(f"{owner}: {type(model).__name__} has no layer of type {kinds}; name the layers to use")
        return chosen
    if isinstance(patterns, str):
        patterns = [patterns]
    chosen: dict[str, nn.Module] = {}
    names = [n for n, _ in named]
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ValueError(f"{owner}: module pattern {pattern!r} is not a valid regular expression: {err}") from err
        hits = [(n, m) for n, m in named if n == pattern or regex.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"{owner}: module name or pattern {pattern!r} matches no module of {type(model).__name__}. "
                f"Available names include: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
            )
        chosen.update(hits)
    order = {n: i for i, n in enumerate(names)}
    return dict(sorted(chosen.items(), key=lambda kv: order[kv[0]]))


def train_mode_batchnorms(model: nn.Module) -> list[str]:
    """Names of BatchNorm layers in training mode (they mix samples and update buffers)."""
    return [n or "<root>" for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def first_tensor(output: object) -> torch.Tensor:
    """The tensor a module produced (the first one for tuple outputs, e.g. attention)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"module output of type {type(output).__name__} holds no tensor")


@contextlib.contextmanager
def captured_outputs(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """Record each module's output during forward passes inside the block (last call wins).

    The rest of the forward pass receives a copy of the recorded tensor, so a later in-place operation
    (e.g. ``ReLU(inplace=True)``) cannot change what was recorded; gradients flow through the copy.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(inplace=True))
        >>> with captured_outputs({"0": net[0]}) as feats:
        ...     _ = net(torch.randn(5, 2))
        >>> feats["0"].shape, bool((feats["0"] < 0).any())
        (torch.Size([5, 3]), True)
    """
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in modules.items():

        def hook(_m: nn.Module, _inp: Any, out: Any, name: str = name) -> Any:
            recorded = first_tensor(out)
            store[name] = recorded
            copy = recorded.clone()
            if isinstance(out, torch.Tensor):
                return copy
            return type(out)([copy, *out[1:]])

        handles.append(module.register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
