"""Every shipped LightningCLI config runs (a few steps), and the CLI saves its config next to the logs."""

from pathlib import Path

import pytest

from lightning_align.cli import build_cli

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def fast_args(config: Path, root: Path) -> list[str]:
    return [
        "fit",
        "--config",
        str(config),
        "--trainer.max_steps=3",
        "--trainer.max_epochs=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={root}",
    ]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_runs(config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(fast_args(config, tmp_path))
    assert cli.trainer.global_step == 3
    assert (Path(cli.trainer.log_dir) / "config.yaml").is_file()


# docs/design.md: tags every run of the suite must produce (``{layer}`` = a module name).
REQUIRED_TAGS = [
    "sharpness/max_eig",
    "sharpness/lr_x_max_eig",
    "ntk/max_eig",
    "ntk/trace",
    "ntk/cond",
    "align/cos/{layer}",
    "align/speed/{layer}",
    "elr/{layer}",
    "elr/spread",
    "elr/critical_lr",
    "rank/weight_stable/{layer}",
    "rank/repr_effective/{layer}",
    "coord/rms/{layer}",
]


def test_quickstart_logs_every_required_tag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    quickstart = CONFIGS[[c.stem for c in CONFIGS].index("quickstart")]
    cli = build_cli(fast_args(quickstart, tmp_path) + ["--trainer.max_steps=5"])  # EffectiveLR measures at step 5
    events = EventAccumulator(cli.trainer.log_dir, size_guidance={"histograms": 0, "scalars": 0, "images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    for required in REQUIRED_TAGS:
        wanted = required.format(layer="layers.1")
        assert wanted in scalars, f"{wanted} missing from the quickstart's TensorBoard events"
    histograms = set(events.Tags()["histograms"])
    assert {"rank/singular_values/layers.0", "ntk/eigenvalues"} <= histograms
    assert events.Tags()["images"], "at least one figure"


def test_short_names_and_callback_from_command_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cli = build_cli(
        [
            "fit",
            "--model=MLP",
            "--model.width=16",
            "--data=DigitsDataModule",
            "--trainer.callbacks+=RankMonitor",
            "--trainer.callbacks.every_n_steps=1",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
        ]
    )
    assert "rank/weight_stable/layers.0" in cli.trainer.callback_metrics


def test_bad_callback_argument_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model=MLP", "--data=DigitsDataModule", "--trainer.callbacks+=RankMonitor",
                   "--trainer.callbacks.every_n_steps=zero"])
    assert "every_n_steps" in capsys.readouterr().err
