"""reproductions/orthogonal_ntk.py --quick: Gaussian NTK fluctuations grow with depth, orthogonal ones saturate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))

import orthogonal_ntk  # noqa: E402


def test_quick_run_shows_the_claim(tmp_path: Path) -> None:
    orthogonal_ntk.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "orthogonal_ntk.json").read_text())
    assert (tmp_path / "orthogonal_ntk.png").stat().st_size > 0
    depths, g, o = res["depths"], res["gaussian"], res["orthogonal"]
    assert res["width"] == 32 and res["n_inits"] >= 50 and len(depths) == len(g) == len(o) >= 5
    # Gaussian: grows about linearly in depth (PDLT: slope 0.4-0.5, width-independent).
    assert all(a < b for a, b in zip(g, g[1:])), g
    assert 0.3 < res["gaussian_slope"] < 0.8, res["gaussian_slope"]
    assert g[-1] > 10 * g[0], g
    # Orthogonal: bounded and not growing past depth 16 (criterion of papers.md 001), far below Gaussian.
    deep = [v for d, v in zip(depths, o) if d >= 16]
    assert max(o) < 0.5 and max(deep) < 2 * o[depths.index(16)], o
    assert all(gv > 5 * ov for gv, ov in zip(g[1:], o[1:])), (g, o)
