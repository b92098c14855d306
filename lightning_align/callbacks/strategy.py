"""Refuse strategies that shard parameters: every callback here reads (and some write) full parameters.

Measurement callbacks take Hessian-vector products, Jacobians and weight norms of the whole, unsharded
parameters; the control callbacks split and rescale optimizer parameter groups by parameter identity.
Under FSDP, DeepSpeed (ZeRO) or tensor/model parallelism a rank holds only a flat shard of each
parameter, so these computations would be wrong (a shard's norm is not the weight's norm) or would run
collectives on some ranks only. Rather than measure something else silently, :func:`check_strategy`
raises a clear error at fit start, before the first optimizer step.

Data parallelism (``ddp``, ``ddp_spawn``, ``ddp_fork``; every rank holds the full model) and single-device
strategies are supported.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_strategy", "sharding_strategy_classes"]

#: Lightning strategy classes that shard parameters over ranks (looked up by name: some need optional
#: packages, and older Lightning versions lack ``ModelParallelStrategy``).
_SHARDING_NAMES = ("FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy", "XLAFSDPStrategy")


def sharding_strategy_classes() -> tuple[type, ...]:
    """The parameter-sharding strategy classes that exist in the installed Lightning (and Lightning Fabric)."""
    found: list[type] = []
    for module_name in ("lightning.pytorch.strategies", "lightning.fabric.strategies"):
        try:
            module = __import__(module_name, fromlist=list(_SHARDING_NAMES))
        except Exception:  # pragma: no cover - an incomplete install: nothing to detect there
            continue
        for name in _SHARDING_NAMES:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


def check_strategy(trainer: Any, owner: str) -> None:
    """Raise if ``trainer.strategy`` shards parameters (FSDP, DeepSpeed, model parallel, XLA FSDP).

    Args:
        trainer: a ``lightning.pytorch.Trainer`` (anything with a ``strategy`` attribute).
        owner: the callback's name, for the message (e.g. ``"Sharpness"``).

    Raises:
        ValueError: naming ``owner``, the strategy class and what to do instead.

    Example::

        def on_fit_start(self, trainer, pl_module):
            check_strategy(trainer, type(self).__name__)
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    if isinstance(strategy, sharding_strategy_classes()):
        raise ValueError(
            f"{owner}: the {type(strategy).__name__} strategy shards parameters over ranks, but {owner} reads and "
            "changes full, unsharded parameters (per-layer norms, Hessian/Jacobian products, optimizer parameter "
            f"groups), so it would compute wrong values or hang. Train with strategy='ddp' or 'ddp_spawn' "
            f"(every rank holds the whole model), or remove {owner} from the callbacks for this run."
        )
