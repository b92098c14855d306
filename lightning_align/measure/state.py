"""Side-effect guards shared by every measurement.

A measurement must leave the model exactly as it found it: parameter values, buffers (BatchNorm
running statistics), tensor and plain Python attributes (torchmetrics states and counters), ``.grad``
tensors, train/eval flags and every random number stream. The
:func:`preserved_state` context manager snapshots what a probe could touch and puts it back on exit,
so each measure function (and each callback) gets that guarantee from one place.

Parameters are not copied: measurements never write to them (they use ``torch.func`` or
``torch.autograd.grad``), and copying them would double memory. ``.grad`` tensors are detached from
the parameters for the duration of the probe and re-attached afterwards, so even a stray
``backward()`` inside a probe cannot accumulate into the training gradients.

Probes run in at least float32 whatever the training precision: :func:`upcast_floating` gives every
bfloat16/float16 parameter and buffer a float32 copy for the duration of a probe (same tensor objects,
so optimizer references and hooks stay valid) and puts the original low-precision tensors back on exit;
float64 models are measured in float64 (:func:`probe_dtype`).
"""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
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
def preserved_state(model: nn.Module, *, rng: bool = True, also: Iterable[object] = ()) -> Iterator[None]:
    """Restore tensors, plain attributes, ``.grad``, train/eval flags and RNG streams of ``model`` on exit.

    Restored in every module :func:`reachable_modules` finds from ``model`` (and from the attributes of the
    objects in ``also``, e.g. a datamodule): buffers and tensor attributes (a torchmetrics ``Metric``'s states,
    ``self.tp += ...``), by object and value, so a forward that re-assigns one (``self.calls = self.calls + 1``)
    or updates it in place leaves no trace; plain Python attributes (numbers, strings, the contents of lists,
    dicts and sets: counters, ``_update_count``, list states), and attributes of those kinds that the probe
    added are removed. Parameters are not copied (measurements never write to them); objects of other classes
    are restored by reference only.

    Args:
        model: the module a probe will run on.
        rng: also fork the torch, Python and NumPy random streams.
        also: other objects whose modules the probe may change (their own plain attributes are not restored).

    Example:
        >>> net = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
        >>> before = net[1].running_mean.clone()
        >>> with preserved_state(net):
        ...     _ = net(torch.randn(8, 3))  # train-mode BatchNorm updates its statistics...
        >>> torch.equal(net[1].running_mean, before)  # ...which are put back
        True
    """
    modules = reachable_modules(model, also)
    flags = [(m, m.training) for m in modules]
    buffers = [(m, dict(m._buffers), [(b, b.detach().clone()) for b in m._buffers.values() if b is not None]) for m in modules]
    attributes = [_SavedAttributes(m) for m in modules]
    params = list(dict.fromkeys(p for m in modules for p in m._parameters.values() if p is not None))
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    rng_guard = preserved_rng(_devices_with_rng(model)) if rng else contextlib.nullcontext()
    try:
        with rng_guard:
            yield
    finally:
        for m, named, values in buffers:
            if named or m._buffers:
                m._buffers.clear()
                m._buffers.update(named)
                _restore_values(values)
        for saved in attributes:
            saved.restore()
        for p, g in zip(params, grads):
            p.grad = g
        for m, was_training in flags:
            m.training = was_training


def reachable_modules(model: nn.Module, also: Iterable[object] = ()) -> list[nn.Module]:
    """``model.modules()`` and the modules a probe can reach without them being registered: held in plain
    lists, tuples, dicts or sets (up to three levels deep) of any module found, or in the attributes of ``also``.

    Example:
        >>> class Net(nn.Linear):
        ...     def __init__(self):
        ...         super().__init__(2, 2)
        ...         self.extra = {"counter": nn.Identity()}  # a plain dict: not registered
        >>> [type(m).__name__ for m in reachable_modules(Net())]
        ['Net', 'Identity']
    """
    found: dict[int, nn.Module] = {}
    queue: list[nn.Module] = [model]
    for obj in also:
        queue.extend(_modules_in(list(vars(obj).values()), 3))
    while queue:
        for m in queue.pop().modules():
            if id(m) not in found:
                found[id(m)] = m
                queue.extend(_modules_in([v for k, v in vars(m).items() if k not in _MODULE_KEYS], 3))
    return list(found.values())


def _modules_in(value: Any, depth: int) -> list[nn.Module]:
    """Modules in ``value``, a module or builtin containers of them ``depth`` levels deep."""
    if isinstance(value, nn.Module):
        return [value]
    if depth == 0 or type(value) not in _SEQUENCES_AND_MAPS:
        return []
    items = value.values() if type(value) is dict else value
    return [m for item in items for m in _modules_in(item, depth - 1)]


_PLAIN = (bool, int, float, complex, str, bytes, tuple, type(None))
_CONTAINERS = (list, dict, set)
_SEQUENCES_AND_MAPS = (list, tuple, dict, set)
#: What ``nn.Module.__init__`` sets (parameters, buffers, children, hooks, ``training``): restored by other means.
_MODULE_KEYS = frozenset(vars(nn.Module()))


def _bookkeeping(key: str) -> bool:
    return key in _MODULE_KEYS or (key[:1] == "_" and "hook" in key)


class _SavedAttributes:
    """One module's own attributes as a probe found them: plain values (numbers, strings; lists, dicts and sets
    by contents) and tensors that are neither parameters nor buffers (by object and value)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        state = vars(module)
        self.keys = set(state)
        self.plain: dict[str, tuple[Any, Any]] = {}
        self.tensors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key in self.keys - _MODULE_KEYS:
            if key[:1] == "_" and "hook" in key:
                continue
            value = state[key]
            if type(value) in _CONTAINERS:
                self.plain[key] = (value, type(value)(value))
            elif isinstance(value, torch.Tensor):
                if not isinstance(value, nn.Parameter):
                    self.tensors[key] = (value, value.detach().clone())
            elif isinstance(value, _PLAIN):
                self.plain[key] = (value, None)

    def restore(self) -> None:
        state = vars(self.module)
        for key in state.keys() - self.keys:  # added by the probe (a lazily created cache, a counter): removed
            value = state[key]
            if not _bookkeeping(key) and (isinstance(value, (*_PLAIN, torch.Tensor)) or type(value) in _CONTAINERS):
                del state[key]
        for key, (value, contents) in self.plain.items():
            if contents is not None:  # a container: same object, contents as before (it may be mutated in place)
                value.clear()
                if isinstance(value, list):
                    value.extend(contents)
                else:
                    value.update(contents)
            state[key] = value
        if self.tensors:
            for key, (value, _) in self.tensors.items():
                state[key] = value
            _restore_values(self.tensors.values())


def _restore_values(values: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each live tensor's values as saved (untouched when unchanged: no version bump of a tensor autograd saved)."""
    with torch.no_grad():
        for live, saved in values:
            if live.shape == saved.shape and live.dtype == saved.dtype and not torch.equal(live, saved):
                live.copy_(saved)


def map_tensors(data: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor inside nested lists/tuples/named tuples/dicts."""
    if isinstance(data, torch.Tensor):
        return fn(data)
    if isinstance(data, Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in data.items()}
        return mapped if type(data) is dict else _same_mapping_type(data, mapped)
    if isinstance(data, (tuple, list)):
        mapped = [map_tensors(x, fn) for x in data]
        return type(data)(*mapped) if hasattr(data, "_fields") else type(data)(mapped)
    return data


def _same_mapping_type(original: Mapping[str, Any], mapped: dict[str, Any]) -> Mapping[str, Any]:
    """``mapped`` as the type of ``original`` when it can be built from a dict (``ModelKwargs``, ``OrderedDict``)."""
    try:
        return type(original)(mapped)
    except Exception:  # e.g. a mapping type without a dict constructor: a plain dict is the best we can do
        return mapped


def floating_to(data: Any, dtype: torch.dtype) -> Any:
    """Cast every floating-point tensor inside nested containers to ``dtype``."""
    return map_tensors(data, lambda t: t.to(dtype) if t.is_floating_point() else t)


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """``dtype`` promoted to float32 or wider (bfloat16/float16 -> float32; float64 stays float64).

    Example:
        >>> at_least_fp32(torch.bfloat16), at_least_fp32(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else dtype


def probe_dtype(model: nn.Module) -> torch.dtype:
    """The dtype probes of ``model`` compute in: its first floating parameter's dtype, at least float32.

    A bfloat16/float16 model (``precision="bf16-true"``/``"16-true"``) is probed in float32, a float64
    model (``"64-true"``) in float64, so a measurement is never less precise than the model's own arithmetic.

    Example:
        >>> probe_dtype(nn.Linear(2, 2).to(torch.bfloat16)), probe_dtype(nn.Linear(2, 2).double())
        (torch.float32, torch.float64)
    """
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return at_least_fp32(t.dtype)
    return torch.float32


@contextlib.contextmanager
def upcast_floating(model: nn.Module, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Give every floating parameter and buffer narrower than ``dtype`` a ``dtype`` copy; restore on exit.

    The tensors keep their identity (``.data`` is swapped), so ``requires_grad``, optimizer references,
    hooks and ``named_parameters()`` all stay valid; on exit the *original* tensors are put back, so
    nothing done during the probe (e.g. BatchNorm statistics updates) reaches them and training stays
    bit-identical. ``.grad`` of a swapped parameter is set aside during the probe and restored.

    Example:
        >>> net = nn.Linear(2, 2).to(torch.bfloat16)
        >>> with upcast_floating(net):
        ...     net.weight.dtype
        torch.float32
        >>> net.weight.dtype
        torch.bfloat16
    """
    swapped: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    try:
        for t in itertools.chain(model.parameters(), model.buffers()):
            if t.is_floating_point() and torch.promote_types(t.dtype, dtype) != t.dtype:
                grad = t.grad if isinstance(t, nn.Parameter) else None
                if grad is not None:
                    t.grad = None
                original = t.data
                swapped.append((t, original, grad))
                t.data = original.to(dtype)
        yield
    finally:
        for t, original, grad in reversed(swapped):
            if isinstance(t, nn.Parameter):
                t.grad = None  # a probe's float32 gradient must not meet the original low-precision data
            t.data = original
            if grad is not None:
                t.grad = grad


@contextlib.contextmanager
def default_dtype_at_least_fp32() -> Iterator[None]:
    """Raise the default dtype to float32 if it is lower (``"bf16-true"`` may leave bfloat16 set)."""
    saved = torch.get_default_dtype()
    if torch.promote_types(saved, torch.float32) != saved:
        torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)
