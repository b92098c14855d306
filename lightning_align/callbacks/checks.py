"""Fit-start checks of every measurement callback: models and training steps a probe cannot measure without
changing training or giving a wrong number are refused here, naming the callback, the culprit and the remedy.

- :func:`check_model` (before the callback's own ``validate``): lazy modules whose weights do not exist yet
  (``nn.LazyLinear`` with no dummy forward: the first probe would create them under another random state) and
  complex trainable parameters (Hessians, Jacobians and norms here are written for real ones);
- :func:`check_optimizers` (after ``validate``): several optimizers under manual optimization. A callback that
  measures the update of one optimizer step (it copies the weights in ``before_step``) is refused: each step
  moves one optimizer's parameters only. The others measure the probe as usual, and one info line says that
  Lightning's ``global_step`` (the step ``every_n_steps`` counts and the values are logged at) counts every
  ``optimizer.step()``;
- :func:`skipped_step`: at ``on_before_optimizer_step``, whether the step will change nothing because
  ``training_step`` returned ``None`` (automatic optimization: no gradient, the optimizer skips every parameter).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.nn.parameter import is_lazy


def _names(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_model(owner: str, pl_module: pl.LightningModule) -> None:
    """Refuse lazy modules not yet materialised and complex trainable parameters (see the module docstring)."""
    model = type(pl_module).__name__
    tensors = [*pl_module.named_parameters(remove_duplicate=False), *pl_module.named_buffers(remove_duplicate=False)]
    lazy = sorted({name.rpartition(".")[0] or name for name, t in tensors if is_lazy(t)})
    if lazy:
        raise ValueError(
            f"{owner}: {model} has lazy modules whose weights do not exist yet ({_names(lazy)}); the first probe would "
            "create them under another random state than training's, so training would change. Create them before fit "
            "with one forward on a dummy batch at the end of `__init__` or in `setup()` (e.g. `self(torch.zeros(2, n_inputs))`)."
        )
    complex_params = [name for name, p in pl_module.named_parameters() if p.requires_grad and p.is_complex()]
    if complex_params:
        raise ValueError(
            f"{owner}: {model} has complex trainable parameters ({_names(complex_params)}); lightning_align measures "
            "real parameters only (Hessians, Jacobians and norms of complex ones are not defined alike). Hold each as two "
            "real parameters (`torch.complex(re, im)` in forward), freeze it (requires_grad=False), or remove the callback."
        )


def measures_updates(callback: Any) -> bool:
    """The callback measures the update of one optimizer step (it copies the weights in ``before_step``)."""
    from lightning_align.callbacks.base import MeasurementCallback

    return type(callback).before_step is not MeasurementCallback.before_step


def check_optimizers(callback: Any, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Several optimizers under manual optimization: refused for callbacks measuring a step's update, one info
    line (from the first measurement callback) about what the steps count otherwise."""
    n = len(trainer.optimizers)
    if pl_module.automatic_optimization or n < 2:
        return
    owner, model = type(callback).__name__, type(pl_module).__name__
    if measures_updates(callback):
        raise ValueError(
            f"{owner}: {model} steps {n} optimizers in its training_step (manual optimization), and {owner} measures "
            "the update of one optimizer step: each step moves only that optimizer's parameters, so the values would "
            f"describe part of the model as if it were all of it. Remove {owner} for this module, or train with one "
            "optimizer (its param groups can give each part its own learning rate)."
        )
    from lightning_align.callbacks.base import MeasurementCallback

    first = next(cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback))
    if first is callback:
        rank_zero_info(
            f"lightning_align: {model} has {n} optimizers under manual optimization. Lightning's global_step, which "
            "`every_n_steps` counts and measurements are logged at, advances at every optimizer.step(): "
            f"{n} steps per training_step when each optimizer steps once."
        )


def skipped_step(pl_module: nn.Module) -> bool:
    """Automatic optimization and no trainable parameter has a gradient: ``training_step`` returned ``None``,
    Lightning ran no backward and the optimizer will change nothing."""
    if not getattr(pl_module, "automatic_optimization", False):
        return False
    trainable = False
    for p in pl_module.parameters():
        if p.requires_grad:
            if p.grad is not None:
                return False
            trainable = True
    return trainable
