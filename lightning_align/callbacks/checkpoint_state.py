"""A measurement callback's checkpoint state: the settings saved with it, and the checks made when it is loaded.

A callback's saved references (NTKSpectrum's kernel at the first measurement, CoordCheck's ``h_0``, ...) were measured
with the settings of their time: the probe's size and seed, ``bn_mode``, ``dropout``, the layers. Those settings (the
callback's :attr:`~lightning_align.MeasurementCallback.state_settings`) are saved with the state. On resume, when one
has changed, the callback drops the references it invalidates (:meth:`~lightning_align.MeasurementCallback.rereference`),
says so in one info line and measures at the resume step to take new ones (or refuses, when they cannot be re-taken).
A value the callback cannot have saved (a string step, a step after the checkpoint's, a non-finite or misshaped
tensor, a multiplier out of its range) is refused when it is loaded, naming the callback, the key and the value.
A checkpoint saved without settings (by an older version) is taken to have today's.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_align.logging import callback_name
from lightning_align.schedules import OverheadBudget

if TYPE_CHECKING:
    import lightning.pytorch as pl

SETTINGS_KEY = "settings"
#: The settings every probe measurement depends on.
PROBE_SETTINGS = ("probe_size", "probe_seed", "bn_mode", "dropout")
_BUDGET_TIMES = ("spent", "last_cost", "excluded", "elapsed")


def _plain(value: Any) -> Any:
    """A setting as plain Python (lists for tuples), so that it compares equal after a save and a load."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        finite = "" if not value.is_floating_point() or bool(torch.isfinite(value).all()) else ", not all finite"
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}{finite}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def refusal(callback: Any, key: str, value: Any, expected: str) -> ValueError:
    """The error for a saved ``key`` whose ``value`` this callback cannot have written."""
    return ValueError(
        f"{callback_name(callback)}: the checkpoint's state for this callback has {key} = {_shown(value)}; expected "
        f"{expected}. It was not saved by this callback (a damaged or edited checkpoint): resume from another checkpoint, "
        f"or delete checkpoint['callbacks'][{callback.state_key!r}] to start this callback afresh."
    )


def read_int(callback: Any, state: Mapping[str, Any], key: str, default: int, low: int = 0) -> int:
    """``state[key]`` (``default`` when absent): an int ``>= low``."""
    value = state.get(key, default)
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise refusal(callback, key, value, f"an int >= {low}")
    return int(value)


def read_float(
    callback: Any, state: Mapping[str, Any], key: str, default: float | None, low: float = 0.0, high: float = math.inf, nan: bool = False
) -> float:
    """``state[key]`` (``default`` when absent): a float in ``[low, high]``, or NaN when ``nan``."""
    value = state.get(key, default)
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not ok or not ((nan and math.isnan(value)) or low <= value <= high):
        raise refusal(callback, key, value, f"a number in [{low:g}, {high:g}]" + (" or NaN" if nan else ""))
    return float(value)


def read_bool(callback: Any, state: Mapping[str, Any], key: str, default: bool) -> bool:
    """``state[key]`` (``default`` when absent): a bool."""
    value = state.get(key, default)
    if not isinstance(value, bool):
        raise refusal(callback, key, value, "True or False")
    return value


def read_tensor(callback: Any, value: Any, key: str, ndim: int | None = None, square: bool = False) -> torch.Tensor | None:
    """A saved tensor (or ``None``): floating point, finite, with ``ndim`` dimensions (at least 1), square if asked."""
    if value is None:
        return None
    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else ()
    expected = f"a finite floating-point tensor of {ndim or 'one or more'} dimension(s)" + (", square" if square else "")
    ok = isinstance(value, torch.Tensor) and value.is_floating_point() and len(shape) >= 1
    ok = ok and (ndim is None or len(shape) == ndim) and (not square or len(set(shape)) == 1)
    if not ok or not bool(torch.isfinite(value).all()):
        raise refusal(callback, key, value, expected)
    return value.detach()


def saved_settings(callback: Any) -> dict[str, Any]:
    """The settings the callback's saved state depends on, as plain Python."""
    return {name: _plain(getattr(callback, name, None)) for name in callback.state_settings}


def changed_settings(callback: Any, saved: Any) -> dict[str, tuple[Any, Any]]:
    """``{name: (saved, now)}`` for each saved setting that differs now (none when nothing was saved)."""
    if saved is None:
        return {}
    if not isinstance(saved, Mapping):
        raise refusal(callback, SETTINGS_KEY, saved, "a dict of the callback's settings")
    now = saved_settings(callback)
    return {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k]}


def describe(changed: Mapping[str, tuple[Any, Any]]) -> str:
    """``probe_seed changed since the checkpoint (0 -> 3)``, several joined with "and"."""
    parts = [f"{k} ({old!r} -> {new!r})" for k, (old, new) in changed.items()]
    if len(parts) == 1:
        name, rest = parts[0].split(" ", 1)
        return f"{name} changed since the checkpoint {rest}"
    return f"{', '.join(parts[:-1])} and {parts[-1]} changed since the checkpoint"


def dump(callback: Any) -> dict[str, Any]:
    """The callback's whole state: the last measured step, the overhead budget, its own state and its settings."""
    budget = {"overhead_budget": callback.budget.state_dict()} if callback.budget is not None else {}
    return {"last_step": callback.last_step, **budget, **callback.extra_state(), SETTINGS_KEY: saved_settings(callback)}


def load(callback: Any, state: dict[str, Any]) -> bool:
    """Check and restore what :func:`dump` saved; return whether references must be re-taken at the resume step."""
    callback.changed_settings = changed_settings(callback, state.pop(SETTINGS_KEY, None))
    callback.last_step = read_int(callback, state, "last_step", -1, low=-1)
    state.pop("last_step", None)
    saved, running = state.pop("overhead_budget", None), callback.budget
    callback.budget = OverheadBudget(callback.overhead_share) if callback.overhead_share is not None else None
    callback._budget_decision = (-1, True)
    if saved is not None:
        saved = _checked_budget(callback, saved)
    if callback.budget is not None and saved is not None:
        callback.budget.load_state_dict(saved)
    if callback.budget is not None and running is not None:  # restored after on_fit_start (ModelParallelStrategy)
        callback.budget.started = running.started
    callback.load_extra_state(state)
    if not callback.changed_settings:
        return False
    what = callback.rereference(callback.changed_settings)
    if what is not None:
        rank_zero_info(f"{callback_name(callback)}: {describe(callback.changed_settings)}: {what}.")
    return what is not None


def _checked_budget(callback: Any, saved: Any) -> dict[str, float]:
    if not isinstance(saved, Mapping):
        raise refusal(callback, "overhead_budget", saved, "the overhead budget's dict")
    named = {f"overhead_budget.{k}": v for k, v in saved.items()}
    out = {k: read_float(callback, named, f"overhead_budget.{k}", None) for k in _BUDGET_TIMES}
    out["postponed"] = read_int(callback, named, "overhead_budget.postponed", 0)
    return out


def check_at_train_start(callback: Any, trainer: pl.Trainer) -> None:
    """On resume: a callback without saved state says it starts afresh; a saved step after the checkpoint's is refused."""
    if not trainer.ckpt_path:
        return
    if not callback._state_loaded:
        rank_zero_warn(
            f"{callback_name(callback)}: the checkpoint {trainer.ckpt_path} has no saved state for this callback (saved "
            "without it, or under another `name`): it starts afresh, so distance-from-init quantities are measured from "
            "the resume point."
        )
    elif callback.last_step > trainer.global_step:
        raise refusal(callback, "last_step", callback.last_step, f"a step <= {trainer.global_step}, the checkpoint's")
