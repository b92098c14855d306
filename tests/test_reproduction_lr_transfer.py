"""reproductions/lr_transfer.py --quick: the best LR transfers across width under μP and drifts under SP."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


@pytest.mark.slow  # a whole --quick reproduction run (tens of seconds); `./run test` and CI still run it
def test_quick_run_shows_lr_transfer(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPRO))
    import lr_transfer

    results = lr_transfer.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "lr_transfer.png").stat().st_size > 0
    saved = json.loads((tmp_path / "lr_transfer.json").read_text())
    for key in ("widths", "lrs", "mup_best_lr", "sp_best_lr", "losses"):
        assert key in saved, key
    widths, lrs = results["widths"], results["lrs"]
    assert widths[0] == 64 and widths[-1] >= 1024
    assert all(b / a == 2 for a, b in zip(lrs, lrs[1:]))  # a x2 grid
    mup = [math.log2(results["mup_best_lr"][str(w)]) for w in widths]
    sp = [math.log2(results["sp_best_lr"][str(w)]) for w in widths]
    # at the base width both schemes are the same network: the same best LR
    assert mup[0] == sp[0]
    # μP: every width's best LR within one x2 step of the base width's, and not at the edge of the grid
    assert all(abs(m - mup[0]) <= 1 for m in mup), results["mup_best_lr"]
    assert all(math.log2(lrs[0]) < m < math.log2(lrs[-1]) for m in mup), results["mup_best_lr"]
    # SP: the best LR moves down by at least two x2 steps from width 64 to the widest, monotonically
    assert sp[-1] <= sp[0] - 2, results["sp_best_lr"]
    assert all(b <= a for a, b in zip(sp, sp[1:])), results["sp_best_lr"]
    # the curves are real: at the widest SP width the base-width optimum is clearly worse than SP's own optimum
    sp_wide = results["losses"]["sp"][str(widths[-1])]
    i_base, i_best = lrs.index(results["sp_best_lr"]["64"]), lrs.index(results["sp_best_lr"][str(widths[-1])])
    assert sp_wide[i_base] > 1.5 * sp_wide[i_best]
