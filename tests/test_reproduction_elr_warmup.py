"""reproductions/elr_warmup.py --quick: ELR spreads close at a small LR and flip above η*; ELRWarmup (our
reconstruction of the paper's rule) acts for one step only, because η* jumps above the target after it.

The 50-layer net is chaotic (float rounding changes every step after the first), so only claims that held over
seeds 0-3 and one or two threads are asserted, each with its measured range (docs/papers.md)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


@pytest.mark.slow  # a whole --quick reproduction run (tens of seconds); `./run test` and CI still run it
def test_quick_run_shows_elr_spread_dynamics(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPRO))
    import elr_warmup

    r = elr_warmup.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "elr_warmup.png").stat().st_size > 0
    saved = json.loads((tmp_path / "elr_warmup.json").read_text())
    for key in ("steps", "constant", "warmup", "critical_lr", "above", "loss", "after_warmup", "warmup_steps"):
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
    assert s["above"]["last_quarter_geo_mean"] > 10 * s["constant"]["last_quarter_geo_mean"]  # 22-1,800x measured
    # ELRWarmup scales the first step down to η* (the extremes end it equal: the smallest spread at step 2) ...
    assert r["warmup_factor"][0] == pytest.approx(r["critical_lr_init"] / r["large_lr"], rel=1e-3)
    assert s["warmup"]["second"] < s["constant"]["second"] / 2
    assert s["warmup"]["second"] < s["above"]["second"] / 4
    # ... but the step at η* gives the lowest layer an ELR of about sqrt(spread) >> 1 (the overshoot), after which
    # η*_t is far above the target: the warm-up is over after one step
    first_step = r["profile"]["warmup"]["1"]
    assert first_step[0] == pytest.approx(math.sqrt(s["warmup"]["first"]), rel=0.3)
    assert r["warmup_steps"] == 1
    assert r["critical_lr_runs"]["warmup"][1] > 5 * r["large_lr"]
    assert all(f == 1.0 for f in r["warmup_factor"][1:])
    # after the warm-up the spread reopens (its step-2 minimum does not last: 55-770x higher later), staying lower
    # than the constant-target run's on geometric mean (1.5-23x). The share of steps at which it is lower is not
    # asserted: the net is chaotic, and float rounding alone (thread count, torch version) moves it from 47% to 95%
    # (docs/papers.md); so is the constant-target run's loss (1.8-2.3 over seeds 0-3)
    after = [v for v in r["warmup"][2:] if math.isfinite(v)]
    assert max(after) > 10 * s["warmup"]["second"]
    assert r["after_warmup"]["warmup_geo_mean"] < r["after_warmup"]["above_geo_mean"]
    # and the warm-up run does not train (the loss stays within 5% of chance, ln 10)
    assert s["warmup"]["last_quarter_loss"] > 0.95 * r["chance_loss"], s["warmup"]
