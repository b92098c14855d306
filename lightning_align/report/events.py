"""Read runs back from their TensorBoard event files (and the ``config.yaml``/``hparams.yaml`` next to them).

A *run* is a directory holding ``events.out.tfevents.*`` files (a ``TensorBoardLogger`` ``log_dir``).
Everything the report and the sweep analysis show comes from here: scalars (all of them, no
reservoir sampling), histograms (spectra), the last image of each figure tag, text summaries, and the
config LightningCLI saved. A rerun into the same directory (a new event file starting at an earlier
step) replaces the orphaned data, as TensorBoard does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

EVENTS_GLOB = "events.out.tfevents.*"
#: Losses whose non-finite value means the run diverged.
LOSS_TAGS = ("train/loss", "val/loss", "sharpness/probe_loss")

#: One histogram: ``(left edge, right edge, count)`` per non-empty bucket.
Buckets = list[tuple[float, float, float]]


@dataclass
class Run:
    """One run's logged data.

    Attributes:
        path: the run directory.
        name: short name (relative to the directory the runs were found under).
        scalars: ``tag -> [(step, value), ...]`` sorted by step (the last value logged at a step wins).
        histograms: ``tag -> [(step, buckets), ...]`` sorted by step.
        images: ``tag -> (step, PNG bytes)`` of the last image logged under the tag.
        texts: ``tag -> (step, markdown text)`` of the last text logged under the tag.
        config: the parsed ``config.yaml`` (``{}`` if absent); ``config_text`` is its text.
        hparams: the parsed ``hparams.yaml`` (``{}`` if absent).
    """

    path: Path
    name: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    histograms: dict[str, list[tuple[int, Buckets]]] = field(default_factory=dict)
    images: dict[str, tuple[int, bytes]] = field(default_factory=dict)
    texts: dict[str, tuple[int, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def families(self) -> list[str]:
        """Tag families (``sharpness``, ``align``, ...) with at least one scalar, in first-seen order."""
        return list(dict.fromkeys(t.split("/")[0] for t in self.scalars if "/" in t))

    @property
    def last_step(self) -> int:
        """The largest step of any scalar (``-1`` with none)."""
        return max((s[-1][0] for s in self.scalars.values() if s), default=-1)

    def diverged_at(self) -> int | None:
        """The first step at which a loss (:data:`LOSS_TAGS`) was logged non-finite (``None``: never).

        Example:
            >>> Run(Path("."), "r", scalars={"train/loss": [(0, 2.3), (5, float("nan"))]}).diverged_at()
            5
        """
        return min((s for t in LOSS_TAGS for s, v in self.scalars.get(t, []) if not math.isfinite(v)), default=None)

    def metrics_by_step(self, tags: Iterable[str] | None = None) -> dict[int, dict[str, float]]:
        """``{step: {tag: value}}`` over ``tags`` (all scalars when ``None``), steps ascending.

        Example:
            >>> r = Run(Path("."), "r", scalars={"a/x": [(0, 1.0), (5, 2.0)], "a/y": [(5, 3.0)]})
            >>> r.metrics_by_step()
            {0: {'a/x': 1.0}, 5: {'a/x': 2.0, 'a/y': 3.0}}
        """
        out: dict[int, dict[str, float]] = {}
        for t in self.scalars if tags is None else tags:
            for step, v in self.scalars.get(t, []):
                out.setdefault(step, {})[t] = v
        return dict(sorted(out.items()))

    def flat_config(self) -> dict[str, Any]:
        """The config flattened to LightningCLI's dotted keys (lists of callbacks: see :func:`flatten`)."""
        return flatten(self.config)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config; list items of ``class_path`` dicts are keyed by their class name.

    Example:
        >>> flatten({"model": {"init_args": {"width": 8}}, "trainer": {"callbacks": [
        ...     {"class_path": "lightning_align.Parametrization", "init_args": {"scheme": "mup"}}]}})
        {'model.init_args.width': 8, 'trainer.callbacks.Parametrization.class_path': 'lightning_align.Parametrization', 'trainer.callbacks.Parametrization.init_args.scheme': 'mup'}
    """
    out: dict[str, Any] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and obj and all(isinstance(i, Mapping) and "class_path" in i for i in obj):
        for item in obj:
            out.update(flatten(item, f"{prefix}{str(item['class_path']).rsplit('.', 1)[-1]}."))
    else:
        out[prefix[:-1]] = obj
    return out


def natural_key(text: str) -> list[Any]:
    """Sort key with numbers compared as numbers (``layers.2`` before ``layers.10``).

    Example:
        >>> sorted(["layers.10", "layers.2", "readout"], key=natural_key)
        ['layers.2', 'layers.10', 'readout']
    """
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def find_run_dirs(root: Path) -> list[Path]:
    """Directories at or under ``root`` holding event files, in natural order."""
    root = Path(root)
    dirs = {p.parent for p in root.rglob(EVENTS_GLOB)} if root.is_dir() else set()
    return sorted(dirs, key=lambda p: natural_key(str(p)))


def _buckets(hist: Any) -> Buckets:
    """``(left, right, count)`` of the non-empty buckets of a ``HistogramValue`` (edges clipped to min/max)."""
    out: Buckets = []
    left = hist.min
    for limit, count in zip(hist.bucket_limit, hist.bucket):
        right = min(limit, hist.max)
        if count > 0:
            out.append((max(left, hist.min), max(right, hist.min), float(count)))
        left = limit
    return out


def _read_yaml(path: Path) -> tuple[dict[str, Any], str]:
    if not path.is_file():
        return {}, ""
    text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = None
    return (data if isinstance(data, dict) else {}), text


def load_run(path: Path, name: str | None = None) -> Run:
    """Read every event file of the run directory ``path`` (scalars, histograms, last images, texts, config)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    path = Path(path)
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "images": 1, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    run = Run(path=path, name=name or path.name)
    for t in tags.get("scalars", []):
        by_step = {int(e.step): float(e.value) for e in acc.Scalars(t)}
        run.scalars[t] = sorted(by_step.items())
    for t in tags.get("histograms", []):
        run.histograms[t] = sorted((int(e.step), _buckets(e.histogram_value)) for e in acc.Histograms(t))
    for t in tags.get("images", []):
        events = acc.Images(t)
        if events:
            run.images[t] = (int(events[-1].step), bytes(events[-1].encoded_image_string))
    for t in tags.get("tensors", []):
        if acc.SummaryMetadata(t).plugin_data.plugin_name != "text":
            continue
        events = acc.Tensors(t)
        if events:
            value = tensor_util.make_ndarray(events[-1].tensor_proto).flatten()
            text = "\n".join(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value)
            run.texts[t.removesuffix("/text_summary")] = (int(events[-1].step), text)
    run.config, run.config_text = _read_yaml(path / "config.yaml")
    run.hparams, _ = _read_yaml(path / "hparams.yaml")
    return run


def load_runs(paths: Iterable[Path | str]) -> list[Run]:
    """Every run found at or under each of ``paths``, named relative to the path given (or by its own name).

    Raises:
        FileNotFoundError: a path holds no event file.
    """
    runs: list[Run] = []
    for p in map(Path, paths):
        dirs = find_run_dirs(p)
        if not dirs:
            raise FileNotFoundError(f"no TensorBoard event files ({EVENTS_GLOB}) at or under {p}")
        for d in dirs:
            rel = d.relative_to(p).as_posix() if d != p else ""
            here = p.resolve()
            own = f"{here.parent.name}/{here.name}" if re.fullmatch(r"version_\d+", here.name) else here.name
            runs.append(load_run(d, rel or own))
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # the same run name under different roots: use the full paths
        for r in runs:
            r.name = str(r.path)
    return runs


def spectrum_values(buckets: Buckets) -> list[float]:
    """Approximate values of a histogram (geometric bucket centres, repeated by count), largest first.

    TensorBoard histograms keep bucket counts only; with the default buckets (ratio 1.1) the values are
    right to about 5 %, enough to draw a spectrum.

    Example:
        >>> [round(v, 2) for v in spectrum_values([(1.0, 1.0, 1.0), (4.0, 9.0, 2.0)])]
        [6.0, 6.0, 1.0]
    """
    out: list[float] = []
    for left, right, count in buckets:
        centre = math.sqrt(left * right) if left > 0 and right > 0 else (left + right) / 2
        out += [centre] * round(count)
    return sorted(out, reverse=True)
