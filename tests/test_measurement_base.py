"""MeasurementCallback: schedule, fixed probe, probe hygiene, accumulation, state, errors."""

from typing import Any

import pytest
import torch
from helpers import TinyClassifier, fit, tiny_loader
from torch.utils.data import DataLoader, TensorDataset

from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.callbacks.probe import ProbeLoss, draw_probe_batch
from lightning_align.schedules import StepSchedule


class Recorder(MeasurementCallback):
    """Records when it ran, what it saw, and perturbs everything a careless probe could touch."""

    family = "test"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps: list[int] = []
        self.batches: list[Any] = []
        self.modes: list[dict[str, bool]] = []
        self.losses: list[float] = []

    def measure(self, trainer, pl_module, batch):
        self.steps.append(trainer.global_step)
        self.batches.append(batch)
        self.modes.append({n: m.training for n, m in pl_module.named_modules()})
        loss = self.probe_loss_model(pl_module)(batch)
        self.losses.append(float(loss))
        loss.backward()  # a careless probe: must not reach the training gradients
        torch.rand(10)  # advances the global RNG: must be undone
        pl_module(batch[0])  # train-mode BatchNorm forward: running stats must be restored
        return {"test/loss": loss}


def test_schedule_linear_and_log() -> None:
    assert [t for t in range(13) if StepSchedule(4).is_due(t)] == [0, 4, 8, 12]
    assert [t for t in range(40) if StepSchedule(16, "log").is_due(t)] == [0, 1, 2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="every_n_steps must be >= 1"):
        StepSchedule(0)
    with pytest.raises(ValueError, match="schedule must be"):
        StepSchedule(3, "cosine")


def test_runs_at_start_and_scheduled_steps_with_fixed_probe() -> None:
    rec = Recorder(every_n_steps=2, probe_size=20)
    _, trainer = fit([rec], max_steps=6)
    assert rec.steps == [0, 2, 4, 6]
    first = rec.batches[0]
    assert first[0].shape[0] == 20
    assert all(b is first for b in rec.batches), "the probe batch is drawn once and reused"
    assert "test/loss" in trainer.callback_metrics


def test_probe_context_modes_dropout_off_bn_train() -> None:
    rec = Recorder(every_n_steps=100)
    fit([rec], max_steps=1)
    mode = rec.modes[0]
    assert mode["net.3"] is False, "dropout is off during probes"
    assert mode["net.1"] is True, "BatchNorm uses batch statistics by default"
    rec_eval = Recorder(every_n_steps=100, bn_mode="eval")
    fit([rec_eval], max_steps=1)
    assert rec_eval.modes[0]["net.1"] is False


def test_careless_probe_leaves_training_bit_identical() -> None:
    from helpers import assert_same_training_state

    plain = fit([], max_steps=6)
    probed = fit([Recorder(every_n_steps=1)], max_steps=6)
    assert_same_training_state(plain, probed)


def test_flags_restored_after_probe() -> None:
    class ModeSpy(Recorder):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            self.after = {n: m.training for n, m in pl_module.named_modules()}

    spy = ModeSpy(every_n_steps=1)
    fit([spy], max_steps=2)
    assert spy.modes[-1]["net.3"] is False, "dropout off inside the probe"
    assert all(spy.after.values()), "every module is back in train mode after the probe"


def test_gradient_accumulation_measures_once_per_optimizer_step() -> None:
    rec = Recorder(every_n_steps=1)
    fit([rec], max_steps=3, accumulate_grad_batches=2)
    assert rec.steps == [0, 1, 2, 3]


def test_state_dict_round_trip_prevents_duplicate_measurement() -> None:
    rec = Recorder(every_n_steps=2)
    fit([rec], max_steps=2)
    state = rec.state_dict()
    assert state == {"last_step": 2, "settings": {"probe_size": 256, "probe_seed": 0, "bn_mode": "train", "dropout": False}}
    other = Recorder(every_n_steps=2)
    other.load_state_dict(state)
    assert other.last_step == 2


def test_probe_loss_uses_training_step_with_logging_silenced() -> None:
    module = TinyClassifier()
    batch = (torch.randn(8, 8), torch.randint(0, 3, (8,)))
    module.eval()
    loss = ProbeLoss(module)(batch)  # no trainer attached: a real self.log would raise
    expected = torch.nn.functional.cross_entropy(module(batch[0]), batch[1])
    assert torch.allclose(loss, expected)
    assert "log" not in module.__dict__


def test_probe_loss_prefers_probe_loss_method() -> None:
    class WithProbeLoss(TinyClassifier):
        def probe_loss(self, batch):
            return self(batch[0]).pow(2).mean()

    module = WithProbeLoss().eval()
    batch = (torch.randn(4, 8), torch.zeros(4, dtype=torch.long))
    assert torch.allclose(ProbeLoss(module)(batch), module(batch[0]).pow(2).mean())


def test_draw_probe_batch_is_seeded_and_sharded() -> None:
    loader = tiny_loader(n=30)
    a = draw_probe_batch(loader, 10, seed=3)
    b = draw_probe_batch(loader, 10, seed=3)
    assert torch.equal(a[0], b[0]) and a[0].shape[0] == 10
    r0 = draw_probe_batch(loader, 10, seed=3, rank=0, world_size=2)
    r1 = draw_probe_batch(loader, 10, seed=3, rank=1, world_size=2)
    assert torch.equal(torch.cat([r0[0], r1[0]]).sort(0).values, a[0].sort(0).values)


def test_empty_dataset_fails_before_first_step() -> None:
    empty = DataLoader(TensorDataset(torch.zeros(0, 8), torch.zeros(0, dtype=torch.long)), batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        draw_probe_batch(empty, 4, seed=0)

    class NoData(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(())

    with pytest.raises(ValueError, match="yielded no batch"):
        draw_probe_batch(DataLoader(NoData(), batch_size=2), 4, seed=0)


def test_iterable_dataset_probe_does_not_consume_rng() -> None:
    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            g = torch.Generator().manual_seed(0)
            for _ in range(10):
                yield torch.randn(8, generator=g), torch.tensor(1)

    state = torch.get_rng_state()
    batch = draw_probe_batch(DataLoader(Stream(), batch_size=4), 6, seed=0)
    assert batch[0].shape == (6, 8)
    assert torch.equal(state, torch.get_rng_state())


def test_bad_probe_size_and_bn_mode() -> None:
    with pytest.raises(ValueError, match="probe_size"):
        Recorder(probe_size=0)
    with pytest.raises(ValueError, match="bn_mode"):
        Recorder(bn_mode="frozen")
    with pytest.raises(ValueError, match="every_n_steps"):
        Recorder(every_n_steps=0)


def test_explicit_probe_batch() -> None:
    rec = Recorder(every_n_steps=100)
    x = torch.randn(5, 8, dtype=torch.float64)
    rec.set_probe_batch((x, torch.zeros(5, dtype=torch.long)))
    fit([rec], max_steps=1)
    assert rec.batches[0][0].dtype == torch.float32, "probes run in fp32"
    assert torch.allclose(rec.batches[0][0], x.float())


def test_prepare_runs_once_in_probe_context_before_step_zero() -> None:
    class Prepared(Recorder):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.prepared: list[tuple[int, bool, int]] = []

        def prepare(self, trainer, pl_module, batch):
            dropout_on = pl_module.net[3].training
            self.prepared.append((trainer.global_step, dropout_on, len(self.steps)))

    cb = Prepared(every_n_steps=2)
    fit([cb], max_steps=4)
    assert cb.prepared == [(0, False, 0)], "once, before the step-0 measurement, with dropout off"


def test_measure_outside_probe_context_when_asked() -> None:
    class WeightsOnly(Recorder):
        measure_in_probe_context = False

        def measure(self, trainer, pl_module, batch):
            self.modes.append({n: m.training for n, m in pl_module.named_modules()})
            return {}

    cb = WeightsOnly(every_n_steps=1)
    fit([cb], max_steps=2)
    assert cb.modes[-1]["net.3"] is True, "no probe context: the model is as training left it"


def test_every_callback_shares_argument_names_and_keeps_its_tail_keyword_only() -> None:
    """One name, one meaning (docs/callbacks.md, "Arguments every callback shares"): ``layers`` for outputs,
    ``weights`` for weights, ``figure_every`` for figures; only the leading arguments are positional."""
    import inspect

    import lightning_align
    from lightning_align.cli_errors import RENAMED_ARGUMENTS

    leading = {"every_n_steps", "target_speed", "k", "layers", "weights"}
    shared = {"schedule", "max_overhead", "probe_size", "probe_seed", "bn_mode", "dropout", "name"}
    renamed = {old for _, old in RENAMED_ARGUMENTS} - {"method"}
    classes = [getattr(lightning_align, n) for n in lightning_align.__all__ if n[0].isupper()]
    measuring = [c for c in classes if isinstance(c, type) and issubclass(c, MeasurementCallback)]
    assert len(measuring) >= 8
    for cls in measuring:
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        positional = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        keyword_only = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert set(positional) <= leading, (cls.__name__, positional)
        assert shared & {p.name for p in params} <= keyword_only, cls.__name__
        assert not renamed & {p.name for p in params}, cls.__name__
        assert ("method" in keyword_only) == (cls.__name__ == "Sharpness"), cls.__name__
