"""reproductions/super_consistency.py --quick: μP's LR-rescaled sharpness is width-independent, NTP's is not."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


def test_quick_run_shows_super_consistency(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPRO))
    import super_consistency

    r = super_consistency.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "super_consistency.png").stat().st_size > 0
    saved = json.loads((tmp_path / "super_consistency.json").read_text())
    for key in ("widths", "mup_sharpness", "ntk_sharpness", "curves"):
        assert key in saved, key
    widths = r["widths"]
    assert len(widths) >= 3 and widths[-1] >= 16 * widths[0]
    # with one hidden layer and no biases all μP LRs are equal: the Sharpness callback's lr_x_max_eig is λmax(P·H)
    # μP: the LR-rescaled sharpness agrees across widths at every logged step after init (paper: < ~20%)
    assert statistics.median(r["mup_rel_spread"]) < 0.15, r["mup_rel_spread"]
    assert max(r["mup_rel_spread"]) < 0.3, r["mup_rel_spread"]
    # ... and progressive sharpening happened: well above its value at init
    for w in widths:
        curve = r["curves"]["mup"][str(w)]["lr_x_max_eig"]
        assert max(curve[1:]) > 2 * curve[0]
    # NTP: the values separate monotonically with width (wider is flatter), far more than μP's
    ntk = r["ntk_sharpness"]
    assert all(b < a for a, b in zip(ntk, ntk[1:])), ntk
    assert ntk[-1] < 0.6 * ntk[0]
    assert r["ntk_monotone_steps"] >= 0.8
    assert statistics.median(r["ntk_rel_spread"]) > 2 * statistics.median(r["mup_rel_spread"])
    # NTK: under μP the kernel keeps moving at every width; under NTP it freezes as the width grows
    mup_growth = [r["ntk_growth"]["mup"][str(w)] for w in widths]
    ntp_growth = [r["ntk_growth"]["ntk"][str(w)] for w in widths]
    assert min(mup_growth) > 4, mup_growth
    assert all(b < a for a, b in zip(ntp_growth, ntp_growth[1:])), ntp_growth
    assert ntp_growth[-1] < 0.5 * mup_growth[-1]
