"""Choosing layers by name, and reading their outputs.

Layer names are qualified names from ``named_modules()``. Users give exact names or regular
expressions (full match); a pattern that matches nothing is an error that names it, never a silent skip.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

WEIGHT_LAYER_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
#: Normalisation layers with running statistics (train/eval changes what they compute).
NORMS_WITH_STATS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
#: ``"weights"``: every layer with a weight matrix (Linear, conv, embedding, Hugging Face ``Conv1D``);
#: ``"features"``: the layers whose outputs are features (the same without embeddings, plus attention blocks).
LayerKind = Literal["weights", "features"]


def is_hf_conv1d(module: nn.Module | None) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's linear layer, weight ``(in, out)``), recognised without importing it."""
    w = getattr(module, "weight", None)
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, torch.Tensor) and w.ndim == 2


def is_weight_layer(module: nn.Module) -> bool:
    """A layer with a weight matrix: ``nn.Linear``, a convolution, ``nn.Embedding`` or HF ``Conv1D``."""
    return isinstance(module, WEIGHT_LAYER_TYPES) or is_hf_conv1d(module)


def is_attention(module: nn.Module) -> bool:
    """An attention block: ``nn.MultiheadAttention``; ours (``attn_scale``); HF (``scaling``) or timm (``scale``)
    attention, each with a ``head_dim`` or ``num_heads``."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    heads = hasattr(module, "head_dim") or hasattr(module, "num_heads")
    return heads and any(hasattr(module, a) for a in ("attn_scale", "scaling", "scale"))


def is_layer_of_kind(module: nn.Module, kind: LayerKind) -> bool:
    """Whether the default selection of ``kind`` takes ``module``."""
    if kind == "weights":
        return is_weight_layer(module)
    return (is_weight_layer(module) and not isinstance(module, nn.Embedding)) or is_attention(module)


def select_modules(
    model: nn.Module,
    patterns: Sequence[str] | None,
    kind: LayerKind = "weights",
    *,
    owner: str = "lightning_align",
) -> dict[str, nn.Module]:
    """Modules of ``model`` by qualified name, in ``named_modules()`` order: the one place that chooses layers.

    Args:
        model: the model to search.
        patterns: exact names or regular expressions (full match). ``None`` selects the default layers
            of ``kind`` (see :data:`LayerKind`).
        kind: the default selection when ``patterns`` is ``None``.
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
        chosen = {n: m for n, m in named if is_layer_of_kind(m, kind)}
        if not chosen:
            kinds = "Linear, Conv or attention" if kind == "features" else "Linear, Conv, Embedding or Conv1D"
            raise ValueError(f"{owner}: {type(model).__name__} has no {kinds} layer; name the layers to use")
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


@contextlib.contextmanager
def running_statistics(model: nn.Module) -> Iterator[None]:
    """Normalisation layers with running statistics use them inside the block (flags restored after)."""
    norms = [(m, m.training) for m in model.modules() if isinstance(m, NORMS_WITH_STATS)]
    for m, _ in norms:
        m.training = False
    try:
        yield
    finally:
        for m, was_training in norms:
            m.training = was_training


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
    (e.g. ``ReLU(inplace=True)``) cannot change what was recorded; gradients flow through the copy. With
    grad enabled, the output of a layer that depends on no trainable parameter (a frozen input layer) is
    recorded as a leaf that requires grad, so the loss can still be differentiated with respect to it.

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
            if torch.is_grad_enabled() and recorded.is_floating_point() and not recorded.requires_grad:
                with contextlib.suppress(RuntimeError):  # inside torch.func transforms a leaf cannot be made
                    recorded = recorded.detach().requires_grad_(True)  # a frozen layer's output: still differentiable
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
