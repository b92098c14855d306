"""Probe-time guards of :meth:`MeasurementCallback.probe_context`: what a probe may not change, and how it is kept.

- :func:`untouched`: every module a probe can reach (the LightningModule's, unregistered ones kept in plain
  lists/dicts, and modules held by the datamodule, e.g. torchmetrics ``Metric`` objects) gets its tensors,
  Python attributes, flags and ``.grad`` back, the random streams are forked, and ``self.log``/``self.log_dict``
  are silenced (Lightning's logged results and ``trainer.callback_metrics`` stay as they were);
- :func:`refused_training_steps`: ``optimizer.step()`` and ``manual_backward`` raise inside a probe;
- :func:`uncompiled`: the original ``forward``/``training_step`` of a ``torch.compile``d module;
- :func:`without_input_require_grads`: Hugging Face's gradient-checkpointing input hook off.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from lightning_align.measure.probe import silenced_logging
from lightning_align.measure.state import preserved_state


@contextlib.contextmanager
def untouched(pl_module: nn.Module) -> Iterator[None]:
    """Everything a probe of ``pl_module`` (its ``training_step``, ``probe_loss``, ``forward``) could change is as
    before on exit; see :func:`~lightning_align.measure.state.preserved_state` for what is restored and how far
    it looks. The datamodule's modules count too (a metric kept there and updated in ``training_step``)."""
    trainer = getattr(pl_module, "_trainer", None)
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    with preserved_state(pl_module, also=() if datamodule is None else (datamodule,)), silenced_logging(pl_module):
        yield


@contextlib.contextmanager
def refused_training_steps(pl_module: nn.Module, owner: str) -> Iterator[None]:
    """Inside a probe, ``optimizer.step()`` and ``manual_backward`` raise (before changing anything)."""
    trainer = getattr(pl_module, "_trainer", None)
    optimizers = list(trainer.optimizers) if trainer is not None else []

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError(
            f"{owner}: the probe reached an optimizer step (`optimizer.step()` or `manual_backward`) in "
            f"{type(pl_module).__name__}; it was refused and the weights are unchanged. Under manual optimization "
            "define `probe_loss(self, batch)` returning the loss without backward or step."
        )

    saved = [(opt, opt.__dict__.get("step")) for opt in optimizers]
    saved_backward = pl_module.__dict__.get("manual_backward")
    for opt in optimizers:
        opt.step = refuse
    pl_module.manual_backward = refuse
    try:
        yield
    finally:
        for opt, step in saved:
            if step is None:
                opt.__dict__.pop("step", None)
            else:
                opt.step = step
        if saved_backward is None:
            pl_module.__dict__.pop("manual_backward", None)
        else:
            pl_module.manual_backward = saved_backward


@contextlib.contextmanager
def without_input_require_grads(pl_module: nn.Module) -> Iterator[None]:
    """Hugging Face's gradient-checkpointing hook (``enable_input_require_grads``: ``requires_grad_`` on the
    embedding output) is not needed in eval-mode probes and cannot run under ``torch.func``: off inside, back after."""
    models = [m for m in pl_module.modules() if getattr(m, "_require_grads_hooks", None) and hasattr(m, "enable_input_require_grads")]
    for m in models:
        m.disable_input_require_grads()
    try:
        yield
    finally:
        for m in models:
            m.enable_input_require_grads()


def device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


@contextlib.contextmanager
def uncompiled(pl_module: nn.Module) -> Iterator[None]:
    """Swap in the original ``forward``/``training_step`` of a module compiled by ``torch.compile``."""
    ctx = getattr(pl_module, "_compiler_ctx", None)
    if not ctx:
        yield
        return
    saved = {name: pl_module.__dict__.get(name) for name in ("forward", "training_step")}
    pl_module.forward = ctx["original_forward"]
    pl_module.training_step = ctx["original_training_step"]
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                pl_module.__dict__.pop(name, None)
            else:
                setattr(pl_module, name, value)
