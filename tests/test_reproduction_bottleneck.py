"""reproductions/bottleneck.py --quick: weight decay on a deep bias-free ReLU net creates a low-rank middle."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))

import bottleneck  # noqa: E402


@pytest.mark.slow  # a whole --quick reproduction run (tens of seconds); `./run test` and CI still run it
def test_quick_run_shows_the_claim(tmp_path: Path) -> None:
    bottleneck.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bottleneck.json").read_text())
    assert (tmp_path / "bottleneck.png").stat().st_size > 0
    layers, middle = res["layers"], res["middle_layers"]
    end, init = res["repr_effective_rank"], res["repr_effective_rank_init"]
    assert res["target_rank"] == 2 and set(end) == set(init) == set(layers) and len(middle) >= 4
    low = min(end[n] for n in middle)
    # Middle representations collapse to a few dimensions (latent 2, plus about one more; see the script),
    # from tens of dimensions at initialization.
    assert low < 3.6, end
    assert all(end[n] < 0.25 * init[n] for n in middle), (end, init)
    # First and last layers stay higher-dimensional than the bottleneck.
    assert end["layers.0"] > 3 * low and end["readout"] > 1.1 * low, end
    # Middle weights: a few singular values of order one, the rest small.
    for n in middle:
        s = res["singular_values"][n]
        assert res["k_near_one"][n] <= 4 and res["k_above"][n] <= 4, (n, s)
        assert s[4] < 0.3 * s[0], (n, s)
    # while the first weight keeps many directions.
    assert res["k_above"]["layers.0"] > res["k_above"][middle[-1]], res["k_above"]
