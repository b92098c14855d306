"""reproductions/bottleneck.py --quick: an L2 ridge on a deep ReLU net gives a low-rank middle (Jacot 2023)."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))

import bottleneck  # noqa: E402


@pytest.mark.slow  # a whole --quick reproduction run (about 25 s on one core); `./run test` and CI still run it
def test_quick_run_shows_the_claim(tmp_path: Path) -> None:
    bottleneck.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "bottleneck.json").read_text())
    assert (tmp_path / "bottleneck.png").stat().st_size > 0
    layers, middle = res["layers"], res["middle_layers"]
    end, init = res["repr_effective_rank"], res["repr_effective_rank_init"]
    assert res["target_rank"] == 2 and set(end) == set(init) == set(layers) and len(middle) >= 6
    # The task is fitted (the best constant has loss target_variance ≈ 5.2) and generalises.
    assert res["train_loss"] < 0.05 * res["target_variance"] and res["test_loss"] < 0.15 * res["target_variance"], res
    # Middle representations collapse from tens of dimensions to near the latent dimension: measured 2.9 (the
    # latent 2 plus a weaker third direction of the linear span; see below and the script's docstring).
    assert all(2.0 < end[n] < 3.5 for n in middle), end
    assert all(end[n] < 0.2 * init[n] for n in middle), (end, init)
    # Locally the middle representation is 2-dimensional: the Jacobian with respect to the input has two
    # singular values of order one and a third one an order of magnitude smaller (measured 1 / 0.71 / 0.06).
    jac = res["middle_jacobian_sv_ratios"]
    assert jac[1] > 0.3 and jac[2] < 0.25, jac
    # First and last layers stay higher-dimensional than the bottleneck.
    low = min(end[n] for n in middle)
    assert end["layers.0"] > 3 * low and end["readout"] > 1.5 * low, end
    # Middle weights: a few singular values of order one (measured 3, at 1.1-1.3) and the rest near zero
    # (measured 0.003-0.06 in most middle layers), while the first weight keeps many directions.
    assert all(2 <= k <= 4 for k in res["middle_k_near_one"]), res["middle_k_near_one"]
    assert statistics.median(res["middle_k_near_one"]) == 3, res["middle_k_near_one"]
    assert statistics.median(res["middle_next_singular_value"].values()) < 0.1, res["middle_next_singular_value"]
    assert res["k_above"]["layers.0"] > res["k_above"][middle[len(middle) // 2]], res["k_above"]
