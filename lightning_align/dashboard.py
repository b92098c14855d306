"""The TensorBoard dashboard of the suite: a custom-scalars layout and the HParams summary.

TensorBoard's *Custom Scalars* tab groups several tags on one chart (every layer's alignment on one
plot, ``lr·λmax`` next to its stability threshold, ...). Its layout is a summary in the event files that
``SummaryWriter.add_custom_scalars`` may write **once per writer**; :func:`write_dashboard` writes it
once per run (a marker on the writer object), from the charts the attached callbacks declare (only
what they will log), on rank zero. The tab stays empty until the event files hold both the layout and scalars matching it
(refresh TensorBoard after the first measurements).

With ``TensorBoardLogger(default_hp_metric=False)`` (the CLI's default) Lightning writes the
hyper-parameters to ``hparams.yaml`` only; :func:`write_dashboard` then adds the HParams summary to
the run's own event file (no sub-run, unlike ``SummaryWriter.add_hparams``) with the headline tags
(``sharpness/lr_x_max_eig``, ``elr/spread``, ...) as its metrics, so runs can be compared in the HParams tab.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_align.logging import guarded_write

if TYPE_CHECKING:
    import lightning.pytorch as pl

_MARKER = "_lightning_align_dashboard"


def custom_scalars_layout(callbacks: Iterable[Any]) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout of the attached ``callbacks``: one group per family, each callback's own charts
    (:meth:`~lightning_align.MeasurementCallback.dashboard_charts`), in the order the callbacks come.

    Example:
        >>> from lightning_align import CoordCheck, Sharpness
        >>> layout = custom_scalars_layout([Sharpness(), CoordCheck()])
        >>> list(layout), list(layout["sharpness"])
        (['sharpness', 'coord'], ['lr·λmax vs threshold (LR units)', 'top Hessian eigenvalues'])
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    for cb in callbacks:
        charts = cb.dashboard_charts()
        if charts:
            layout.setdefault(cb.family, {}).update(charts)
    return layout


def hparams_metric_tags(callbacks: Iterable[Any]) -> list[str]:
    """Layer-less headline tags of the attached ``callbacks``: the metrics of the HParams tab.

    Example:
        >>> from lightning_align import EffectiveLR
        >>> hparams_metric_tags([EffectiveLR()])
        ['elr/spread', 'elr/critical_lr', 'elr/lr_over_critical']
    """
    return list(dict.fromkeys(h.pattern for cb in callbacks for h in cb.headlines if h.reduce == "value"))


def write_dashboard(trainer: pl.Trainer, callbacks: Iterable[Any], owner: str | None = None) -> int:
    """Write the layout (and, if Lightning did not, the HParams summary) once to each TensorBoard writer.

    Safe to call from every callback: a marker on the writer makes later calls no-ops; only rank zero
    writes. A write that fails warns once (naming ``owner``, the callback writing) and is not tried again.
    Returns the number of writers written to now.

    Example::

        write_dashboard(trainer, [cb for cb in trainer.callbacks if isinstance(cb, MeasurementCallback)])
    """
    if not trainer.is_global_zero:
        return 0
    callbacks = list(callbacks)
    written = 0
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = None
        with guarded_write(trainer, owner, "dashboard", "custom scalars layout", "TensorBoardLogger"):
            writer = logger.experiment
        if writer is None or getattr(writer, _MARKER, False):
            continue
        setattr(writer, _MARKER, True)
        with guarded_write(trainer, owner, "dashboard", "custom scalars layout"):
            layout = custom_scalars_layout(callbacks)
            if layout:
                writer.add_custom_scalars(layout)
        if not getattr(logger, "_default_hp_metric", True) and logger.hparams:
            with guarded_write(trainer, owner, "dashboard", "HParams summary"):
                _write_hparams(writer, logger.hparams, hparams_metric_tags(callbacks))
        written += 1
    return written


def _write_hparams(writer: Any, hparams: Mapping[str, Any], metric_tags: list[str]) -> None:
    """The HParams plugin summaries, written into the run's own event file (no sub-run)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = {}
    for k, v in _flatten_dict(_convert_params(dict(hparams))).items():
        if str(k).startswith("_"):  # LightningCLI's _instantiator, _class_path: not the model's
            continue
        params[k] = str(v) if isinstance(v, bool) or not isinstance(v, (int, float, str)) else v
    if not metric_tags:
        return
    exp, ssi, sei = hparams_summary(params, dict.fromkeys(metric_tags, 0.0))
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
