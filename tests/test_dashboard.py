"""The TensorBoard dashboard: a quickstart-like CLI run's event files hold the custom-scalars layout (whose
regexes match the logged tags), every family's tags, histograms, a figure and the hyper-parameters, in one
run directory with no stray sub-run; the layout is written once per writer."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2

from helpers import fit
from lightning_align.callbacks.rank import RankMonitor
from lightning_align.cli import build_cli
from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.dashboard import custom_scalars_layout, write_dashboard

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
FAMILIES = ["align", "sharpness", "ntk", "elr", "rank", "coord"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, EventAccumulator]:
    root = tmp_path_factory.mktemp("quickstart")
    args = [
        "fit",
        "--config",
        str(QUICKSTART),
        "--trainer.max_steps=5",  # EffectiveLR measures at step 5
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--model.init_args.width=32",
        f"--trainer.logger.init_args.save_dir={root}",
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        cli = build_cli(args)
    log_dir = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(log_dir), size_guidance={"histograms": 0, "scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return log_dir, events


def _layout(events: EventAccumulator) -> layout_pb2.Layout:
    (event,) = events.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout()
    layout.ParseFromString(event.tensor_proto.string_val[0])
    return layout


def test_event_files_hold_layout_tags_histograms_figure(quickstart_run: tuple[Path, EventAccumulator]) -> None:
    _, events = quickstart_run
    scalars = set(events.Tags()["scalars"])
    layout = _layout(events)
    assert [c.title for c in layout.category] == FAMILIES
    charts = {(c.title, ch.title): list(ch.multiline.tag) for c in layout.category for ch in c.chart}
    for family in FAMILIES:
        logged = {t for t in scalars if t.startswith(family + "/")}
        assert logged, f"no {family} tag logged"
        shown = {t for (fam, _), regexes in charts.items() if fam == family for r in regexes for t in scalars if re.search(r, t)}
        assert shown, f"no chart of the {family} category matches a logged tag"

    def matched(chart: tuple[str, str]) -> set[str]:
        return {t for r in charts[chart] for t in scalars if re.search(r, t)}

    empty = [chart for chart in charts if not matched(chart)]
    assert not empty, f"charts with nothing logged: {empty}"  # only what the attached callbacks log
    assert matched(("sharpness", "lr·λmax vs threshold (LR units)")) == {"sharpness/lr_x_max_eig", "sharpness/threshold"}
    assert matched(("align", "cos(-dL/df, δf) per layer")) == {t for t in scalars if t.startswith("align/cos/")}
    assert matched(("ntk", "NTK max eigenvalue")) == {"ntk/max_eig"}
    assert "ntk/distance_from_init" in matched(("ntk", "NTK distance from init and velocity"))
    elr_layers = matched(("elr", "effective LR per layer"))
    assert elr_layers == {f"elr/layers.{i}" for i in range(3)} | {"elr/readout"}
    assert matched(("rank", "weight stable rank per layer")) == {t for t in scalars if t.startswith("rank/weight_stable/")}
    assert matched(("coord", "activation RMS per layer")) == {t for t in scalars if t.startswith("coord/rms/")}
    histograms = set(events.Tags()["histograms"])
    assert {"rank/singular_values/layers.0", "ntk/eigenvalues"} <= histograms
    images = set(events.Tags()["images"])
    assert {"align/heatmap_cos", "align/heatmap_speed", "rank/heatmap_repr_effective"} <= images  # >= 2 measurements
    assert "elr/heatmap" not in images  # one measurement in 5 steps: no heatmap
    heatmap = events.Images("align/heatmap_cos")[-1]
    assert heatmap.width > 300 and heatmap.height > 200  # a real picture (PNG decoded by TensorBoard)


def test_hyperparameters_in_the_run_itself_without_sub_run(quickstart_run: tuple[Path, EventAccumulator]) -> None:
    log_dir, events = quickstart_run
    assert [p.name for p in log_dir.iterdir() if p.is_dir()] == [], "a stray sub-run directory appeared"
    assert len(list(log_dir.glob("events.out.tfevents.*"))) == 1
    hparams_tags = events.PluginTagToContent("hparams")
    assert "_hparams_/experiment" in hparams_tags
    from tensorboard.plugins.hparams import plugin_data_pb2

    data = plugin_data_pb2.HParamsPluginData.FromString(hparams_tags["_hparams_/experiment"])
    assert {h.name for h in data.experiment.hparam_infos} >= {"width", "lr"}
    assert not [h.name for h in data.experiment.hparam_infos if h.name.startswith("_")]  # no _instantiator
    assert {m.name.tag for m in data.experiment.metric_infos} >= {"sharpness/lr_x_max_eig", "elr/spread", "ntk/max_eig"}
    assert "hp_metric" not in set(events.Tags()["scalars"])


def test_layout_written_once_per_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logger = TensorBoardLogger(tmp_path, name="run", default_hp_metric=False)
    calls: list[dict] = []
    monkeypatch.setattr(logger.experiment, "add_custom_scalars", lambda layout: calls.append(layout))
    for _ in range(2):  # two callbacks, two fits: one layout
        fit([RankMonitor(every_n_steps=2, probe_size=16), RankMonitor(every_n_steps=3, probe_size=16, name="second")], max_steps=2, logger=logger)
    assert calls == [custom_scalars_layout([RankMonitor()])]


def test_no_tensorboard_no_layout(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import CSVLogger

    _, trainer = fit([RankMonitor(every_n_steps=2, probe_size=16)], max_steps=1, logger=CSVLogger(tmp_path))
    assert write_dashboard(trainer, [RankMonitor()]) == 0


@pytest.mark.parametrize(
    ("tag", "is_layer"),
    [("elr/layers.0", True), ("elr/blocks.3.attn.qkv", True), ("elr/spread", False), ("elr/critical_lr", False),
     ("elr/si/layers.0", False), ("elr/warmup_factor", False), ("elr/lr_over_critical", False), ("elr/spreadsheet", True)],
)
def test_elr_per_layer_regex(tag: str, is_layer: bool) -> None:
    (regex,) = EffectiveLR.charts["effective LR per layer"][1]
    assert bool(re.search(regex, tag)) is is_layer
