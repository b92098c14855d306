"""reproductions/elr_warmup.py --quick: ELR spreads close at a small LR, stay open and flip above η*, ELRWarmup closes them first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


def test_quick_run_shows_elr_spread_dynamics(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPRO))
    import elr_warmup

    r = elr_warmup.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "elr_warmup.png").stat().st_size > 0
    saved = json.loads((tmp_path / "elr_warmup.json").read_text())
    for key in ("steps", "constant", "warmup", "critical_lr", "above"):
        assert key in saved, key
    s = r["summary"]
    # at init the spread is large (gradient explosion towards the input), the same in every run
    assert s["constant"]["first"] > 100
    # (the first update's ELR ratios are those of the gradients, whatever the LR)
    assert s["above"]["first"] == pytest.approx(s["constant"]["first"], rel=1e-4)
    assert s["warmup"]["first"] == pytest.approx(s["constant"]["first"], rel=1e-4)
    # the small LR is below the critical LR and the large one above it
    assert r["small_lr"] < r["critical_lr_init"] < r["large_lr"]
    # constant small LR: the spread closes (by > 50x) and keeps the lower-layers-faster ordering
    assert s["constant"]["last_quarter_geo_mean"] < s["constant"]["first"] / 50
    assert r["first_over_last_layer"]["constant"]["2"] > 1
    # above η*: the ordering flips after the first step and the spread stays wide
    assert r["first_over_last_layer"]["above"]["2"] < 0.1
    assert s["above"]["last_quarter_geo_mean"] > 20 * s["constant"]["last_quarter_geo_mean"]
    # ELRWarmup (same target LR): scales the first step down, and closes the spread fastest
    assert r["warmup_factor"][0] < 1
    assert s["warmup"]["second"] < s["constant"]["second"] / 2
    assert s["warmup"]["second"] < s["above"]["second"] / 4
