"""A run stopped and resumed from its checkpoint logs the same values afterwards as an uninterrupted run.

Every measurement callback at once; the restored state (step counters, Sharpness warm-start vectors, the
NTK's reference kernel, CoordCheck's h_0, ...) must make the resumed measurements equal. Training is made
deterministic across the resume (no dropout, no shuffling), so any difference comes from the callbacks.
"""

from pathlib import Path

import pytest
from helpers import MemoryLogger, TinyClassifier, fit, measurement_suite, tiny_loader
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader


def model() -> TinyClassifier:
    module = TinyClassifier()
    module.net[3].p = 0.0  # no dropout: training itself is reproducible across the resume
    return module


def loader() -> DataLoader:
    return DataLoader(tiny_loader().dataset, batch_size=16, shuffle=False)


def test_resumed_run_logs_what_the_uninterrupted_run_logs(tmp_path: Path) -> None:
    uninterrupted = MemoryLogger()
    fit(measurement_suite(), module=model, loader=loader(), max_steps=8, logger=uninterrupted)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    fit(measurement_suite() + [checkpoint], module=model, loader=loader(), max_steps=4, logger=MemoryLogger(), enable_checkpointing=True)
    (path,) = tmp_path.glob("*.ckpt")
    resumed = MemoryLogger()
    fit(measurement_suite(), module=model, loader=loader(), max_steps=8, logger=resumed, ckpt_path=str(path))
    for step in (5, 6, 7, 8):
        expected, got = uninterrupted.at(step), resumed.at(step)
        assert expected, f"nothing logged at step {step}"
        assert set(expected) == set(got), f"step {step}: tags differ: {set(expected) ^ set(got)}"
        for tag, value in expected.items():
            assert got[tag] == pytest.approx(value, rel=1e-4, abs=1e-7), f"step {step}: {tag}"
    assert [s for s, _ in resumed.series("sharpness/max_eig")] == [6, 8], "no measurement is repeated after a resume"


def test_feature_alignment_resumed_without_its_state_measures_nothing_at_the_resume_step(tmp_path: Path) -> None:
    """Its weight copy from before the resume step is lost with the state: it says so and logs nothing there
    (not a gradient-step prediction under the same tags), then measures the next scheduled step as usual."""
    from lightning_align import FeatureAlignment

    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_top_k=-1)
    fit([checkpoint], module=model, loader=loader(), max_steps=4, enable_checkpointing=True)
    (path,) = tmp_path.glob("*.ckpt")
    resumed = MemoryLogger()
    with pytest.warns(UserWarning, match=r"FeatureAlignment: no copy of the weights from just before step 4"):
        fit([FeatureAlignment(every_n_steps=2, probe_size=32)], module=model, loader=loader(), max_steps=6, logger=resumed,
            ckpt_path=str(path))
    assert [s for s, _ in resumed.series("align/loss_decrease")] == [6]
