"""The terminal view: headline values in the progress bar and the end-of-fit summary table.

Oracles: the values each callback logged (MemoryLogger) reduced by hand (last value; min over layers),
and the first/last logged values in the printed table.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from helpers import MemoryLogger, TinyClassifier, assert_same_training_state, fit
from lightning_align.callbacks.alignment import FeatureAlignment
from lightning_align.callbacks.base import MeasurementCallback
from lightning_align.callbacks.elr import EffectiveLR
from lightning_align.callbacks.rank import RankMonitor
from lightning_align.callbacks.sharpness import Sharpness
from lightning_align.callbacks.summary import AlignSummary, print_fit_summary
from lightning_align.headlines import HeadlineHistory
from lightning_align.summary import TITLE, format_value


def suite() -> list[MeasurementCallback]:
    return [
        Sharpness(every_n_steps=2, probe_size=16, min_eig=False),
        FeatureAlignment(every_n_steps=2, probe_size=16),
        EffectiveLR(every_n_steps=2),
    ]


@pytest.fixture(scope="module")
def run() -> tuple[MemoryLogger, object, AlignSummary]:
    logger = MemoryLogger()
    summary = AlignSummary(style="plain")
    module, trainer = fit([*suite(), summary], module=lambda: TinyClassifier(optimizer="sgd"), max_steps=4, logger=logger, enable_progress_bar=True)
    return logger, SimpleNamespace(module=module, trainer=trainer), summary


def _last(logger: MemoryLogger, key: str) -> float:
    return logger.series(key)[-1][1]


def test_progress_bar_shows_headlines(run) -> None:
    logger, r, _ = run
    shown = r.trainer.progress_bar_callback.get_metrics(r.trainer, r.module)
    assert shown["lr*eig"] == pytest.approx(_last(logger, "sharpness/lr_x_max_eig"))
    assert shown["elr_spread"] == pytest.approx(_last(logger, "elr/spread"))
    last_cos = {k: v for k, v in logger.at(4, "align/cos/").items()}
    assert len(last_cos) >= 2
    assert shown["min_cos"] == pytest.approx(min(last_cos.values()))


def test_summary_table_first_to_last(run) -> None:
    logger, _, summary = run
    text = summary.text
    assert text is not None and text.startswith(TITLE)
    rows = text.splitlines()[3:]  # after the title, the header and the rule
    by_label = {}
    for line in rows:  # cells are separated by two or more spaces: [family,] quantity, first, last, steps
        cells = [c.strip() for c in line.split("  ") if c.strip()]
        by_label[cells[-4]] = cells[-3:]
    spread = logger.series("elr/spread")
    assert by_label["ELR spread (max/min)"] == [format_value(spread[0][1]), format_value(spread[-1][1]), f"{spread[0][0]} -> {spread[-1][0]}"]
    lr_eig = logger.series("sharpness/lr_x_max_eig")
    assert by_label["lr·λmax"][:2] == [format_value(lr_eig[0][1]), format_value(lr_eig[-1][1])]
    first_cos = min(logger.at(0, "align/cos/").values())
    assert by_label["min cos over layers"][0] == format_value(first_cos)
    assert [line.split()[0] for line in rows if not line.startswith(" ")] == ["sharpness", "align", "elr"]


def test_default_summary_printed_once_and_rich(capsys: pytest.CaptureFixture[str]) -> None:
    import rich  # noqa: F401  (a dev dependency, so always there in the tests; without it the table is plain text, tested below)
    fit([RankMonitor(every_n_steps=2, probe_size=16), RankMonitor(every_n_steps=3, probe_size=16, layers=["net.0"], name="first layer")], max_steps=2)
    out = capsys.readouterr().out
    assert out.count(TITLE) == 1, out
    assert "min weight stable rank" in out
    assert "┃" in out or "|" in out  # a rich table


def test_align_summary_turns_things_off(capsys: pytest.CaptureFixture[str]) -> None:
    _, trainer = fit([RankMonitor(every_n_steps=1, probe_size=16), EffectiveLR(every_n_steps=1), AlignSummary(progress_bar=False, table=False)], max_steps=2)
    assert TITLE not in capsys.readouterr().out
    assert "elr_spread" not in trainer.progress_bar_metrics
    assert "elr/spread" in trainer.callback_metrics


def test_unknown_family_falls_back_to_layerless_tags(capsys: pytest.CaptureFixture[str]) -> None:
    class WeightNorm(MeasurementCallback):
        family = "norm"
        measure_in_probe_context = False

        def measure(self, trainer, pl_module, batch):
            return {"norm/total": sum(float(p.norm()) ** 2 for p in pl_module.parameters()) ** 0.5, "norm/per/layer": 1.0}

    fit([WeightNorm(every_n_steps=1, probe_size=4), AlignSummary(style="plain")], max_steps=2)
    out = capsys.readouterr().out
    assert "norm" in out and "total" in out and "0 -> 2" in out
    assert "per" not in out.split(TITLE)[1]


def test_rank_zero_only(capsys: pytest.CaptureFixture[str]) -> None:
    cb = RankMonitor()
    cb.headline_history.add(0, {"rank/weight_stable/fc": 3.0})
    assert print_fit_summary(SimpleNamespace(callbacks=[cb], is_global_zero=False)) is None
    assert capsys.readouterr().out == ""
    assert print_fit_summary(SimpleNamespace(callbacks=[cb], is_global_zero=True), style="plain").startswith(TITLE)


def test_the_table_says_which_callbacks_postponed_measurements(capsys: pytest.CaptureFixture[str]) -> None:
    from lightning_align.schedules import OverheadBudget

    quiet, busy = RankMonitor(), RankMonitor(name="busy")
    quiet.budget, busy.budget = OverheadBudget(0.003), OverheadBudget(0.003, postponed=7)
    busy.headline_history.add(0, {"rank/weight_stable/fc": 3.0})
    text = print_fit_summary(SimpleNamespace(callbacks=[quiet, busy], is_global_zero=True), style="plain")
    assert text.splitlines()[-1] == (
        "RankMonitor: 7 scheduled measurement(s) postponed to keep its measurements under 0.3% of training time "
        "(max_overhead; set every_n_steps (or max_overhead=None) to measure at every scheduled step)"
    )
    assert text.count("postponed") == 1 and text.splitlines()[-1] in capsys.readouterr().out


def test_history_first_and_last_reductions() -> None:
    hist = HeadlineHistory()
    hist.add(0, {"align/cos/a": 0.9, "align/cos/b": 0.4, "coord/rms/a": 1.0, "coord/rms/b": float("nan")})
    hist.add(7, {"align/cos/a": 0.2, "align/cos/b": 0.6, "coord/rms/a": 2.0, "coord/rms/b": 3.0})
    cos = hist.records[("align", "min cos over layers")]
    assert (cos.first, cos.last, cos.first_step, cos.last_step) == (0.4, 0.2, 0, 7)
    rms = hist.records[("coord", "max activation RMS")]
    assert (rms.first, rms.last) == (1.0, 3.0)  # NaN ignored while a finite value exists


def test_summary_and_progress_bar_do_not_change_training() -> None:
    with_view = fit([RankMonitor(every_n_steps=1, probe_size=16), EffectiveLR(every_n_steps=1), AlignSummary()], max_steps=4)
    without = fit([], max_steps=4)
    assert_same_training_state(with_view, without)


def test_bad_style_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"AlignSummary\(style='fancy'\): style must be one of 'auto', 'rich', 'plain'"):
        AlignSummary(style="fancy")  # type: ignore[arg-type]
