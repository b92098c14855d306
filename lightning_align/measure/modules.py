"""Choosing layers by name, and reading their outputs.

Layer names are qualified names from ``named_modules()``. Users give exact names or regular
expressions (full match); a pattern that matches nothing is an error that names it, never a silent skip.
The default layers are chosen by type at fit start (:func:`select_modules`), then, once a probe forward has
been watched (:mod:`~lightning_align.measure.census`), narrowed to what runs on the probe
(:func:`layers_on_probe`, :func:`weights_read`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from lightning_align.measure.census import Census, unfused_transformer_layers

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


def running_layers(model: nn.Module, census: Census, kind: LayerKind) -> dict[str, nn.Module]:
    """The default layers of ``kind`` that give an output on the probe ``census`` watched, in model order.

    ``"weights"``: the weight layers that ran, and the mixture-of-experts blocks (or, outside any, the modules
    holding stacks of matrices) that ran; ``"features"``: the same without embeddings, plus every module whose own
    code computed attention (found by what it computes, whatever its attributes).
    """
    holders = {name.rpartition(".")[0] for name in census.stacks}
    holders = {h for h in holders if not any(_within(h, block) for block in census.experts)} | census.experts
    chosen = {}
    for name, m in model.named_modules():
        if not name or name not in census.ran:
            continue
        weighted = is_weight_layer(m) and (kind == "weights" or not isinstance(m, nn.Embedding))
        if weighted or name in holders or (kind == "features" and name in census.attention):
            chosen[name] = m
    return chosen


def _within(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


def weights_read(model: nn.Module, census: Census) -> dict[str, nn.Module]:
    """The layers with a weight matrix (weight layers, and any module with a 2-D ``weight`` parameter such as a
    mixture of experts' router) that ran or whose weight the watched forward read, one per distinct weight, in
    model order: a weight tied between modules counts once (under the first module that ran), a layer never used
    not at all, and a weight read without its module running (``nn.MultiheadAttention``'s ``out_proj``) is kept."""
    owner: dict[int, str] = {}
    modules = dict(model.named_modules())
    for name, m in modules.items():
        matrix = is_weight_layer(m) or (isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.ndim == 2)
        if not (name and matrix and (name in census.ran or id(m.weight) in census.read)):
            continue
        first = owner.get(id(m.weight))
        if first is None or (first not in census.ran and name in census.ran):
            owner[id(m.weight)] = name
    kept = set(owner.values())
    return {name: m for name, m in modules.items() if name in kept}


def layers_on_probe(
    model: nn.Module, census: Census, patterns: Sequence[str] | None, chosen: Mapping[str, nn.Module], kind: LayerKind,
    owner: str, argument: str = "layers",
) -> dict[str, nn.Module]:
    """The layers whose outputs a callback reads, once a probe forward was watched: with no ``patterns`` the defaults
    of ``kind`` that run (:func:`running_layers`), else ``chosen`` (the named ones), each of which must have run.

    Raises:
        ValueError: a named layer that did not run, or no default layer that runs (naming ``owner(argument=...)``).
    """
    if patterns is not None:
        missing = [name for name in chosen if name not in census.ran]
        if missing:
            raise ValueError(
                f"{owner}({argument}=...): {missing} {'was' if len(missing) == 1 else 'were'} not called by the forward "
                "pass on the probe batch (unused, or read by another module, as nn.MultiheadAttention reads its "
                f"out_proj's weight), so there is no output to measure; remove {'it' if len(missing) == 1 else 'them'} from `{argument}`."
            )
        return dict(chosen)
    found = running_layers(model, census, kind)
    if not found:
        raise ValueError(f"{owner}: no layer of {type(model).__name__} with an output ran on the probe batch; name the layers to use in `{argument}`")
    return found


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
    PyTorch's fused transformer fast path is off inside (it would skip the modules it holds, as training does not).

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
        with unfused_transformer_layers():  # PyTorch's fused transformer fast path skips the modules it holds
            yield store
    finally:
        for h in handles:
            h.remove()
