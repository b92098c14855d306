"""The TensorBoard dashboard of the suite: a custom-scalars layout and the HParams summary.

TensorBoard's *Custom Scalars* tab groups several tags on one chart (every layer's alignment on one
plot, ``lr·λmax`` next to its stability threshold, ...). Its layout is a summary in the event files that
``SummaryWriter.add_custom_scalars`` may write **once per writer**; :func:`write_dashboard` writes it
once per run (a marker on the writer object), only with the families whose callbacks are attached,
on rank zero. The tab stays empty until the event files hold both the layout and scalars matching it
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

from lightning_align.headlines import HEADLINES

if TYPE_CHECKING:
    import lightning.pytorch as pl

_MARKER = "_lightning_align_dashboard"
# Per-layer ELR tags are elr/<layer>; everything else under elr/ has a fixed name or a sub-family.
_ELR_NOT_LAYER = r"(spread|log_spread_std|critical_lr|lr_over_critical|skipped_step|warmup_factor|si/.*)$"

#: Chart title -> (chart type, tag regexes), per family. Regexes follow Python's ``re.search``.
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "align": {
        "cos(-dL/df, δf) per layer": ["Multiline", [r"^align/cos/"]],
        "feature speed per layer": ["Multiline", [r"^align/speed/"]],
        "predicted feature speed per layer": ["Multiline", [r"^align/predicted_speed/"]],
        "controlled LR per layer": ["Multiline", [r"^align/control_lr/"]],
    },
    "sharpness": {
        "lr·λmax vs threshold": ["Multiline", [r"^sharpness/lr_x_max_eig$", r"^sharpness/threshold$"]],
        "top Hessian eigenvalues": ["Multiline", [r"^sharpness/(max_eig|min_eig|eig_\d+|preconditioned_max_eig)$"]],
        "Hessian trace": ["Multiline", [r"^sharpness/trace$"]],
    },
    "ntk": {
        "NTK max eigenvalue": ["Multiline", [r"^ntk/max_eig$"]],
        "NTK distance from init and velocity": ["Multiline", [r"^ntk/(distance_from_init|velocity)$"]],
        "NTK condition number and effective rank": ["Multiline", [r"^ntk/(cond|effective_rank)$"]],
        "kernel-target alignment": ["Multiline", [r"^ntk/alignment$"]],
    },
    "elr": {
        "effective LR per layer": ["Multiline", [rf"^elr/(?!{_ELR_NOT_LAYER})"]],
        "ELR spread (max/min)": ["Multiline", [r"^elr/spread$"]],
        "critical LR and lr / critical": ["Multiline", [r"^elr/(critical_lr|lr_over_critical|warmup_factor)$"]],
    },
    "rank": {
        "weight stable rank per layer": ["Multiline", [r"^rank/weight_stable/"]],
        "representation effective rank per layer": ["Multiline", [r"^rank/repr_effective/"]],
        "singular values near one per layer": ["Multiline", [r"^rank/weight_near_one/"]],
    },
    "coord": {
        "activation RMS per layer": ["Multiline", [r"^coord/rms/"]],
        "relative change from init per layer": ["Multiline", [r"^coord/delta/"]],
    },
}


def custom_scalars_layout(families: Iterable[str] | None = None) -> dict[str, dict[str, list[Any]]]:
    """The custom-scalars layout for ``families`` (all of the suite's when ``None``), in the suite's order.

    Example:
        >>> layout = custom_scalars_layout(["sharpness"])
        >>> layout["sharpness"]["lr·λmax vs threshold"]
        ['Multiline', ['^sharpness/lr_x_max_eig$', '^sharpness/threshold$']]
        >>> list(custom_scalars_layout(["rank", "align"]))
        ['align', 'rank']
    """
    wanted = set(LAYOUT) if families is None else set(families)
    return {family: charts for family, charts in LAYOUT.items() if family in wanted}


def hparams_metric_tags(families: Iterable[str]) -> list[str]:
    """Layer-less headline tags of ``families``: the metrics of the HParams tab.

    Example:
        >>> hparams_metric_tags(["elr"])
        ['elr/spread', 'elr/critical_lr', 'elr/lr_over_critical', 'elr/warmup_factor']
    """
    wanted = set(families)
    return [h.pattern for h in HEADLINES if h.family in wanted and h.reduce == "value"]


def write_dashboard(trainer: pl.Trainer, families: Iterable[str]) -> int:
    """Write the layout (and, if Lightning did not, the HParams summary) once to each TensorBoard writer.

    Safe to call from every callback: a marker on the writer makes later calls no-ops; only rank zero
    writes. Returns the number of writers written to now.

    Example::

        write_dashboard(trainer, {"sharpness", "elr"})  # e.g. in on_train_start
    """
    if not trainer.is_global_zero:
        return 0
    families = list(dict.fromkeys(families))
    written = 0
    for logger in trainer.loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        if getattr(writer, _MARKER, False):
            continue
        layout = custom_scalars_layout(families)
        if layout:
            writer.add_custom_scalars(layout)
        if not getattr(logger, "_default_hp_metric", True) and logger.hparams:
            _write_hparams(writer, logger.hparams, hparams_metric_tags(families))
        setattr(writer, _MARKER, True)
        written += 1
    return written


def _write_hparams(writer: Any, hparams: Mapping[str, Any], metric_tags: list[str]) -> None:
    """The HParams plugin summaries, written into the run's own event file (no sub-run)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
    from torch.utils.tensorboard.summary import hparams as hparams_summary

    params = {}
    for k, v in _flatten_dict(_convert_params(dict(hparams))).items():
        params[k] = v if isinstance(v, (bool, int, float, str)) else str(v)
    if not metric_tags:
        return
    exp, ssi, sei = hparams_summary(params, dict.fromkeys(metric_tags, 0.0))
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
