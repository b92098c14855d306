"""Parametrize a module from its saved hyper-parameters: base/delta models built on the meta device.

A module that saves its init arguments (``self.save_hyperparameters()`` in a LightningModule, or any
``hparams`` mapping attribute) can be rebuilt at another width without running real initialisers:
``type(model)(**{**hparams, "width": base_width})`` under ``torch.device("meta")``. Comparing those shapes
with a second width gives every parameter's role, with no change to the model's code. No Lightning import.

Width and depth keys are hyper-parameter names or dotted paths into them: ``config.n_embd`` reads
``hparams["config"].n_embd`` (an attribute, e.g. of a Hugging Face ``PretrainedConfig``, or a mapping
key). The base and second-width models get a deep copy of that hyper-parameter with the path changed. A
config whose ``head_dim`` was derived (``hidden_size // num_attention_heads``, e.g. ``LlamaConfig``) keeps
it derived when ``hidden_size`` changes, unless ``head_dim`` is itself a width key.

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

import copy
import re
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_align.parametrize.apply import Parametrized, parametrize
from lightning_align.parametrize.ecosystem import standard_branches
from lightning_align.parametrize.rules import SCHEMES, depth_alpha

_MISSING = object()
_NO_WIDTH_HINT = (
    "A network built from a config object saved as a hyper-parameter names its width by path, e.g. "
    "width_keys=['config.n_embd'] (GPT-2) or ['config.hidden_size', 'config.intermediate_size'] (Llama). A network "
    "with no width argument (e.g. torchvision's resnet18()) cannot be rebuilt at another width: wrap one that "
    "takes it, e.g. a LightningModule whose __init__ takes `width`, builds the network from it and calls "
    "self.save_hyperparameters()."
)


def saved_hparams(model: nn.Module, owner: str = "Parametrization") -> dict[str, Any]:
    """The model's saved init arguments (private ``_``-keys such as LightningCLI's ``_class_path`` dropped)."""
    hparams = getattr(model, "hparams", None)
    if not hparams:
        raise ValueError(
            f"{owner}: {type(model).__name__} has no saved hyper-parameters, so it cannot be re-instantiated at "
            "the base width. Build it in a LightningModule whose __init__ takes the width (e.g. `width`, or a "
            "config object) and calls `self.save_hyperparameters()`; for a config, name the width by path, e.g. "
            "width_keys=['config.n_embd']."
        )
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def width_values(
    model: nn.Module, hparams: Mapping[str, Any], width_keys: Sequence[str], base_width: int | None, owner: str = "Parametrization"
) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """``(current, base, delta)`` values of the width keys; the base scales every key by one ratio."""
    if not width_keys:
        raise ValueError(f"{owner}: width_keys must name at least one hyper-parameter")
    missing = [k for k in width_keys if k not in hparams and k.split(".", 1)[0] not in hparams]
    if missing:
        raise ValueError(
            f"{owner}: width key(s) {missing} are not hyper-parameters of {type(model).__name__} "
            f"(saved: {sorted(hparams)}). Name the width arguments with `width_keys`. {_NO_WIDTH_HINT}"
        )
    widths: dict[str, int] = {}
    for k in width_keys:
        v = hparam_value(hparams, k, "width", owner)
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


def hparam_value(hparams: Mapping[str, Any], key: str, what: str = "width", owner: str = "Parametrization") -> Any:
    """Value of a hyper-parameter name, or of a dotted path into one (``config.n_embd``), else a clear error.

    Example:
        >>> hparam_value({"config": {"n_embd": 64}}, "config.n_embd")
        64
    """
    if key in hparams:
        return hparams[key]
    head, *rest = key.split(".")
    if head not in hparams:
        raise ValueError(f"{owner}: {what} key {key!r} is not a hyper-parameter (saved: {sorted(hparams)})")
    obj, path = hparams[head], head
    for part in rest:
        nxt = _get(obj, part)
        if nxt is _MISSING:
            kind = "key" if isinstance(obj, Mapping) else "attribute"
            raise ValueError(
                f"{owner}: {what} key {key!r} does not exist: {path} ({type(obj).__name__}) has no {kind} {part!r}"
            )
        obj, path = nxt, f"{path}.{part}"
    return obj


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name, _MISSING)
    return getattr(obj, name, _MISSING)


def _set(obj: Any, name: str, value: Any) -> None:
    if isinstance(obj, MutableMapping):
        obj[name] = value
    else:
        setattr(obj, name, value)


def with_values(hparams: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """Init arguments with some keys or dotted paths changed; a changed path's hyper-parameter is deep-copied.

    A config whose ``head_dim`` equalled ``hidden_size // num_attention_heads`` keeps that relation when
    those change (``LlamaConfig`` stores ``head_dim`` at construction), unless ``head_dim`` is in ``values``.

    Example:
        >>> cfg = {"n_embd": 64, "n_layer": 2}
        >>> new = with_values({"config": cfg, "lr": 0.1}, {"config.n_embd": 16})
        >>> new["config"], cfg["n_embd"]
        ({'n_embd': 16, 'n_layer': 2}, 64)
    """
    kwargs = dict(hparams)
    copies: dict[str, Any] = {}
    parents: dict[str, tuple[Any, Any]] = {}  # path -> (original object, its copy)
    for key, value in values.items():
        if key in hparams:
            kwargs[key] = value
            continue
        head, *rest = key.split(".")
        if head not in copies:
            copies[head] = kwargs[head] = copy.deepcopy(hparams[head])
        original, obj, path = hparams[head], copies[head], head
        for part in rest[:-1]:
            original, obj, path = _get(original, part), _get(obj, part), f"{path}.{part}"
        _set(obj, rest[-1], value)
        parents[path] = (original, obj)
    for path, (original, obj) in parents.items():
        if f"{path}.head_dim" in values:
            continue
        hd, hidden, heads = (_get(original, k) for k in ("head_dim", "hidden_size", "num_attention_heads"))
        if all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hd, hidden, heads)) and hd * heads == hidden:
            new_hidden, new_heads = _get(obj, "hidden_size"), _get(obj, "num_attention_heads")
            if (new_hidden, new_heads) != (hidden, heads) and new_hidden % new_heads == 0:
                _set(obj, "head_dim", new_hidden // new_heads)
    return kwargs


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
) -> dict[str, list[str]]:
    """Residual branches ``{module whose output is scaled: other modules in the branch}``.

    ``branch_pattern`` matches, else ``model.residual_branches``, else (depth schemes) the branches of
    standard Hugging Face / timm / GPT-style blocks
    (:func:`~lightning_align.parametrize.ecosystem.standard_branches`).
    """
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
        return {b: [] for b in hits if not any(b.startswith(o + ".") for o in hits)}
    if depth_alpha(scheme) is None:
        return {}
    declared = getattr(model, "residual_branches", None)
    if declared:
        return {b: [] for b in declared}
    standard = standard_branches(model)
    if not standard:
        raise ValueError(
            f"{owner}(scheme={scheme!r}) needs the residual branches of {type(model).__name__}: pass "
            "`branch_pattern` (a regex of module names) or give the module a `residual_branches` property "
            "(standard Hugging Face / timm blocks with `attn`/`self_attn` and `mlp` children are found alone)."
        )
    return {b: [m for m in members if m != b] for b, members in standard.items()}


def depth_multiplier(
    model: nn.Module, hparams: Mapping[str, Any], scheme: str, depth_keys: Sequence[str], base_depth: int | None,
    owner: str = "Parametrization",
) -> float:
    """``L / L0`` for depth schemes (1 otherwise), ``L`` read from the first depth key."""
    if depth_alpha(scheme) is None:
        return 1.0
    key = depth_keys[0] if depth_keys else None
    if key is None or (key not in hparams and key.split(".", 1)[0] not in hparams):
        raise ValueError(
            f"{owner}(scheme={scheme!r}): depth key {key!r} is not a hyper-parameter of {type(model).__name__} "
            f"(saved: {sorted(hparams)}); name it with `depth_keys` (a dotted path such as 'config.n_layer' "
            "reads a saved config)."
        )
    depth = hparam_value(hparams, key, "depth", owner)
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
            ``rescale_init``, ``unscalable_attention``, ``warn``).

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
    base = meta_instance(model, with_values(hparams, base_widths), "base", owner)
    delta = meta_instance(model, with_values(hparams, delta_widths), "delta", owner)
    p = parametrize(
        model, base, delta, scheme, depth_mult=depth_mult, branches=list(branches), branch_members=branches, **options
    )
    p.widths, p.base_widths = widths, base_widths
    return p
