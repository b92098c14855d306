"""reproductions/feature_speed.py --quick: alignment at init falls like 1/√L in MLPs, not in 1/√L ResNets."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reproductions"))

import feature_speed  # noqa: E402


def test_quick_run_shows_the_claim(tmp_path: Path) -> None:
    feature_speed.main(["--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "feature_speed.json").read_text())
    assert (tmp_path / "feature_speed.png").stat().st_size > 0
    depths, mlp, sqrt_, one = res["depths"], res["mlp_cos"], res["resnet_sqrt_cos"], res["resnet_one_cos"]
    assert len(depths) == len(mlp) == len(sqrt_) == len(one) >= 4
    # ReLU MLP: falls monotonically, roughly like 1/sqrt(L) (the paper's Θ(1/√L); our numpy reference at width 256:
    # .82 at L = 2, .24 at L = 32).
    assert all(a > b for a, b in zip(mlp, mlp[1:])), mlp
    assert 0.7 < mlp[0] < 0.95 and mlp[-1] < 0.4, mlp
    scaled = [c * math.sqrt(L) for c, L in zip(mlp, depths)]
    assert max(scaled) / min(scaled) < 1.6, scaled
    # ResNet with 1/sqrt(L) branches: stays of order one.
    assert min(sqrt_) > 0.5 and sqrt_[-1] > 0.7 * sqrt_[0], sqrt_
    # ResNet with unit branches: falls with depth, far below the 1/sqrt(L) ResNet at the largest depth.
    assert all(a > b for a, b in zip(one, one[1:])), one
    assert one[-1] < 0.5 * sqrt_[-1] and one[-1] < 0.5 * one[0], one
