"""Docs audit: every public class and function of the package has a docstring with an example.

Public = exported (``__all__``) from ``lightning_align``, ``lightning_align.measure``,
``lightning_align.parametrize`` and ``example_modules``. The doctests themselves run with
``pytest --doctest-modules lightning_align example_modules``.
"""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = ["lightning_align", "lightning_align.measure", "lightning_align.parametrize", "example_modules"]


def public_objects() -> list[tuple[str, object]]:
    out = []
    for pkg in PACKAGES:
        module = importlib.import_module(pkg)
        names = getattr(module, "__all__", [n for n in dir(module) if not n.startswith("_")])
        for name in names:
            obj = getattr(module, name)
            if inspect.isclass(obj) or inspect.isfunction(obj):
                out.append((f"{pkg}.{name}", obj))
    return out


def test_there_is_something_to_audit() -> None:
    names = {n for n, _ in public_objects()}
    assert {"lightning_align.Sharpness", "lightning_align.AlignSummary", "lightning_align.measure.hessian_eigs"} <= names


@pytest.mark.parametrize(("name", "obj"), public_objects(), ids=lambda v: v if isinstance(v, str) else "")
def test_public_name_has_docstring_with_example(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    assert doc.strip(), f"{name} has no docstring"
    assert any(marker in doc for marker in ("Example:", "Example::", "Examples:")), f"{name}'s docstring has no example"
