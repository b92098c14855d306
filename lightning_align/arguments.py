"""One argument check for every callback, read from its constructor's type hints.

A callback's ``__init__`` says what each argument accepts in its annotation: ``bool``, ``int``, ``float`` (finite:
NaN and infinities are refused), ``str``, ``Literal[...]``, ``list[...]``, ``dict[...]``, unions with ``None``, and
ranges or other conditions as ``Annotated`` metadata (:class:`Bound`, :class:`NonEmpty`, :class:`ValidRegex`; the
aliases below name the usual ones). jsonargparse (LightningCLI) reads the same annotations and drops the metadata,
so ``--help`` shows the plain types and a config value of the wrong type is refused while parsing; a value of the
right type outside its range reaches the constructor and is refused there, by :func:`checked_init`.

:func:`checked_init` wraps an ``__init__`` so that every argument the caller passed is checked before the body runs
(``MeasurementCallback`` applies it to every subclass, a user's too); ``inspect.signature`` and jsonargparse still see
the real signature. Every message names the callback, the argument, the value and what is accepted::

    Sharpness(every_n_steps=2.5): every_n_steps must be an int >= 1; got 2.5

Checks between arguments stay in the callbacks, written with :func:`argument_error` so they read the same.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
import re
import reprlib
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin


class CallbackArgumentError(ValueError, TypeError):
    """A callback argument outside what its annotation accepts (both a ``ValueError`` and a ``TypeError``: a wrong
    type and a value out of range are one kind of mistake, and code catching either keeps working)."""


@dataclass(frozen=True)
class Bound:
    """``Annotated[int | float, Bound(...)]``: a closed (or, with ``*_open``, open) range; ``finite=False`` lets a
    float be NaN or infinite; ``note`` is said after the range in messages."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    finite: bool = True
    note: str = ""

    def accepts(self, value: Any) -> bool:
        if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
            return False
        return self.high is None or bool(value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.low is not None and self.high is not None:
            text = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text = f"{'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text = f"{'<' if self.high_open else '<='} {self.high}"
        else:
            text = ""
        return f"{text} ({self.note})" if self.note else text

    __repr__ = describe


@dataclass(frozen=True)
class NonEmpty:
    """``Annotated[str | list | dict, NonEmpty()]``: at least one character, item or key (an empty list of layers
    would select nothing)."""

    def accepts(self, value: Any) -> bool:
        return len(value) > 0

    def __repr__(self) -> str:
        return "non-empty"


@dataclass(frozen=True)
class ValidRegex:
    """``Annotated[str, ValidRegex()]``: a module or parameter name, or a regular expression (full match)."""

    def accepts(self, value: Any) -> bool:
        return self.explain(value) is None

    def explain(self, value: Any) -> str | None:
        try:
            re.compile(value)
        except re.error as err:
            return f"not a valid regular expression: {err}"
        return None

    def __repr__(self) -> str:
        return "regex"


Count = Annotated[int, Bound(1)]
NonNegativeInt = Annotated[int, Bound(0)]
Seed = Annotated[int, Bound(0, 2**32 - 1)]
PositiveFloat = Annotated[float, Bound(0, low_open=True)]
NonNegativeFloat = Annotated[float, Bound(0)]
Name = Annotated[str, NonEmpty()]
Regex = Annotated[str, ValidRegex()]
#: Module (or parameter) names or regexes; ``None`` in a signature is the callback's default set.
Patterns = Annotated[list[Regex], NonEmpty()]

#: Callback arguments renamed before the first release, ``(class, old name) -> new name``: the old name is an
#: error (no alias), and the message names the new one (``docs/callbacks.md``, "Arguments every callback shares").
RENAMED_ARGUMENTS: dict[tuple[str, str], str] = {
    ("FeatureAlignment", "modules"): "layers",
    ("FeatureSpeedControl", "modules"): "layers",
    ("NTKSpectrum", "params"): "weights",
    ("NTKSpectrum", "method"): "solver",
    ("NTKSpectrum", "figures"): "figure_every",
    ("EffectiveLR", "figure_every_n_steps"): "figure_every",
}

_UNION_TYPES = (Union, types.UnionType)
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict = 80, 80, 8, 8


def short_repr(value: Any) -> str:
    """``repr(value)``, shortened for messages."""
    return _short.repr(value)


# --------------------------------------------------------------------------------------------------
# What a type hint accepts
# --------------------------------------------------------------------------------------------------
def accepts(hint: Any, value: Any, finite: bool = True) -> bool:
    """Whether ``value`` is of ``hint`` (see the module docstring); a hint it does not know accepts anything."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        constraints = hint.__metadata__
        finite = all(getattr(c, "finite", True) for c in constraints)
        return accepts(args[0], value, finite) and all(c.accepts(value) for c in constraints if hasattr(c, "accepts"))
    if hint is Any or hint is object:
        return True
    if hint is None or hint is type(None):
        return value is None
    if origin in _UNION_TYPES:
        return any(accepts(a, value) for a in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)  # the type first: no array == str
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value))
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple)) and all(accepts(_item_hint(hint), v) for v in value)
    if origin is dict or hint is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        return isinstance(value, Mapping) and all(accepts(key, k) and accepts(item, v) for k, v in value.items())
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def _item_hint(hint: Any) -> Any:
    args = [a for a in get_args(hint) if a is not Ellipsis]
    return args[0] if len(args) == 1 else Any


def describe(hint: Any, plural: bool = False) -> str:
    """What ``hint`` accepts, in words: ``"an int >= 1"``, ``"a non-empty list of names or regular expressions"``."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is Annotated:
        return _describe_annotated(args[0], hint.__metadata__, plural)
    if origin in _UNION_TYPES:
        parts = [p for a in args if a is not type(None) for p in _union_parts(a)] + (["None"] if type(None) in args else [])
        return ", ".join(parts[:-1]) + f" or {parts[-1]}" if len(parts) > 1 else parts[0]
    if origin is Literal:
        values = ", ".join(map(repr, args))
        return f"values among {values}" if plural else (values if len(args) == 1 else f"one of {values}")
    if origin in (list, tuple) or hint in (list, tuple):
        return f"{'lists' if plural else 'a list'} of {describe(_item_hint(hint), plural=True)}"
    if origin is dict or hint is dict:
        key, item = args if len(args) == 2 else (Any, Any)
        return f"{'dicts' if plural else 'a dict'} from {describe(key, True)} to {describe(item, True)}"
    words = {bool: ("True or False", "booleans"), int: ("an int", "ints"), float: ("a finite float", "finite floats"),
             str: ("a string", "strings"), type(None): ("None", "None")}
    if hint in words:
        return words[hint][plural]
    if hint is Any or hint is object:
        return "anything"
    name = getattr(hint, "__name__", str(hint))
    return f"{name} objects" if plural else f"a {name}"


def _union_parts(hint: Any) -> list[str]:
    """A union member in words; a ``Literal``'s values one by one (``'auto', 'exact' or None``)."""
    if get_origin(hint) is Literal:
        return [repr(a) for a in get_args(hint)]
    if hint is bool:
        return ["True", "False"]
    return [describe(hint)]


def _describe_annotated(base: Any, constraints: tuple[Any, ...], plural: bool) -> str:
    if any(isinstance(c, ValidRegex) for c in constraints):
        return "names or regular expressions" if plural else "a name or regular expression"
    text = describe(base, plural)
    if base is float and not all(getattr(c, "finite", True) for c in constraints):
        text = text.replace("finite ", "")
    for c in constraints:
        if isinstance(c, Bound):
            text = f"{text} {c.describe()}"
        elif isinstance(c, NonEmpty):
            text = f"non-empty {text}" if plural else re.sub(r"^an? ", "a non-empty ", text)
    return text


def explain(hint: Any, value: Any) -> str:
    """Why ``value`` is refused, beyond the accepted set, as `` (reason)``: the culprit item of a list or dict, a
    regex error, the nearest of a ``Literal``'s strings, the brackets a single string needs to be a list (``""``:
    nothing to add)."""
    reason = _reason(hint, value)
    return f" ({reason})" if reason else ""


def _reason(hint: Any, value: Any) -> str:
    if isinstance(value, str) and not accepts(hint, value) and accepts(hint, [value]):
        return f"a single string; a list is written [{value!r}]"
    for option in _options(hint):
        origin = get_origin(option)
        if origin is Annotated:
            base, constraints = get_args(option)[0], option.__metadata__
            if accepts(base, value):
                reasons = [c.explain(value) for c in constraints if hasattr(c, "explain") and not c.accepts(value)]
                if reasons:
                    return reasons[0]
            option, origin = base, get_origin(base)
        if origin is Literal and isinstance(value, str):
            close = difflib.get_close_matches(value, [a for a in get_args(option) if isinstance(a, str)], n=1, cutoff=0.6)
            if close:
                return f"did you mean {close[0]!r}?"
        if origin in (list, tuple) and isinstance(value, (list, tuple)):
            item = _item_hint(option)
            bad = next((i for i, v in enumerate(value) if not accepts(item, v)), None)
            if bad is not None:
                inner = _reason(item, value[bad])
                return f"item {bad}, {short_repr(value[bad])}" + (f": {inner}" if inner else "")
        if origin is dict and isinstance(value, Mapping) and len(get_args(option)) == 2:
            key, item = get_args(option)
            bad = next(((k, v) for k, v in value.items() if not (accepts(key, k) and accepts(item, v))), None)
            if bad is not None:
                inner = _reason(key, bad[0]) or _reason(item, bad[1])
                return f"entry {short_repr(bad[0])}: {short_repr(bad[1])}" + (f": {inner}" if inner else "")
    return ""


def _options(hint: Any) -> tuple[Any, ...]:
    return tuple(a for a in get_args(hint) if a is not type(None)) if get_origin(hint) in _UNION_TYPES else (hint,)


# --------------------------------------------------------------------------------------------------
# Messages and the check itself
# --------------------------------------------------------------------------------------------------
def argument_error(
    owner: Any, argument: str, value: Any, expected: str, *, detail: str = "", remedy: str = ""
) -> CallbackArgumentError:
    """``Owner(argument=value): argument must be <expected>; got <value><detail>[; remedy]`` (``owner``: a name, a
    class or an instance). Raise what it returns."""
    if not isinstance(owner, str):
        owner = (owner if isinstance(owner, type) else type(owner)).__name__
    shown = short_repr(value)
    remedy = f"; {remedy}" if remedy else ""
    return CallbackArgumentError(f"{owner}({argument}={shown}): {argument} must be {expected}; got {shown}{detail}{remedy}")


def check_argument(owner: Any, argument: str, value: Any, hint: Any) -> None:
    """Raise :func:`argument_error` when ``value`` is not of ``hint``."""
    if not accepts(hint, value):
        raise argument_error(owner, argument, value, describe(hint), detail=explain(hint, value))


@functools.cache
def type_hints(function: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``function`` (``Annotated`` kept); one that cannot be resolved is left out."""
    try:
        return typing.get_type_hints(function, include_extras=True)
    except Exception:  # a name only imported under TYPE_CHECKING, say: resolve what can be resolved
        hints = {}
        for name, annotation in getattr(function, "__annotations__", {}).items():
            try:
                hints[name] = eval(annotation, function.__globals__) if isinstance(annotation, str) else annotation
            except Exception:
                continue
        return hints


@functools.cache
def _parameters(function: Callable[..., Any]) -> Mapping[str, inspect.Parameter]:
    return inspect.signature(function).parameters


def check_arguments(owner: Any, function: Callable[..., Any], arguments: Mapping[str, Any]) -> None:
    """Check ``{name: value}`` passed to ``function`` against its annotations (a value that is the parameter's
    default object is taken as valid; ``*args``/``**kwargs`` are not checked)."""
    hints, parameters = type_hints(function), _parameters(function)
    for name, value in arguments.items():
        parameter = parameters.get(name)
        if name not in hints or parameter is None or parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if value is not parameter.default:
            check_argument(owner, name, value, hints[name])


def unknown_argument(owner: str, bad: str, accepted: list[str]) -> str:
    """``Owner: unknown argument 'x'; did you mean 'y'?`` (or its new name, :data:`RENAMED_ARGUMENTS`)."""
    new = RENAMED_ARGUMENTS.get((owner, bad))
    if new is not None:
        return f"{owner}: unknown argument {bad!r}; it is now called {new!r}"
    close = difflib.get_close_matches(bad, accepted, n=3, cutoff=0.6)
    if close:
        return f"{owner}: unknown argument {bad!r}; did you mean {' or '.join(map(repr, close))}?"
    return f"{owner}: unknown argument {bad!r}" + (f"; it takes {', '.join(accepted)}" if accepted else "")


def checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap ``__init__`` so that the arguments a caller passes are checked (:func:`check_arguments`, the callback
    named by ``type(self)``) before it runs; an unknown keyword gets the nearest accepted names."""
    if getattr(init, "_checks_arguments", False):
        return init
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        owner = type(self).__name__
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            params = signature.parameters
            if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
                accepted = [n for n, p in params.items() if n != "self" and p.kind is not p.VAR_POSITIONAL]
                for bad in kwargs:
                    if bad not in params:
                        raise CallbackArgumentError(unknown_argument(owner, bad, accepted)) from None
        else:
            check_arguments(owner, init, bound.arguments)
        init(self, *args, **kwargs)

    wrapper._checks_arguments = True  # type: ignore[attr-defined]
    return wrapper
