"""What the NTK needs to know of a model and its inputs before any Jacobian: sample independence,
the differentiated parameters, the layers with a structured Jacobian, and a one-sample dry run.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_align.measure.autodiff import math_attention
from lightning_align.measure.state import map_tensors, preserved_state

_BN = nn.modules.batchnorm._BatchNorm


def check_sample_independent(model: nn.Module, owner: str = "empirical_ntk") -> None:
    """Raise if a module of ``model`` mixes samples (train-mode BatchNorm) or is random (active dropout).

    The per-sample kernel is only defined when each output depends on its own input alone, and a
    kernel of a random function changes from call to call.

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        >>> check_sample_independent(net.eval())  # running statistics: fine
        >>> check_sample_independent(net.train())
        Traceback (most recent call last):
        ...
        ValueError: ...
    """
    for name, m in model.named_modules():
        if isinstance(m, _BN) and m.training:
            raise ValueError(
                f"{owner}: BatchNorm layer {name!r} is in training mode, where it normalises with batch "
                "statistics and so mixes samples; the per-sample NTK is then undefined. Put it in eval mode "
                "(running statistics), e.g. `model.eval()`, or use NTKSpectrum(bn_mode='eval') (the default)."
            )
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0:
            raise ValueError(
                f"{owner}: dropout layer {name!r} is active (training mode, p={m.p}), so the model is a random "
                "function; put it in eval mode (`model.eval()` or `module.train(False)`) before computing the NTK."
            )


def _select_parameters(model: nn.Module, patterns: Sequence[str] | None, owner: str) -> dict[str, Tensor]:
    named = dict(model.named_parameters())
    trainable = {n: p for n, p in named.items() if p.requires_grad}
    if patterns is None:
        chosen = trainable
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        chosen = {}
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{owner}: parameter pattern {pattern!r} is not a valid regular expression: {err}") from err
            hits = {n: p for n, p in trainable.items() if n == pattern or regex.fullmatch(n)}
            if not hits:
                names = list(trainable)
                raise ValueError(
                    f"{owner}: parameter name or pattern {pattern!r} matches no trainable parameter of "
                    f"{type(model).__name__}. Trainable names include: {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                )
            chosen.update(hits)
        chosen = {n: p for n, p in trainable.items() if n in chosen}
    if not chosen:
        raise ValueError(f"{owner}: {type(model).__name__} has no trainable parameter (requires_grad=True) to differentiate")
    return chosen


def _structured_candidates(model: nn.Module, selected: dict[str, Tensor]) -> dict[str, tuple[nn.Module, str, str | None, str | None]]:
    """Linear / Conv2d modules with the stock forward whose selected parameters no other module uses."""
    uses: dict[int, int] = {}
    for m in model.modules():
        for p in m._parameters.values():
            if p is not None:
                uses[id(p)] = uses.get(id(p), 0) + 1
    by_id = {id(p): n for n, p in selected.items()}
    out = {}
    for mname, m in model.named_modules():
        if type(m).forward is nn.Linear.forward and isinstance(m, nn.Linear):
            kind = "linear"
        elif (
            isinstance(m, nn.Conv2d) and type(m).forward is nn.Conv2d.forward and m.groups == 1
            and m.padding_mode == "zeros" and not isinstance(m.padding, str)
        ):
            kind = "conv2d"
        else:
            continue
        names = {}
        for attr in ("weight", "bias"):
            p = m._parameters.get(attr)
            if p is not None and id(p) in by_id:
                names[attr] = by_id[id(p)]
        shared = any(uses.get(id(m._parameters[a]), 0) > 1 for a in names)
        if names and not shared:
            out[mname] = (m, kind, names.get("weight"), names.get("bias"))
    return out


@contextlib.contextmanager
def _probe_hooks(layers: Mapping[str, Any], probes: Mapping[str, list[Tensor]] | None, seen: dict[str, list[Any]]) -> Iterator[None]:
    """Record each layer's input per call; add the zero probe of that call to its output (if given).

    ``layers`` maps names to structured layers (anything with a ``module``) or to candidate tuples ``(module, ...)``.
    """
    handles = []
    for name, layer in layers.items():
        module = layer[0] if isinstance(layer, tuple) else layer.module

        def hook(_m: nn.Module, args: tuple[Any, ...], out: Tensor, name: str = name) -> Tensor | None:
            k = len(seen[name])
            seen[name].append(args[0] if probes is not None else tuple(out.shape))
            if probes is None:
                return None
            if k >= len(probes[name]):
                raise RuntimeError(f"layer {name!r} was called more often than on the first sample; the NTK needs the same graph for every sample")
            return out + probes[name][k]

        # prepend: see the layer's own output, before other hooks (e.g. μP output multipliers) rescale it
        handles.append(module.register_forward_hook(hook, prepend=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _dry_run(
    model: nn.Module, one: Any, candidates: Mapping[str, Any], owner: str, described: str
) -> tuple[dict[str, list[tuple[int, ...]]], tuple[int, ...], int]:
    """Run one sample: the per-call output shapes of the structured candidates, the output shape, and the
    bytes the forward saves for backward (parameters, buffers and inputs excluded): the per-sample unit of
    the memory estimates."""
    seen: dict[str, list[Any]] = {name: [] for name in candidates}
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *_leaves(one))}
    counted: set[tuple[int, int]] = set()
    saved = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal saved
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. a tensor subclass without storage
            return t
        key = (storage.data_ptr(), storage.nbytes())
        if key[0] not in own and key not in counted:
            counted.add(key)
            saved += key[1]
        return t

    try:
        with (
            preserved_state(model), torch.enable_grad(), math_attention(), _probe_hooks(candidates, None, seen),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            out = model(one)
    except Exception as err:  # noqa: BLE001 - re-raised with context
        raise ValueError(
            f"{owner}: the model could not run on the inputs ({described}; tried their first sample): "
            f"{type(err).__name__}: {err}. Check that the inputs match the model"
        ) from err
    if not isinstance(out, Tensor):
        raise TypeError(f"{owner}: the model returned {type(out).__name__}; a tensor of outputs (n, ...) is needed (define `probe_outputs` or wrap the model)")
    if out.ndim == 0 or out.shape[0] != 1:
        raise ValueError(f"{owner}: on one sample the model returned shape {tuple(out.shape)}; the leading dimension must be the sample dimension")
    if not out.is_floating_point():
        raise TypeError(f"{owner}: the model returned {out.dtype} outputs; the NTK needs floating-point outputs")
    return seen, tuple(out.shape), saved


def _leaves(inputs: Any) -> list[Tensor]:
    leaves: list[Tensor] = []
    map_tensors(inputs, lambda t: leaves.append(t) or t)
    return leaves


def _num_samples(inputs: Any, owner: str) -> int:
    leaves = _leaves(inputs)
    if not leaves:
        raise ValueError(f"{owner}: inputs hold no tensor (got {type(inputs).__name__})")
    sizes = {int(t.shape[0]) if t.ndim else -1 for t in leaves}
    if len(sizes) != 1 or -1 in sizes or 0 in sizes:
        raise ValueError(f"{owner}: every input tensor needs the same leading (sample) dimension >= 1, got {_describe(inputs)}")
    return sizes.pop()


def _slice(inputs: Any, lo: int, hi: int) -> Any:
    return map_tensors(inputs, lambda t: t[lo:hi])


def _unfold(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """A conv layer's input as patches ``(b, C·k·k, L)``: the tokens of its structured Jacobian."""
    return nn.functional.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)


def _describe(inputs: Any) -> str:
    shapes = [tuple(t.shape) for t in _leaves(inputs)]
    return f"shape {shapes[0]}" if len(shapes) == 1 else f"shapes {shapes}"
