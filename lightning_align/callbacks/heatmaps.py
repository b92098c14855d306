"""The end-of-fit layer × step heatmaps of a measurement callback (its :attr:`heatmaps` prefixes).

Per-layer values are kept while a TensorBoard logger is attached and drawn once at the end of fit, one image per
prefix under ``<family>/heatmap_<what>``; drawing or writing one that fails warns and training's end goes on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from lightning_align.figures import layer_heatmap
from lightning_align.logging import callback_name, log_figure, tensorboard_writers

if TYPE_CHECKING:
    import lightning.pytorch as pl


def record_layers(callback: Any, trainer: pl.Trainer, values: Mapping[str, float]) -> None:
    """Keep the per-layer values of ``callback.heatmaps`` at this step (only with a TensorBoard logger)."""
    if not callback.heatmaps or not tensorboard_writers(trainer, callback_name(callback)):
        return
    for prefix in callback.heatmaps:
        for name, value in values.items():
            layer = callback.heatmap_layer(name, prefix)
            if layer is not None:
                callback._layer_values.setdefault(prefix, {}).setdefault(layer, {})[trainer.global_step] = value


def log_heatmaps(callback: Any, trainer: pl.Trainer) -> None:
    """One layer × step heatmap per prefix measured at two steps or more."""
    for prefix, per_layer in callback._layer_values.items():
        steps = sorted({s for values in per_layer.values() for s in values})
        if len(steps) < 2:
            continue
        names = list(per_layer)
        matrix = [[per_layer[n].get(s, math.nan) for s in steps] for n in names]
        label = callback.heatmaps[prefix]
        what = prefix.rstrip("/").split("/")[-1]
        name = f"{callback.family}/heatmap" + ("" if what == callback.family else f"_{what}")
        title = f"{label}, per layer and step"
        # drawn right away, inside log_figure (which turns an error into a warning)
        log_figure(trainer, name, lambda: layer_heatmap(names, steps, matrix, label=label, title=title), owner=callback_name(callback))
