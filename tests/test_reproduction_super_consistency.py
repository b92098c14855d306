"""reproductions/super_consistency.py --quick: μP's LR-rescaled sharpness climbs to the edge of stability at every width, NTP's depends on width."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPRO = Path(__file__).resolve().parents[1] / "reproductions"


def test_quick_run_shows_super_consistency_at_the_edge_of_stability(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPRO))
    import super_consistency

    r = super_consistency.main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "super_consistency.png").stat().st_size > 0
    saved = json.loads((tmp_path / "super_consistency.json").read_text())
    for key in ("widths", "curves", "window_mean", "mup_in_band", "threshold"):
        assert key in saved, key
    widths, thr = r["widths"], r["threshold"]
    assert thr == 2.0  # plain SGD: the edge of stability is η·λmax = 2
    assert len(widths) >= 3 and widths[-1] >= 4 * widths[0]
    assert r["window"][1] - r["window"][0] >= 80  # a sustained window, not one measurement
    # μP: η·λmax starts below the edge (progressive sharpening) ...
    assert max(r["init"]["mup"].values()) < 0.75 * thr, r["init"]
    # ... and sits at it, within ±15% at every measured step of the window, at every width
    for w in widths:
        assert r["mup_in_band"][str(w)] == 1.0, r["mup_in_band"]
        assert abs(r["window_mean"]["mup"][str(w)] / thr - 1) < 0.05, r["window_mean"]
    # NTP: the same network at the base width, but the wider the lazier: the window means fall with width
    ntp = [r["window_mean"]["ntk"][str(w)] for w in widths]
    assert r["ntk_monotone"], ntp
    assert ntp[-1] < 0.8 * thr, ntp
    assert r["window_mean"]["mup"][str(widths[-1])] - ntp[-1] > 0.3, (r["window_mean"], ntp)
