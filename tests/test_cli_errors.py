"""The CLI points the way: a description naming the suite and the quickstart, only concrete choices, and
config errors as one short message naming the key (with near misses) or the callback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_align.cli import main

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


def _error(capsys: pytest.CaptureFixture[str], args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 3, err  # short: no usage dump, no traceback
    return err


def test_misspelled_flag_names_it_and_the_nearest_keys(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.max_stpes=3"])
    assert "'--trainer.max_stpes'" in err and "did you mean '--trainer.max_steps'" in err


def test_misspelled_yaml_key_names_it_and_the_nearest_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stpes: 3\n")
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--config", str(bad)])
    assert "'trainer.max_stpes'" in err and "'trainer.max_steps'" in err


def test_a_callback_argument_error_is_one_line_naming_the_callback(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.callbacks+=lightning_align.RankMonitor", "--trainer.callbacks.every_n_steps=0"])
    assert "RankMonitor(every_n_steps=0): every_n_steps must be an int >= 1; got 0" in err
    assert err.count("every_n_steps must be") == 1


@pytest.mark.parametrize(
    "callback, argument, message",
    [("Sharpness", "max_overhead: fast", "Sharpness(max_overhead='fast'): max_overhead must be a finite float in (0, 1] "
      "(a share of training time: 0.01 = 1%), 'auto' or None; got 'fast'"),
     ("RankMonitor", "layers: 5", "RankMonitor(layers=5): layers must be a non-empty list of names or regular expressions or None; got 5")],
)
def test_a_value_of_none_of_an_arguments_types_names_them(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, callback: str, argument: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"trainer:\n  callbacks:\n    - class_path: lightning_align.{callback}\n      init_args: {{{argument}}}\n")
    assert message in _error(capsys, ["fit", "--config", QUICKSTART, "--config", str(bad)])


def test_a_renamed_callback_argument_names_the_new_one(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(
        "trainer:\n  callbacks:\n    - class_path: lightning_align.FeatureAlignment\n"
        "      init_args: {every_n_steps: 50, modules: [readout]}\n"
    )
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--config", str(old)])
    assert "FeatureAlignment: unknown argument 'modules'; it is now called 'layers'" in err
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.callbacks+=lightning_align.NTKSpectrum", "--trainer.callbacks.method=lanczos"])
    assert "NTKSpectrum: unknown argument 'method'; it is now called 'solver'" in err


def test_a_misspelled_callback_argument_gets_the_nearest_ones(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.callbacks+=lightning_align.EffectiveLR", "--trainer.callbacks.figure_evry=2"])
    assert "EffectiveLR: unknown argument 'figure_evry'; did you mean 'figure_every'?" in err


def test_no_config_points_to_the_quickstart(capsys: pytest.CaptureFixture[str]) -> None:
    assert "configs/quickstart.yaml" in _error(capsys, ["fit"])


def test_help_names_the_suite_and_offers_only_concrete_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "feature learning" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "lightning_align.Sharpness" in out
    assert "MeasurementCallback" not in out and "MemoryLogger" not in out


def test_two_unnamed_instances_of_a_callback_get_the_remedy(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["fit", "--config", QUICKSTART, "--trainer.callbacks+=lightning_align.RankMonitor"])
    assert "two RankMonitor callbacks" in err and "name:" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainer.callbacks+=Sharpnes"], "trainer.callbacks: no class 'Sharpnes'; did you mean lightning_align.Sharpness?"),
        (["--trainer.callbacks+=lightning_align.RankMonitr"],
         "trainer.callbacks: no class 'lightning_align.RankMonitr'; did you mean lightning_align.RankMonitor?"),
        (["--model=MLPP"], "model: no class 'MLPP'; did you mean example_modules.MLP"),
        (["--data=DigitDataModule"], "data: no class 'DigitDataModule'; did you mean example_modules.DigitsDataModule"),
    ],
)
def test_a_misspelt_class_gets_the_nearest_importable_one(capsys: pytest.CaptureFixture[str], args: list[str], message: str) -> None:
    assert message in _error(capsys, ["fit", "--config", QUICKSTART, *args])


@pytest.mark.parametrize(
    "callback, argument, message",
    [
        ("RankMonitor", "every_n_steps: 2.5", "RankMonitor(every_n_steps=2.5): every_n_steps must be an int >= 1; got 2.5"),
        ("RankMonitor", "repr_tol: .nan", "RankMonitor(repr_tol=nan): repr_tol must be a finite float > 0; got nan"),
        ("RankMonitor", "histograms: maybe", "RankMonitor(histograms='maybe'): histograms must be True or False; got 'maybe'"),
        ("CoordCheck", "layers: []", "CoordCheck(layers=[]): layers must be a non-empty list of names or regular expressions or None"),
        ("Parametrization", "width_keys: width",
         "Parametrization(width_keys='width'): width_keys must be a non-empty list of non-empty strings or None; got 'width' "
         "(a single string; a list is written ['width'])"),
        ("NTKSpectrum", "solver: eigh", "NTKSpectrum(solver='eigh'): solver must be one of 'auto', 'exact', 'lanczos'; got 'eigh'"),
    ],
)
def test_a_config_value_gets_the_words_python_gets(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, callback: str, argument: str, message: str
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"trainer:\n  callbacks:\n    - class_path: lightning_align.{callback}\n      init_args: {{{argument}}}\n")
    assert message in _error(capsys, ["fit", "--config", QUICKSTART, "--config", str(bad)])
