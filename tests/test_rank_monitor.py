"""RankMonitor: logged values against torch.linalg oracles, bit-identical training, clear errors."""

from pathlib import Path

import pytest
import torch
from helpers import TinyClassifier, assert_same_training_state, fit
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_align import RankMonitor


def test_logged_weight_values_match_svdvals() -> None:
    cb = RankMonitor(every_n_steps=3, threshold=0.3, near_one_tol=0.2)
    module, trainer = fit([cb], max_steps=3)
    metrics = trainer.callback_metrics
    for name in ("net.0", "net.4", "net.7"):
        w = module.get_submodule(name).weight.detach().double()
        s = torch.linalg.svdvals(w)
        stable = float((s**2).sum() / s[0] ** 2)
        assert float(metrics[f"rank/weight_stable/{name}"]) == pytest.approx(stable, rel=1e-5)
        assert float(metrics[f"rank/weight_above/{name}"]) == int((s > 0.3).sum())
        assert float(metrics[f"rank/weight_near_one/{name}"]) == int(((s - 1).abs() <= 0.2).sum())
        assert float(metrics[f"rank/weight_fro_sq/{name}"]) == pytest.approx(float(w.pow(2).sum()), rel=1e-5)


def test_logged_representation_rank_matches_direct_computation() -> None:
    cb = RankMonitor(every_n_steps=2, layers=["net.4"], probe_size=32)
    module, trainer = fit([cb], max_steps=2)
    x = cb.probe_batch[0]
    module.eval()  # RankMonitor's default bn_mode is "eval"; dropout is off in probes
    with torch.no_grad():
        z = module.net[:5](x).double()
    z = z - z.mean(0)
    s = torch.linalg.svdvals(z)
    p = s / s.sum()
    expected = float(torch.exp(-(p * p.log()).sum()))
    assert float(trainer.callback_metrics["rank/repr_effective/net.4"]) == pytest.approx(expected, rel=1e-4)
    pr = float((s**2).sum() ** 2 / (s**4).sum())
    assert float(trainer.callback_metrics["rank/repr_participation/net.4"]) == pytest.approx(pr, rel=1e-4)


def test_training_is_bit_identical_with_rank_monitor() -> None:
    plain = fit([], max_steps=8)
    monitored = fit([RankMonitor(every_n_steps=1, jacobian_points=2, bn_mode="train")], max_steps=8)
    assert_same_training_state(plain, monitored)


def test_unknown_module_name_fails_before_first_step() -> None:
    module = TinyClassifier()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(ValueError, match=r"'encoder\.fc' matches no module of TinyClassifier"):
        fit([RankMonitor(layers=["encoder.fc"])], module=module, max_steps=2)
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items()), "no optimizer step was taken"
    with pytest.raises(ValueError, match="RankMonitor\\(weights=...\\).*'net.2'"):
        fit([RankMonitor(weights=["net.2"])], max_steps=1)  # a ReLU has no weight


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"RankMonitor\(every_n_steps=0\): every_n_steps must be an int >= 1"):
        RankMonitor(every_n_steps=0)
    with pytest.raises(ValueError, match="jacobian_points"):
        RankMonitor(jacobian_points=-1)
    with pytest.raises(ValueError, match="probe_size"):
        RankMonitor(probe_size=0)


def test_writes_scalars_to_csv_and_histograms_to_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = TensorBoardLogger(tmp_path, name="tb")
    csv = CSVLogger(tmp_path, name="csv")
    fit([RankMonitor(every_n_steps=2)], max_steps=2, logger=[tb, csv])
    events = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0, "scalars": 0})
    events.Reload()
    assert "rank/singular_values/net.0" in events.Tags()["histograms"]
    assert "rank/weight_stable/net.0" in events.Tags()["scalars"]
    steps = [e.step for e in events.Scalars("rank/weight_stable/net.0")]
    assert steps == [0, 2]
    csv_text = (Path(csv.log_dir) / "metrics.csv").read_text()
    assert "rank/repr_effective/net.0" in csv_text
