"""The report page: one self-contained HTML file (figures embedded as base64 PNGs, also saved next to it).

Sections, each present only when the runs logged something for it: the LR-transfer analysis (runs of
a sweep), the runs and what differs between them, the first -> last table of the suite's headline
values (the same headlines and reductions as the end-of-fit table, :mod:`lightning_align.headlines`),
each family's headline curves (runs overlaid), a layer × step heatmap per per-layer family (the families
and labels the callbacks declare, drawn by :func:`lightning_align.figures.layer_heatmap`), spectra,
the figures and text the callbacks logged, and each run's config and hyper-parameters.
"""

from __future__ import annotations

import base64
import html
import inspect
import math
import re
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from lightning_align import headlines as H
from lightning_align.report import figures as F
from lightning_align.report import transfer as T
from lightning_align.report.events import Run, natural_key
from lightning_align.summary import format_value, summary_rows

TRAINING_FAMILIES = ("train", "val", "test")

#: y-axis labels (with units) of headline values; others use their label.
UNITS = {
    "λmax (top Hessian eigenvalue)": "λmax (loss / weight²)",
    "lr·λmax": "lr·λmax (dimensionless)",
    "lr·λmax / threshold": "ratio (1 = stability threshold)",
    "NTK max eigenvalue": "eigenvalue (output² / weight²)",
    "NTK condition number": "λmax / λmin",
    "NTK distance from init": "1 − cos(K_t, K_0)",
    "kernel-target alignment": "alignment (0..1)",
    "min cos over layers": "cos θ (−1..1)",
    "mean feature speed": "‖δf‖ / ‖f‖ per step",
    "ELR spread (max/min)": "max / min ELR",
    "critical LR": "learning rate",
    "lr / critical LR": "ratio",
    "warm-up factor": "factor",
    "min weight stable rank": r"$\|W\|_F^2 / \|W\|_2^2$",
    "min repr. effective rank": "effective rank",
    "max activation RMS": "RMS of layer output",
    "max change from init": "‖h_t − h_0‖ / ‖h_0‖",
    "loss": "loss (nats)",
    "acc": "accuracy (0..1)",
}
HLINES = {"lr·λmax / threshold": 1.0}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;padding:0 16px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:2em}h3{margin-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
figure{display:inline-block;margin:8px;vertical-align:top}img{max-width:100%;border:1px solid #eee}
figcaption{font-size:0.85em;color:#555;max-width:900px}pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:0.85em}
.verdict{font-size:1.1em;background:#eef6ee;border-left:4px solid #4a4;padding:8px 12px;margin:8px 0}
.note{color:#666;font-size:0.9em}details{margin:6px 0}
"""


class Page:
    """Collects HTML parts and figures (each written as a PNG next to the page and embedded)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.parts: list[str] = []
        self.images: list[Path] = []

    def add(self, text: str) -> None:
        self.parts.append(text)

    def figure(self, fig: Figure | None, name: str, caption: str = "") -> None:
        """Embed ``fig`` (PNG saved as ``<out>/<nn>-<name>.png``)."""
        if fig is None:
            return
        self.image(F.png(fig), name, caption)

    def image(self, data: bytes, name: str, caption: str = "") -> None:
        """Embed PNG bytes (also saved next to the page)."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]
        path = self.out / f"{len(self.images) + 1:02d}-{safe}.png"
        path.write_bytes(data)
        self.images.append(path)
        b64 = base64.b64encode(data).decode("ascii")
        cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
        self.add(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{b64}">{cap}</figure>')

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 99) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f'<td{" class=num" if i >= numeric_from else ""}>{html.escape(str(c))}</td>' for i, c in enumerate(r)) + "</tr>"
            for r in rows
        )
        self.add(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")

    def render(self, title: str) -> str:
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                f"<style>{CSS}</style></head><body>" + "\n".join(self.parts) + "</body></html>\n")


# ---------------------------------------------------------------- data helpers


def suite_headlines() -> tuple[H.Headline, ...]:
    """The suite's headlines (looked up at call time: they are gathered from the callback classes)."""
    gather = getattr(H, "suite_headlines", None)
    return tuple(gather() if gather else H.HEADLINES)


def _measurement_tags(run: Run) -> list[str]:
    return [t for t in run.scalars if "/" in t]


def headline_records(run: Run) -> dict:
    """First/last headline values of a run, as the end-of-fit table computes them (one measurement per step)."""
    history = H.HeadlineHistory()
    for step, metrics in run.metrics_by_step(_measurement_tags(run)).items():
        history.add(step, metrics)
    return history.records


def headline_series(run: Run) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """Every headline value of a run over training, keyed by ``(family, label)``."""
    out: dict[tuple[str, str], list[tuple[int, float]]] = {}
    for step, metrics in run.metrics_by_step(_measurement_tags(run)).items():
        for key, v in H.headline_values(metrics).items():
            out.setdefault(key, []).append((step, v))
    return out


def _family_order(families: Sequence[str]) -> list[str]:
    known = list(dict.fromkeys(h.family for h in suite_headlines()))
    return sorted(set(families), key=lambda f: (0 if f in TRAINING_FAMILIES else 1 if f in known else 2,
                                                 known.index(f) if f in known else 0, f))


def suite_heatmaps() -> list[tuple[str, str, Callable[[str], str | None]]]:
    """The per-layer families the suite's callbacks draw as heatmaps: ``(tag prefix, colour-bar label, tag -> layer)``.

    Declared by each callback class (``heatmaps``, ``heatmap_layer``), as for their end-of-fit TensorBoard heatmaps.
    """
    from lightning_align import callbacks

    out = []
    for name in callbacks.__all__:
        cls = getattr(callbacks, name)
        if isinstance(cls, type) and issubclass(cls, callbacks.MeasurementCallback) and cls.heatmaps and not inspect.isabstract(cls):
            probe = object.__new__(cls)  # heatmap_layer reads the tag only
            out += [(prefix, label, partial(probe.heatmap_layer, prefix=prefix)) for prefix, label in cls.heatmaps.items()]
    order = {f: i for i, f in enumerate(dict.fromkeys(h.family for h in suite_headlines()))}
    return sorted(out, key=lambda item: order.get(item[0].split("/")[0], len(order)))


def heatmap_layers(run: Run, layer_of: Callable[[str], str | None]) -> dict[str, str]:
    """``{layer: tag}`` of a run's per-layer tags of one heatmap family, layers in natural order."""
    found = {layer: t for t in run.scalars if (layer := layer_of(t)) is not None and "/" not in layer}
    return dict(sorted(found.items(), key=lambda kv: natural_key(kv[0])))


def varying_config(runs: Sequence[Run]) -> list[str]:
    """Config keys whose values differ between runs (the logger and config path excluded)."""
    flats = [r.flat_config() for r in runs]
    keys = sorted({k for f in flats for k in f}, key=natural_key)
    return [k for k in keys if not re.match(r"^(trainer\.logger|config)(\.|$)", k) and len({repr(f.get(k)) for f in flats}) > 1]


# ---------------------------------------------------------------- sections


def _runs_section(page: Page, runs: Sequence[Run]) -> None:
    page.add("<h2>Runs</h2>")
    keys = varying_config(runs) if len(runs) > 1 else []
    short = [k.split(".init_args.")[-1] if ".init_args." in k else k for k in keys]
    rows = []
    for r in runs:
        flat = r.flat_config()
        losses = T.run_losses(r)
        fams = ", ".join(f for f in _family_order(r.families) if f not in TRAINING_FAMILIES) or "-"
        rows.append([r.name, *(flat.get(k, "") for k in keys), r.last_step,
                     format_value(losses["final"]), format_value(losses["val_final"]) if math.isfinite(losses["val_final"]) else "-", fams])
    page.table(["run", *short, "last step", "final train loss", "final val loss", "measured families"], rows, numeric_from=len(keys) + 1)


def _summary_section(page: Page, runs: Sequence[Run]) -> None:
    records = {r.name: headline_records(r) for r in runs}
    if not any(records.values()):
        return
    page.add("<h2>First → last measurement</h2><p class=note>The end-of-fit table of the suite (same headline values and "
             "reductions over layers), read back from the event files.</p>")
    if len(runs) == 1:
        page.table(["family", "quantity", "first", "last", "steps"], _family_once(summary_rows(next(iter(records.values())))), numeric_from=2)
        return
    keys = list(dict.fromkeys((row[0], row[1]) for rec in records.values() for row in summary_rows(rec)))
    rows = []
    for family, label in keys:
        cells = []
        for r in runs:
            rec = records[r.name].get((family, label))
            cells.append(f"{format_value(rec.first)} → {format_value(rec.last)}" if rec else "-")
        rows.append([family, label, *cells])
    page.table(["family", "quantity", *(r.name for r in runs)], _family_once(rows), numeric_from=2)


def _family_once(rows: Sequence[Sequence[str]]) -> list[list[str]]:
    """The family written once per group, as in the terminal table."""
    return [["" if i and row[0] == rows[i - 1][0] else row[0], *row[1:]] for i, row in enumerate(rows)]


def _curves_section(page: Page, runs: Sequence[Run]) -> None:
    series = {r.name: headline_series(r) for r in runs}
    families = _family_order({fam for s in series.values() for fam, _ in s})
    if not families:
        return
    page.add("<h2>Headline curves</h2>")
    training = [f for f in families if f in TRAINING_FAMILIES]
    groups = ([("training and validation metrics", training)] if training else []) + [
        (f"{f}: headline values over training", [f]) for f in families if f not in TRAINING_FAMILIES]
    for title, fams in groups:
        keys = list(dict.fromkeys((fam, lbl) for fam in fams for s in series.values() for f, lbl in s if f == fam))
        panels = []
        for family, label in keys:
            by_run = {name: s[(family, label)] for name, s in series.items() if (family, label) in s}
            panels.append((f"{family}/{label}" if family in TRAINING_FAMILIES else label, UNITS.get(label, label), by_run))
        fig = F.curves_figure(title, panels, ncols=4 if fams is training else 3)
        for ax, (_, label) in zip(fig.axes, keys):
            if label in HLINES:
                ax.axhline(HLINES[label], color="k", ls="--", lw=1)
        page.figure(fig, f"curves-{'-'.join(fams)}", f"{', '.join(fams)}: " + ", ".join(p[0] for p in panels))


def _heatmap_section(page: Page, runs: Sequence[Run]) -> None:
    from lightning_align.figures import layer_heatmap

    items = [(r, prefix, label, layers) for prefix, label, layer_of in suite_heatmaps() for r in runs
             if len(layers := heatmap_layers(r, layer_of)) > 0]
    if not items:
        return
    page.add("<h2>Per-layer heatmaps</h2><p class=note>Rows: layers (module names, numbered ones in order); "
             "columns: measurements; blank: not measured or not finite.</p>")
    for r, prefix, label, layers in items:
        steps = sorted({s for t in layers.values() for s, _ in r.scalars[t]})
        values = [[dict(r.scalars[t]).get(s, math.nan) for s in steps] for t in layers.values()]
        title = f"{label}, per layer and step" + (f" — {r.name}" if len(runs) > 1 else "")
        fig = layer_heatmap(list(layers), steps, values, label=label, title=title)
        width, height = fig.get_size_inches()
        fig.set_size_inches(max(width, 6.4), max(height, 3.8))  # room for a long colour-bar label
        page.figure(fig, f"heatmap-{prefix}{r.name}", f"{prefix}<layer>, run {r.name}")


def _spectra_section(page: Page, runs: Sequence[Run]) -> None:
    figs: list[tuple[Figure, str, str]] = []
    ntk = {r.name: r for r in runs if "ntk/eigenvalues" in r.histograms}
    if len(ntk) == 1:
        r = next(iter(ntk.values()))
        figs.append((F.spectrum_figure(f"Top NTK eigenvalues over training — {r.name}", "eigenvalue", F.histogram_spectra(r, "ntk/eigenvalues")),
                     "spectrum-ntk", "ntk/eigenvalues at the first, last and evenly spaced measurements"))
    elif ntk:
        last = {name: F.spectrum_values(r.histograms["ntk/eigenvalues"][-1][1]) for name, r in ntk.items()}
        figs.append((F.spectrum_figure("Top NTK eigenvalues at the last measurement", "eigenvalue", last), "spectrum-ntk", "ntk/eigenvalues, last step per run"))
    for r in runs:
        tags = sorted((t for t in r.histograms if t.startswith("rank/singular_values/")), key=natural_key)
        if tags:
            step = r.histograms[tags[0]][-1][0]
            lines = {t.rsplit("/", 1)[-1]: F.spectrum_values(r.histograms[t][-1][1]) for t in tags}
            figs.append((F.spectrum_figure(f"Weight singular values at step {step} — {r.name}", "singular value", lines),
                         f"spectrum-weights-{r.name}", "rank/singular_values/<layer>, last measurement"))
    if figs:
        page.add("<h2>Spectra</h2><p class=note>From TensorBoard histograms (bucket centres: values within about 5 %).</p>")
        for fig, name, caption in figs:
            page.figure(fig, name, caption)


def _logged_section(page: Page, runs: Sequence[Run]) -> None:
    if not any(r.images or r.texts for r in runs):
        return
    page.add("<h2>Figures and tables logged by the callbacks</h2>")
    for r in runs:
        for tag, (step, data) in sorted(r.images.items()):
            if "/heatmap" in tag:  # drawn above from the scalars
                continue
            page.image(data, f"logged-{tag}-{r.name}", f"{tag} at step {step}, run {r.name}")
        for tag, (step, text) in sorted(r.texts.items()):
            page.add(f"<details><summary>{html.escape(tag)} (step {step}, run {html.escape(r.name)})</summary><pre>{html.escape(text)}</pre></details>")


def _config_section(page: Page, runs: Sequence[Run]) -> None:
    page.add("<h2>Config and hyper-parameters</h2>")
    hp_keys = sorted({k for r in runs for k in r.hparams if not k.startswith("_")})
    if hp_keys:
        rows = [[k, *(r.hparams.get(k, "") for r in runs)] for k in hp_keys]
        page.table(["hyper-parameter", *(r.name for r in runs)], rows, numeric_from=1)
    for r in runs:
        body = html.escape(r.config_text) if r.config_text else "(no config.yaml next to the event files)"
        page.add(f"<details{' open' if len(runs) == 1 else ''}><summary>config.yaml — {html.escape(r.name)}</summary><pre>{body}</pre></details>")


def _transfer_section(page: Page, t: T.Transfer) -> None:
    page.add("<h2>Learning-rate transfer</h2>")
    for line in t.verdicts():
        page.add(f"<p class=verdict>{html.escape(line)}</p>")
    axes = t.axes
    page.add(f"<p class=note>LR: <code>{axes.lr}</code>; sizes: {', '.join(f'<code>{s}</code>' for s in axes.sizes) or '-'}; "
             f"groups: {', '.join(f'<code>{g}</code>' for g in axes.groups) or '-'}; "
             f"{'seeds averaged over <code>seed_everything</code>; ' if axes.seed else ''}criterion: {T.CRITERIA[t.criterion]}.</p>")
    rows = []
    for group, by_axis in t.optima.items():
        for axis, opts in by_axis.items():
            for size, o in sorted(opts.items()):
                rows.append([group or "-", axis.rsplit(".", 1)[-1], f"{size:g}", f"{o.lr:.4g}", f"{o.refined:.4g}", format_value(o.loss), "yes" if o.at_edge else ""])
    page.table(["group", "size", "value", "best grid LR", "refined LR", "loss", "at grid edge"], rows, numeric_from=2)
    for axis in axes.sizes or ["(none)"]:
        page.figure(T.loss_vs_lr_figure(t, axis), f"transfer-loss-{axis}", "Loss against LR per size; the verdict uses the criterion named above.")
        if axis == "(none)":
            continue
        page.figure(T.optimum_figure(t, axis), f"transfer-optimum-{axis}", "Refined optimum per size; slope = log2 steps per doubling.")
        page.figure(T.over_training_figure(t, axis, "sharpness/lr_x_max_eig", "lr·λmax (dimensionless)",
                                           "Super consistency: lr·λmax over training across sizes at the transferred LR"),
                    f"transfer-sharpness-{axis}", "sharpness/lr_x_max_eig per size at the LR tuned at the smallest size.")
        page.figure(T.coord_figure(t, axis), f"transfer-coord-{axis}", "coord/* at the last measurement per size, at the transferred LR.")


def build(runs: Sequence[Run], out: Path, criterion: str = "mean", max_detail_runs: int = 6, title: str | None = None) -> tuple[str, list[str]]:
    """The page's HTML for ``runs`` (figures written into ``out``) and the transfer verdict lines (if a sweep)."""
    page = Page(out)
    title = title or ("lightning_align report: " + (runs[0].name if len(runs) == 1 else f"{len(runs)} runs"))
    page.add(f"<h1>{html.escape(title)}</h1>")
    t = T.analyse(runs, criterion)
    verdicts = t.verdicts() if t else []
    if t:
        _transfer_section(page, t)
    _runs_section(page, runs)
    detail = list(runs)
    if len(runs) > max_detail_runs:
        page.add(f"<p class=note>{len(runs)} runs: per-run sections are drawn for none of them (more than {max_detail_runs}); "
                 "pass a few run directories to compare them in detail.</p>")
        detail = []
    if detail:
        _summary_section(page, detail)
        _curves_section(page, detail)
        _heatmap_section(page, detail)
        _spectra_section(page, detail)
        _logged_section(page, detail)
        _config_section(page, detail)
    return page.render(title), verdicts
