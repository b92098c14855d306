"""Two instances of one measurement callback class need distinct ``name=`` (their checkpoint state is keyed by class
and name), refused with that remedy.

Lightning refuses two stateful callbacks with one ``state_key`` while the ``Trainer`` is built, before any callback
hook runs, in words that do not mention ``name``. Importing this module puts :func:`check_distinct_names` in front of
that check (Lightning's own check still runs after it), and :class:`~lightning_align.callbacks.base.
MeasurementCallback` runs it again at ``setup``, which also covers callbacks appended to ``trainer.callbacks`` later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from lightning.pytorch.callbacks import Callback

from lightning_align.arguments import CallbackArgumentError


def check_distinct_names(callbacks: Iterable[Callback]) -> None:
    """Raise a :class:`~lightning_align.arguments.CallbackArgumentError` (a ``ValueError``) naming ``name=`` when two
    measurement callbacks share a checkpoint key."""
    from lightning_align.callbacks.base import MeasurementCallback

    seen: set[str] = set()
    for callback in callbacks:
        if not isinstance(callback, MeasurementCallback):
            continue
        key = callback.state_key
        if key in seen:
            owner, name = type(callback).__name__, callback.name
            which = "without a name" if name is None else f"named {name!r}"
            raise CallbackArgumentError(
                f"{owner}(name={name!r}): two {owner} callbacks {which} share one checkpoint key ({key!r}), so one's "
                f"state would overwrite the other's; give each a distinct name: {owner}(name='...') in Python, `name:` in "
                "a config's init_args"
            )
        seen.add(key)


def _check_before_lightning() -> None:
    """Run :func:`check_distinct_names` first where the ``Trainer`` checks its callbacks' state keys."""
    try:
        from lightning.pytorch.trainer.connectors import callback_connector
    except ImportError:  # pragma: no cover - another Lightning layout: its own message, and ours at setup
        return
    lightning_check = getattr(callback_connector, "_validate_callbacks_list", None)
    if lightning_check is None or getattr(lightning_check, "_checks_names", False):
        return

    def validate_callbacks_list(callbacks: list[Callback], *args: Any, **kwargs: Any) -> Any:
        check_distinct_names(callbacks)
        return lightning_check(callbacks, *args, **kwargs)

    validate_callbacks_list._checks_names = True  # type: ignore[attr-defined]
    callback_connector._validate_callbacks_list = validate_callbacks_list


_check_before_lightning()
