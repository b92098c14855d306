"""Short command-line errors: one message naming the key, a "did you mean" for near misses, and where to start.

jsonargparse prints the whole usage (dozens of lines) before its message, and a callback's own ``ValueError``
arrives wrapped in several layers of "Does not validate against any of the Union subtypes". Here the parser
prints one line: the innermost message, the nearest valid keys for an unknown one, and a pointer to the
quickstart config when no model or data was given.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import re
import sys
from typing import NoReturn

import yaml
from lightning.pytorch.cli import LightningArgumentParser

from lightning_align.arguments import RENAMED_ARGUMENTS, argument_error, describe, explain, type_hints, unknown_argument

__all__ = ["RENAMED_ARGUMENTS", "AlignArgumentParser", "short_message"]

QUICKSTART_HINT = "start from a config: lightning-align fit --config configs/quickstart.yaml (see lightning-align --help)"


def root_cause(ex: BaseException | None) -> BaseException | None:
    """The innermost exception of a ``raise ... from`` chain (a callback's own ``ValueError``, not the wrappers)."""
    seen = set()
    while ex is not None and id(ex) not in seen:
        seen.add(id(ex))
        inner = ex.__cause__ if ex.__cause__ is not None else (None if ex.__suppress_context__ else ex.__context__)
        if inner is None:
            return ex
        ex = inner
    return ex


def near_misses(bad: str, known: list[str], n: int = 3, cutoff: float = 0.8) -> list[str]:
    """Valid keys close to ``bad`` (``--trainer.max_stpes`` -> ``--trainer.max_steps``).

    Example:
        >>> near_misses("--trainer.max_stpes", ["--trainer.max_steps", "--trainer.min_steps", "--model"])
        ['--trainer.max_steps', '--trainer.min_steps']
    """
    return difflib.get_close_matches(bad, known, n=n, cutoff=cutoff)


def nested_key_error(message: str) -> str | None:
    """The message for jsonargparse's nested "Parser key" report (a config value of the wrong type), or ``None``:
    the constructor's own words (:func:`argument_message`) when its class can be imported, else ``Class(key): problem``.

    Example:
        >>> nested_key_error("Parser key \\"trainer.callbacks\\":\\n  Does not validate\\n  - Problem with given class_path "
        ...                  "'lightning_align.RankMonitor':\\n    Parser key \\"every_n_steps\\":\\n      Expected a <class 'int'>. Got value: 2.5")
        'RankMonitor(every_n_steps=2.5): every_n_steps must be an int >= 1; got 2.5'
    """
    lines = [line.strip() for line in message.splitlines()]
    class_path = key = detail = given = None
    for i, line in enumerate(lines):
        found = re.search(r"Problem with given class_path '([^']+)'", line)
        if found and class_path is None:
            class_path = found.group(1)
        found = re.fullmatch(r'Parser key "([^"]+)":', line)
        if found and i + 1 < len(lines) and not lines[i + 1].startswith("Does not validate"):
            key, detail = found.group(1), lines[i + 1]
            given = re.search(r"Got value: (.*)$", detail)
            given = given.group(1) if given else None
        elif found and class_path is not None and i + 1 < len(lines):  # an init argument of a Union type
            key, detail = found.group(1), _union_detail(lines[i + 1 :])
            given = next((line.split(": ", 1)[1] for line in lines[i + 1 :] if line.startswith("Given value: ")), None)
    if key is None:
        return None
    if class_path is not None and given is not None:
        own = argument_message(class_path, key, given)
        if own:
            return own
    owner = class_path.rsplit(".", 1)[-1] if class_path else None
    return f"{owner}({key}): {detail}" if owner else f"{key}: {detail}"


def argument_message(class_path: str, key: str, given: str) -> str | None:
    """``Class(key=value): key must be ...; got value``, the message the constructor gives a value outside its
    annotation (:mod:`lightning_align.arguments`), for a config value jsonargparse refused; ``None`` when the class
    or the argument's annotation cannot be found.

    Example:
        >>> argument_message("lightning_align.AlignSummary", "style", "rihc")
        "AlignSummary(style='rihc'): style must be one of 'auto', 'rich', 'plain'; got 'rihc' (did you mean 'rich'?)"
    """
    cls = _import(class_path)
    hint = type_hints(cls.__init__).get(key) if isinstance(cls, type) else None
    if hint is None:
        return None
    try:
        value = yaml.safe_load(given)
    except yaml.YAMLError:
        value = given
    return str(argument_error(cls.__name__, key, value, describe(hint), detail=explain(hint, value)))


def _import(dotted: str) -> object | None:
    module, _, name = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return None


def unknown_class(message: str) -> str | None:
    """``key: no class 'x'; did you mean lightning_align.Y?`` for a ``class_path`` (or short class name) that does not
    import, the nearest among the importable subclasses of the key's base classes; ``None`` for other messages.

    Example:
        >>> unknown_class('Parser key "trainer.callbacks":\\n  Subtypes: [list[lightning.pytorch.callbacks.callback.Callback]]\\n'
        ...               "    - Problem with given class_path 'lightning_align.Sharpnes':\\n        module 'lightning_align' "
        ...               "has no attribute 'Sharpnes'")
        "trainer.callbacks: no class 'lightning_align.Sharpnes'; did you mean lightning_align.Sharpness?"
    """
    found = (
        re.search(r"Problem with given class_path '([^']+)':\s*module '[^']*' has no attribute", message)
        or re.search(r"Expected a path but (\S+) either not accessible or invalid", message)
        or re.search(r"Expected a dot import path string: (\S+)", message)
    )
    key = re.search(r'Parser key "([^"]+)"', message)
    subtypes = re.search(r"Subtypes: \[(.*)\]", message)
    if not (found and key and subtypes):
        return None
    bad = found.group(1)
    bases = [c for c in map(_import, re.findall(r"[A-Za-z_][\w.]*\.[A-Z]\w*", subtypes.group(1))) if isinstance(c, type)]
    choices = {public_path(c): c.__name__.lower() for base in bases for c in _subclasses(base)}
    wanted = bad.rsplit(".", 1)[-1].lower()
    close = difflib.get_close_matches(wanted, sorted(set(choices.values())), n=3, cutoff=0.6)
    paths = [p for name in close for p in sorted(choices) if choices[p] == name][:3]
    hint = f"; did you mean {' or '.join(paths)}?" if paths else " (the accepted classes: --help)"
    return f"{key.group(1)}: no class {bad!r}{hint}"


def _subclasses(base: type) -> list[type]:
    """The public, concrete, imported subclasses of ``base``."""
    found, todo = [], list(base.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if not cls.__name__.startswith("_") and not inspect.isabstract(cls) and cls not in found:
            found.append(cls)
    return found


def public_path(cls: type) -> str:
    """The shortest dotted path that imports ``cls`` (``lightning_align.Sharpness``, not its defining module)."""
    parts = cls.__module__.split(".")
    for i in range(1, len(parts) + 1):
        module = ".".join(parts[:i])
        if _import(f"{module}.{cls.__name__}") is cls:
            return f"{module}.{cls.__name__}"
    return f"{cls.__module__}.{cls.__name__}"


def _union_detail(lines: list[str]) -> str:
    """"expected float, 'auto' or None; got 'fast'" from jsonargparse's report on a Union-typed value."""
    subtypes = next((line[len("Subtypes: [") : -1] for line in lines if line.startswith("Subtypes: [")), "")
    kinds = re.findall(r"(?:[^,\[]|\[[^\]]*\])+", subtypes)  # the items, commas inside brackets kept
    kinds = [k.strip() for k in kinds]
    pretty = [re.sub(r"<class '(?:\w+\.)*(\w+)'>", r"\1", k).replace("NoneType", "None") for k in kinds if k]
    pretty = [re.sub(r"^typing\.Literal\[(.*)\]$", r"\1", k) for k in pretty]
    given = next((line.split(": ", 1)[1] for line in lines if line.startswith("Given value: ")), "?")
    expected = ", ".join(pretty[:-1]) + f" or {pretty[-1]}" if len(pretty) > 1 else "".join(pretty) or "another type"
    return f"expected {expected}; got {given!r}"


def init_arguments(class_path: str) -> list[str]:
    """The keyword arguments ``class_path``'s constructor accepts (``[]`` when it cannot be imported).

    Example:
        >>> init_arguments("lightning_align.CoordCheck")[:2]
        ['every_n_steps', 'layers']
    """
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        params = inspect.signature(cls.__init__).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name != "self"]


def unknown_init_argument(message: str) -> str | None:
    """``Class: unknown argument 'x'; ...`` for a ``class_path`` given an argument it does not take, or ``None``.

    A renamed argument (:data:`RENAMED_ARGUMENTS`) names its new name; any other gets the nearest accepted ones.

    Example:
        >>> unknown_init_argument("Problem with given class_path 'lightning_align.FeatureAlignment':\\n"
        ...                       "    Option 'modules' is not accepted")
        "FeatureAlignment: unknown argument 'modules'; it is now called 'layers'"
        >>> unknown_init_argument("Problem with given class_path 'lightning_align.EffectiveLR':\\n"
        ...                       "    Option 'figure_evry' is not accepted")
        "EffectiveLR: unknown argument 'figure_evry'; did you mean 'figure_every'?"
    """
    found = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", message)
    if not found:
        return None
    class_path, bad = found.groups()
    return unknown_argument(class_path.rsplit(".", 1)[-1], bad, init_arguments(class_path))


def short_message(message: str, ex: BaseException | None, known: list[str]) -> str:
    """The one-paragraph error for ``message`` (and its exception), with suggestions.

    Example:
        >>> short_message("unrecognized arguments: --trainer.max_stpes=3", None, ["--trainer.max_steps"])
        "unrecognized argument '--trainer.max_stpes'; did you mean '--trainer.max_steps'?"
    """
    unknown = (
        re.search(r"unrecognized arguments: (\S+)", message)
        or re.search(r"Key ['\"]([^'\"]+)['\"] is not expected", message)
        or re.search(r"does not accept option ['\"]([^'\"]+)['\"]", message)
    )
    if unknown:
        bad = unknown.group(1).split("=")[0]
        dotted = bad if bad.startswith("--") else "--" + bad
        close = near_misses(dotted, known)
        hint = f"; did you mean {' or '.join(repr(c if bad.startswith('--') else c[2:]) for c in close)}?" if close else ""
        return f"unrecognized argument {bad!r}{hint}"
    renamed = unknown_init_argument(message) or unknown_class(message)
    if renamed:
        return renamed
    if "the following arguments are required" in message and ("model" in message or "data" in message):
        return f"{message}; {QUICKSTART_HINT}"
    nested = nested_key_error(message)
    if nested:
        return nested
    cause = root_cause(ex)
    if cause is not None and cause is not ex and not type(cause).__module__.startswith("jsonargparse"):
        return f"{type(cause).__name__}: {cause}"
    first = message.strip().splitlines()[0] if message.strip() else message
    return first


class AlignArgumentParser(LightningArgumentParser):
    """The CLI's parser: errors as one short message (see :func:`short_message`) instead of the full usage."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:  # type: ignore[override]
        if not self.exit_on_error:
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        known = sorted(k for k in parser._option_string_actions if k.startswith("--"))
        prog = parser.prog.replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {short_message(message, ex, known)}\n")
        sys.stderr.write(f"(all options: {prog} --help)\n")
        sys.exit(2)
