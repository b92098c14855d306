"""Parametrize a module from its saved hyper-parameters: base/delta models built on the meta device.

A module that saves its init arguments (``self.save_hyperparameters()`` in a LightningModule, or any
``hparams`` mapping attribute) can be rebuilt at another width without running real initialisers:
``type(model)(**{**hparams, "width": base_width})`` under ``torch.device("meta")``. Comparing those shapes
with a second width gives every parameter's role, with no change to the model's code. No Lightning import.

Example:
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self, width=32, depth=2):
    ...         super().__init__()
    ...         self.hparams = {"width": width, "depth": depth}
    ...         self.inp, self.out = nn.Linear(4, width), nn.Linear(width, 3)
    ...         self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
    ...     def forward(self, x):
    ...         h = self.inp(x)
    ...         for layer in self.hidden:
    ...             h = h + layer(h)
    ...         return self.out(h)
    >>> p = auto_parametrize(Net(width=128), "mup", base_width=32)
    >>> p.infos["hidden.0.weight"].role, p.infos["hidden.0.weight"].width_mult
    ('hidden', 4.0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_align.parametrize.apply import Parametrized, parametrize
from lightning_align.parametrize.rules import SCHEMES, depth_alpha


def saved_hparams(model: nn.Module, owner: str = "Parametrization") -> dict[str, Any]:
    """The model's saved init arguments (private ``_``-keys such as LightningCLI's ``_class_path`` dropped)."""
    hparams = getattr(model, "hparams", None)
    if not hparams:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no saved hyper-parameters, so it cannot be re-instantiated at "
            "the base width. Call `self.save_hyperparameters()` in its __init__."
        )
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def width_values(
    model: nn.Module, hparams: Mapping[str, Any], width_keys: Sequence[str], base_width: int | None, owner: str = "Parametrization"
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """``(current, base, delta)`` values of the width keys; the base scales every key by one ratio."""
    if not width_keys:
        raise ValueError(f"{owner}: width_keys must name at least one hyper-parameter")
    missing = [k for k in width_keys if k not in hparams]
    if missing:
        raise ValueError(
            f"{owner}: width key(s) {missing} are not hyper-parameters of {type(model).__name__} "
            f"(saved: {sorted(hparams)}). Name the width arguments with `width_keys`."
        )
    widths: dict[str, int] = {}
    for k in width_keys:
        v = hparams[k]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{owner}: width key {k!r} of {type(model).__name__} is {v!r}, not a positive int")
        widths[k] = v
    if base_width is not None and (not isinstance(base_width, int) or isinstance(base_width, bool) or base_width < 1):
        raise ValueError(f"{owner}: base_width must be a positive int or None, got {base_width!r}")
    first = widths[width_keys[0]]
    target = base_width if base_width is not None else first
    base: dict[str, int] = {}
    for k, v in widths.items():
        b = v * target / first
        if b != int(b) or b < 1:
            raise ValueError(
                f"{owner}: base_width={target} for {width_keys[0]!r}={first} gives a non-integer base {k!r}={b}; "
                "choose a base_width that divides the widths evenly."
            )
        base[k] = int(b)
    return widths, base, {k: 2 * v for k, v in base.items()}


def meta_instance(model: nn.Module, kwargs: dict[str, Any], what: str, owner: str = "Parametrization") -> nn.Module:
    """``type(model)(**kwargs)`` on the meta device (on CPU under a forked RNG if meta fails)."""
    cls = type(model)
    try:
        with torch.device("meta"):
            built = cls(**kwargs)
    except Exception as meta_err:  # e.g. an initialiser that needs real data
        try:
            with torch.random.fork_rng(devices=[]):
                built = cls(**kwargs)
        except Exception as err:
            raise ValueError(
                f"{owner}: cannot re-instantiate {cls.__name__} at the {what} width from its saved hyper-parameters "
                f"{kwargs}: {type(err).__name__}: {err}. Its __init__ must accept exactly the saved "
                "hyper-parameters (self.save_hyperparameters())."
            ) from meta_err
    if not any(True for _ in built.parameters()) and hasattr(built, "configure_model"):
        with torch.device("meta"):
            built.configure_model()
    return built


def resolve_branches(
    model: nn.Module, scheme: str, branch_pattern: str | None, owner: str = "Parametrization"
) -> list[str]:
    """Residual branch module names: ``branch_pattern`` matches, else ``model.residual_branches`` (depth schemes)."""
    if branch_pattern is not None:
        try:
            regex = re.compile(branch_pattern)
        except re.error as err:
            raise ValueError(f"{owner}: branch_pattern {branch_pattern!r} is not a valid regex: {err}") from err
        names = [n for n, _ in model.named_modules() if n]
        hits = [n for n in names if regex.fullmatch(n)]
        if not hits:
            raise ValueError(
                f"{owner}: branch_pattern {branch_pattern!r} matches no module of {type(model).__name__}; "
                f"module names look like {names[:8]}"
            )
        return [b for b in hits if not any(b.startswith(o + ".") for o in hits)]
    if depth_alpha(scheme) is None:
        return []
    declared = getattr(model, "residual_branches", None)
    if not declared:
        raise ValueError(
            f"{owner}(scheme={scheme!r}) needs the residual branches of {type(model).__name__}: pass "
            "`branch_pattern` (a regex of module names) or give the module a `residual_branches` property."
        )
    return list(declared)


def depth_multiplier(
    model: nn.Module, hparams: Mapping[str, Any], scheme: str, depth_keys: Sequence[str], base_depth: int | None,
    owner: str = "Parametrization",
) -> float:
    """``L / L0`` for depth schemes (1 otherwise), ``L`` read from the first depth key."""
    if depth_alpha(scheme) is None:
        return 1.0
    key = depth_keys[0] if depth_keys else None
    if key is None or key not in hparams:
        raise ValueError(
            f"{owner}(scheme={scheme!r}): depth key {key!r} is not a hyper-parameter of {type(model).__name__} "
            f"(saved: {sorted(hparams)}); name it with `depth_keys`."
        )
    depth = hparams[key]
    if not isinstance(depth, int) or isinstance(depth, bool) or depth < 1:
        raise ValueError(f"{owner}: depth key {key!r} is {depth!r}, not a positive int")
    return depth / (base_depth if base_depth is not None else depth)


def auto_parametrize(
    model: nn.Module,
    scheme: str = "mup",
    base_width: int | None = None,
    base_depth: int | None = None,
    width_keys: Sequence[str] = ("width",),
    depth_keys: Sequence[str] = ("depth",),
    branch_pattern: str | None = None,
    *,
    owner: str = "Parametrization",
    **options: Any,
) -> Parametrized:
    """Apply ``scheme`` to ``model`` using base/delta models rebuilt from its saved hyper-parameters.

    Args:
        model: a module with ``hparams`` (its init arguments).
        scheme, base_width, base_depth, width_keys, depth_keys, branch_pattern: see
            :class:`~lightning_align.callbacks.parametrization.Parametrization`.
        owner: named in error messages.
        **options: forwarded to :func:`~lightning_align.parametrize.apply.parametrize` (``init``,
            ``readout_zero_init``, ``input_mult``, ``output_mult``, ``decoupled_wd``, ``role_overrides``,
            ``rescale_init``).

    Returns:
        The :class:`Parametrized` record (with ``widths`` and ``base_widths`` filled in).

    Example::

        model = MLP(width=1024)  # saves its init arguments in hparams
        p = auto_parametrize(model, scheme="mup", base_width=64)
    """
    if scheme not in SCHEMES:
        raise ValueError(f"{owner}: unknown scheme {scheme!r}; choose one of {list(SCHEMES)}")
    hparams = saved_hparams(model, owner)
    widths, base_widths, delta_widths = width_values(model, hparams, list(width_keys), base_width, owner)
    branches = resolve_branches(model, scheme, branch_pattern, owner)
    depth_mult = depth_multiplier(model, hparams, scheme, list(depth_keys), base_depth, owner)
    base = meta_instance(model, {**hparams, **base_widths}, "base", owner)
    delta = meta_instance(model, {**hparams, **delta_widths}, "delta", owner)
    p = parametrize(model, base, delta, scheme, depth_mult=depth_mult, branches=branches, **options)
    p.widths, p.base_widths = widths, base_widths
    return p
