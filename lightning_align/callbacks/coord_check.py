"""CoordCheck: the coordinate check during training (activation sizes and feature movement per layer)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_align.arguments import Count, Name, Patterns, Seed
from lightning_align.headlines import Headline
from lightning_align.callbacks.base import BatchNormMode, MeasurementCallback
from lightning_align.callbacks.checkpoint_state import PROBE_SETTINGS, read_tensor, refusal
from lightning_align.logging import tag
from lightning_align.measure.census import take_census
from lightning_align.measure.modules import captured_outputs, layers_on_probe, select_modules
from lightning_align.measure.sequence import PositionMasks, counted
from lightning_align.schedules import MaxOverhead, ScheduleName


class CoordCheck(MeasurementCallback):
    """Per-layer activation RMS and relative feature movement ``‖h_t − h_0‖ / ‖h_0‖`` on the probe batch.

    The in-training version of microsoft/mup's coordinate check: under μP (and its depth extensions)
    both stay Θ(1) as the model is made wider or deeper, so comparing runs at several widths shows
    whether a parametrization is right. ``coord/delta`` is the feature-learning ratio: ≈ 0 in the
    kernel (NTK) regime, Θ(1) under μP; it growing with width means the learning rate will not transfer.

    Logged per layer (``<layer>`` = qualified module name):

    - ``coord/rms/<layer>``: ``sqrt(mean h_t²)`` of the layer's output on the probe batch;
    - ``coord/l1/<layer>``: ``mean |h_t|`` (mup's statistic);
    - ``coord/delta/<layer>``: ``‖h_t − h_0‖ / ‖h_0‖`` with ``h_0`` the output at the first measurement
      (kept in the callback's state, so it survives a resume).

    On a padded Hugging Face batch the statistics are over the positions that count (``attention_mask``; an
    encoder-decoder's decoder: ``decoder_attention_mask`` or the ``labels`` other than ``-100``), padding left out:
    see "Padded positions" in ``docs/callbacks.md``.

    Cost: one forward pass on the probe batch every ``every_n_steps``; ``h_0`` is kept in memory
    (probe size × layer width floats per layer).

    Under ``ModelParallelStrategy`` (FSDP2, ``DTensor`` parameters) the probe forward is the model's own
    (FSDP gathers one module's parameters at a time), every rank runs it on the whole probe, so every rank
    logs the same values; the gathered parameters are freed right after (FSDP keeps the root module's after a
    forward without backward).

    Args:
        every_n_steps: measure every this many optimizer steps (and at step 0). The default (250) is sparse
            enough to leave on (measured shares: README, "Speed and overhead").
        layers: module names or regexes whose outputs are recorded (default: every Linear/Conv/Embedding, and every
            module holding a stack of expert matrices, that runs on the probe batch; see "Which layers" in
            ``docs/callbacks.md``).
        schedule, max_overhead, probe_size, probe_seed, bn_mode, dropout, name: shared by every callback; see "Arguments every
            callback shares" in ``docs/callbacks.md``.

    Example::

        trainer = Trainer(callbacks=[Parametrization("mup", base_width=64), CoordCheck(every_n_steps=50)])

    YAML::

        trainer:
          callbacks:
            - class_path: lightning_align.CoordCheck
              init_args: {every_n_steps: 50}
    """

    family = "coord"
    headlines = (
        Headline("coord", "max activation RMS", r"coord/rms/.+", "max"),
        Headline("coord", "max change from init", r"coord/delta/.+", "max"),
    )
    charts = {
        "activation RMS per layer": ["Multiline", [r"^coord/rms/"]],
        "relative change from init per layer": ["Multiline", [r"^coord/delta/"]],
    }
    heatmaps = {"coord/delta/": "relative change from init ‖h−h₀‖/‖h₀‖"}
    sharded_refusal = None  # activations only: the model's own forward, under FSDP2 too
    state_settings = (*PROBE_SETTINGS, "layers")  # h_0's

    def __init__(
        self,
        every_n_steps: Count = 250,
        layers: Patterns | None = None,
        *,
        schedule: ScheduleName = "linear",
        max_overhead: MaxOverhead = "auto",
        probe_size: Count = 256,
        probe_seed: Seed = 0,
        bn_mode: BatchNormMode = "train",
        dropout: bool = False,
        name: Name | None = None,
    ) -> None:
        super().__init__(
            every_n_steps, schedule=schedule, max_overhead=max_overhead,
            probe_size=probe_size, probe_seed=probe_seed, bn_mode=bn_mode, dropout=dropout,
            name=name,
        )
        self.layers = layers
        self._modules: dict[str, torch.nn.Module] = {}
        self._h0: dict[str, torch.Tensor] = {}

    def validate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._modules = select_modules(pl_module, self.layers, "weights", owner="CoordCheck(layers=...)")

    def prepare(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        model = self.probe_outputs_model(pl_module)
        with torch.no_grad():
            census, _ = take_census(pl_module, lambda: model(batch))
        self._modules = layers_on_probe(pl_module, census, self.layers, self._modules, "weights", owner="CoordCheck")

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> Mapping[str, Any]:
        model = self.probe_outputs_model(pl_module)
        positions = PositionMasks(pl_module, batch, owner="CoordCheck")
        with torch.no_grad(), captured_outputs(self._modules) as features, positions.watching(self._modules):
            model(batch)
        metrics: dict[str, torch.Tensor] = {}
        for name in self._modules:
            if name not in features:
                raise RuntimeError(
                    f"CoordCheck(layers=...): layer {name!r} did not run in the forward pass on the probe batch; remove it from `layers`"
                )
            h = counted(features[name].detach().float(), positions.of(name, features[name]))  # padding left out
            h0 = self._h0.get(name)
            if h0 is not None and h0.shape != h.shape:  # e.g. a checkpoint saved without its settings
                rank_zero_warn(
                    f"CoordCheck: the output of {name!r} has shape {tuple(h.shape)}, but h_0 (first measurement or "
                    f"checkpoint) has {tuple(h0.shape)}: the probe or the layer changed, so its coord/delta is measured "
                    f"from step {trainer.global_step}."
                )
                h0 = None
            if h0 is None:
                h0 = self._h0[name] = h.clone()
            h0 = h0.to(h.device)
            stats = torch.stack([h.pow(2).mean(), h.abs().mean(), (h - h0).pow(2).sum(), h0.pow(2).sum()])
            stats = self.all_reduce_mean(trainer, stats)
            metrics[tag("coord", "rms", name)] = stats[0].sqrt()
            metrics[tag("coord", "l1", name)] = stats[1]
            metrics[tag("coord", "delta", name)] = (stats[2] / stats[3]).sqrt() if stats[3] > 0 else stats[2] * 0
        return metrics

    def extra_state(self) -> dict[str, Any]:
        return {"h0": {k: v.detach().cpu() for k, v in self._h0.items()}}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        h0 = state.get("h0", {})
        if not isinstance(h0, Mapping) or not all(isinstance(k, str) for k in h0):
            raise refusal(self, "h0", h0, "a dict of layer name -> output tensor")
        self._h0 = {k: read_tensor(self, v, f"h0[{k!r}]") for k, v in h0.items()}

    def rereference(self, changed: Mapping[str, tuple[Any, Any]]) -> str | None:
        self._h0 = {}
        return "coord/delta is measured from the resume point"
