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

from lightning.pytorch.cli import LightningArgumentParser

QUICKSTART_HINT = "start from a config: lightning-align fit --config configs/quickstart.yaml (see lightning-align --help)"

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
    """``Class(key): problem`` from jsonargparse's nested "Parser key" report, or ``None``.

    Example:
        >>> nested_key_error("Parser key \\"trainer.callbacks\\":\\n  Does not validate\\n  - Problem with given class_path "
        ...                  "'lightning_align.RankMonitor':\\n    Parser key \\"every_n_steps\\":\\n      Expected a <class 'int'>. Got value: zero")
        "RankMonitor(every_n_steps): Expected a <class 'int'>. Got value: zero"
    """
    lines = [line.strip() for line in message.splitlines()]
    owner = key = detail = None
    for i, line in enumerate(lines):
        found = re.search(r"Problem with given class_path '([^']+)'", line)
        if found and owner is None:
            owner = found.group(1).rsplit(".", 1)[-1]
        found = re.fullmatch(r'Parser key "([^"]+)":', line)
        if found and i + 1 < len(lines) and not lines[i + 1].startswith("Does not validate"):
            key, detail = found.group(1), lines[i + 1]
        elif found and owner is not None and i + 1 < len(lines):  # an init argument of a Union type
            key, detail = found.group(1), _union_detail(lines[i + 1 :])
    if key is None:
        return None
    return f"{owner}({key}): {detail}" if owner else f"{key}: {detail}"


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
    owner = class_path.rsplit(".", 1)[-1]
    new = RENAMED_ARGUMENTS.get((owner, bad))
    if new is not None:
        return f"{owner}: unknown argument {bad!r}; it is now called {new!r}"
    accepted = init_arguments(class_path)
    close = near_misses(bad, accepted, cutoff=0.6)
    if close:
        hint = f"; did you mean {' or '.join(map(repr, close))}?"
    else:
        hint = f"; it takes {', '.join(accepted)}" if accepted else ""
    return f"{owner}: unknown argument {bad!r}{hint}"


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
    renamed = unknown_init_argument(message)
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
