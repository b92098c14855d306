"""``lightning-align sweep``: grid points as ordinary fits, resumable, validated up front, with the transfer verdict.

The transfer test runs the command alone on ``configs/sweep_mup_mlp.yaml`` (example MLP, Adam, digits) over a
quick grid: scheme mup/sp × width 64/256 × 5 learning rates (×4 apart), 60 steps. Checked by hand over seeds
0, 1, 2 (criterion: mean training loss over the run), the optimum moves by +0.05/+0.13/+0.09 log2 steps per
width doubling under μP and by -0.66/-0.49/-0.58 under SP; the test asserts what that supports with margin:
SP's optimum moves to smaller LRs by at least 0.3 log2 steps per doubling, μP's by at most 0.3 either way.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_align import sweep
from lightning_align.report import load_runs
from lightning_align.report.transfer import analyse

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweep_mup_mlp.yaml"
GRID = [
    "--grid", "trainer.callbacks.init_args.scheme=mup,sp",
    "--grid", "model.init_args.width=64,256",
    "--grid", "model.init_args.lr=logspace(2^-11,2^-3,5)",
]
# Passed through to every point's fit: no validation and no Sharpness (its Lanczos passes dominate a 60-step fit).
CALLBACKS = ('[{"class_path": "lightning_align.CoordCheck", "init_args": {"every_n_steps": 30, "probe_size": 128}}, '
             '{"class_path": "lightning_align.Parametrization", "init_args": {"scheme": "mup", "base_width": 64, "verbose": false}}]')
FIT_ARGS = ["--trainer.max_steps=60", "--trainer.limit_val_batches=0", f"--trainer.callbacks={CALLBACKS}"]


def run_sweep(out: Path) -> subprocess.CompletedProcess[str]:
    """The sweep command, as a user types it (two worker processes, each importing once)."""
    cmd = [sys.executable, "-m", "lightning_align.cli", "sweep", "--config", str(CONFIG), *GRID, "--out", str(out),
           "--jobs", "2", "--reuse-processes", *FIT_ARGS]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    out = tmp_path_factory.mktemp("sweep") / "mlp"
    proc = run_sweep(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


@pytest.mark.slow
def test_sweep_shows_mup_transfers_and_sp_drifts(swept: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, proc = swept
    points = [p for p in out.iterdir() if (p / sweep.MARKER).is_file()]
    assert len(points) == 2 * 2 * 5
    t = analyse(load_runs([out]), "mean")  # read back from the event files only
    assert t is not None and t.axes.lr == "model.init_args.lr" and t.axes.sizes == ["model.init_args.width"]
    mup = t.slopes["scheme=mup"]["model.init_args.width"]
    sp = t.slopes["scheme=sp"]["model.init_args.width"]
    assert sp <= -0.3, (mup, sp)
    assert abs(mup) <= 0.3, (mup, sp)
    assert "optimum moves by" in proc.stdout and "per width doubling" in proc.stdout
    assert f"{mup:+.2f}" in proc.stdout and f"{sp:+.2f}" in proc.stdout
    page = out / "report" / "report.html"
    assert page.is_file() and "Learning-rate transfer" in page.read_text(encoding="utf-8")
    assert len(list((out / "report").glob("*transfer*.png"))) >= 3  # loss vs LR, optimum vs width, coordinate check


@pytest.mark.slow
def test_rerun_finishes_only_the_missing_points(swept: tuple[Path, subprocess.CompletedProcess[str]]) -> None:
    out, _ = swept
    points = sorted(p for p in out.iterdir() if (p / sweep.MARKER).is_file())
    missing, unmarked = points[3], points[7]
    shutil.rmtree(missing)  # interrupted before it ran
    (unmarked / sweep.MARKER).unlink()  # ran to max_steps, marker lost: its event files say it is finished
    events = {p: {f: f.stat().st_mtime_ns for f in p.glob("events.out.tfevents.*")} for p in points if p != missing}
    proc = run_sweep(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "19 already finished, running 1 " in proc.stderr
    assert (missing / sweep.MARKER).is_file() and list(missing.glob("events.out.tfevents.*"))
    assert {p: {f: f.stat().st_mtime_ns for f in p.glob("events.out.tfevents.*")} for p in events} == events


def test_bad_grid_key_fails_before_any_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "never"
    code = sweep.main(["--config", str(CONFIG), "--grid", "model.init_args.widht=64,256", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert "'model.init_args.widht' is not in the config's schema" in err
    assert "nearest valid keys: model.init_args.width" in err
    code = sweep.main(["--config", str(CONFIG), "--grid", "model.init_args.width=64,wide", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists() and "'model.init_args.width': 'wide'" in err and "width" in err


def test_print_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = sweep.main(["--config", str(CONFIG), *GRID, "--seeds", "2", "--print-commands", "--out", str(tmp_path / "s")])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 2 * 2 * 5 * 2 and not (tmp_path / "s").exists()
    assert all(" fit --config " in ln and ln.endswith(sweep.MARKER) for ln in lines)
    assert sum("--model.init_args.lr=0.125 " in ln for ln in lines) == 8
    assert {ln.split("--seed_everything=")[1].split()[0] for ln in lines} == {"0", "1"}


def test_grid_values() -> None:
    assert sweep.parse_grid("model.init_args.lr=logspace(2^-3,2^-1,3),1.0") == ("model.init_args.lr", ["0.125", "0.25", "0.5", "1.0"])
    assert sweep.parse_grid("--trainer.max_steps=10,20") == ("trainer.max_steps", ["10", "20"])
    for bad in ("model.init_args.lr", "x=logspace(1,0,3)", "x=1,1"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_grid(bad)
