"""Which training strategies each callback can run under, decided at fit start.

Every rank holds the whole model under data parallelism (``ddp``, ``ddp_spawn``, ``ddp_fork``) and on one
device: every callback runs. Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` with
FSDP2's ``fully_shard`` (``DTensor`` parameters, each rank a ``Shard(0)`` slice) is supported by the callbacks
that declare ``sharded_support = True``: they compute sums over parameters from local slices
(:mod:`lightning_align.measure.sharded`), gather one weight at a time where a whole matrix is needed, and take
Hessian-vector products by finite differences of the model's own backward. Callbacks that cannot (they
differentiate through ``torch.func`` over the whole parameter set) refuse with their ``sharded_refusal``
reason. FSDP1 (``FSDPStrategy``: flat parameters), DeepSpeed (ZeRO) and XLA FSDP are refused by every
callback: a rank's flat shard of several parameters has no per-layer meaning.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_strategy", "flat_sharding_strategy_classes", "model_parallel_strategy_classes"]

#: Strategies whose ranks hold flat shards of several parameters (looked up by name: some need optional
#: packages).
_FLAT_SHARDING = ("FSDPStrategy", "DeepSpeedStrategy", "XLAFSDPStrategy")
_MODEL_PARALLEL = ("ModelParallelStrategy",)


def _classes(names: tuple[str, ...]) -> tuple[type, ...]:
    found: list[type] = []
    for module_name in ("lightning.pytorch.strategies", "lightning.fabric.strategies"):
        try:
            module = __import__(module_name, fromlist=list(names))
        except Exception:  # pragma: no cover - an incomplete install: nothing to detect there
            continue
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type) and cls not in found:
                found.append(cls)
    return tuple(found)


def flat_sharding_strategy_classes() -> tuple[type, ...]:
    """FSDP1, DeepSpeed and XLA FSDP strategy classes of the installed Lightning (refused by every callback)."""
    return _classes(_FLAT_SHARDING)


def model_parallel_strategy_classes() -> tuple[type, ...]:
    """``ModelParallelStrategy`` classes of the installed Lightning (FSDP2 ``DTensor`` parameters)."""
    return _classes(_MODEL_PARALLEL)


def check_strategy(trainer: Any, owner: str, sharded_refusal: str | None = None) -> None:
    """Raise if ``owner`` cannot run under ``trainer.strategy``.

    Args:
        trainer: a ``lightning.pytorch.Trainer`` (anything with a ``strategy`` attribute).
        owner: the callback's name, for the message (e.g. ``"Sharpness"``).
        sharded_refusal: why ``owner`` cannot run on FSDP2-sharded parameters (``ModelParallelStrategy``);
            ``None`` when it can.

    Raises:
        ValueError: naming ``owner``, the strategy class and what to do instead.

    Example::

        def on_fit_start(self, trainer, pl_module):
            check_strategy(trainer, type(self).__name__, self.sharded_refusal)
    """
    strategy = getattr(trainer, "strategy", None)
    if strategy is None:
        return
    name = type(strategy).__name__
    if isinstance(strategy, flat_sharding_strategy_classes()):
        raise ValueError(
            f"{owner}: the {name} strategy flattens and shards several parameters together, so a rank holds no "
            f"layer's weights and {owner}'s per-layer values would be wrong. Use ModelParallelStrategy with FSDP2's "
            "fully_shard (per-parameter sharding) or strategy='ddp', or remove the callback for this run."
        )
    if sharded_refusal is not None and isinstance(strategy, model_parallel_strategy_classes()):
        raise ValueError(
            f"{owner} cannot run under {name} (FSDP2-sharded parameters): {sharded_refusal} Train with "
            f"strategy='ddp' (every rank holds the whole model), or remove {owner} from the callbacks for this run."
        )
