"""Live outcome monitoring logic: realising labels from received candles, per-row scores, reliability bins, and the
journal's batching (final versions, no double scoring, restart) on a real SQLite database."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa

from inference_service.domain import CandleBatch, Predictions
from inference_service.journal import PRUNE_GRACE_SECONDS, Journal, last_per_time
from inference_service.live_scores import realised_labels, reliability, score_rows, summarise
from shared import calibration
from shared.labels import TRIPLE_BARRIER, UNLABELLED, LabelSpec, make_labels
from shared.store import live
from shared.store.db import make_engine
from shared.store.migrate import upgrade

H = 3_600_000
T0 = 1_546_300_800_000  # 2019-01-01T00:00Z


def test_last_per_time_keeps_the_last_version_sorted():
    t = np.array([5, 3, 5, 1, 3], dtype=np.int64)
    v = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    ut, uv = last_per_time(t, v)
    assert ut.tolist() == [1, 3, 5]
    assert uv.tolist() == [40.0, 50.0, 30.0]


def test_fixed_horizon_labels_need_a_candle_after_the_horizon():
    spec = LabelSpec(horizon_bars=2, threshold=0.01)
    times = T0 + H * np.arange(6)
    close = np.array([100.0, 100.0, 103.0, 100.0, 98.0, 98.0])
    got = realised_labels(times, times, close, spec, H)
    expected = make_labels(close, spec, times, H)
    # row 3's horizon ends at the last candle, which may still be forming: not realised yet
    assert got[:3].tolist() == expected[:3].tolist() == [2, 1, 0]
    assert got[3:].tolist() == [UNLABELLED] * 3


def test_gap_spanning_labels_are_not_realised():
    spec = LabelSpec(horizon_bars=2, threshold=0.01)
    times = T0 + H * np.array([0, 1, 3, 4, 5, 6])  # candle 2 missing
    close = np.array([100.0, 100.0, 103.0, 100.0, 98.0, 98.0])
    got = realised_labels(times, times, close, spec, H)
    assert got[0] == UNLABELLED and got[1] == UNLABELLED  # their horizons span the missing candle
    assert got[2] == make_labels(close, spec, times, H)[2]


def test_triple_barrier_uses_the_path():
    spec = LabelSpec(horizon_bars=3, threshold=0.02, kind=TRIPLE_BARRIER)
    times = T0 + H * np.arange(5)
    close = np.array([100.0, 103.0, 100.0, 100.0, 100.0])  # touches +3 % and comes back
    got = realised_labels(times[:1], times, close, spec, H)
    assert got.tolist() == [2]
    assert realised_labels(times[:1], times, close, LabelSpec(horizon_bars=3, threshold=0.02), H).tolist() == [1]


@pytest.mark.parametrize("kind", ["fixed_horizon", TRIPLE_BARRIER])
def test_a_volatility_scaled_label_is_realised_as_training_labels_it(kind):
    """The barrier of candle t is k x the volatility of the closes up to t: with those candles received, the realised
    label is the training label; without them it is not realised (never labelled against a guessed barrier)."""
    spec = LabelSpec(horizon_bars=4, kind=kind, volatility_bars=24, volatility_multiple=0.5)
    rng = np.random.default_rng(5)
    close = 100 * np.exp(np.cumsum(rng.normal(0, np.where(np.arange(200) < 100, 0.002, 0.02))))
    times = T0 + H * np.arange(200)
    training = make_labels(close, spec, times, H)
    preds = times[24:195]
    got = realised_labels(preds, times, close, spec, H)
    assert np.array_equal(got, training[24:195]) and (got != UNLABELLED).all()
    assert {0, 1, 2} <= set(got[:70].tolist())  # the quiet part has moves beyond its own (small) barrier
    # the journal's copy holds the candles from the prediction on, not the 24 before it: not realised
    late = realised_labels(times[150:190], times[150:], close[150:], spec, H)
    assert (late[:24] == UNLABELLED).all() and np.array_equal(late[24:], training[174:190])


def test_prediction_without_its_candle_is_not_realised():
    spec = LabelSpec(horizon_bars=1, threshold=0.01)
    times = T0 + H * np.arange(4)
    got = realised_labels(np.array([T0 - H, T0 + 30 * H]), times, np.full(4, 100.0), spec, H)
    assert got.tolist() == [UNLABELLED, UNLABELLED]


def test_row_scores_match_the_training_metrics():
    rng = np.random.default_rng(1)
    p = rng.dirichlet([1, 1, 1], size=200)
    y = rng.integers(0, 3, size=200)
    prior = np.array([0.3, 0.4, 0.3])
    rows = score_rows(p, y, prior)
    assert np.mean(rows.loss) == pytest.approx(calibration.log_loss(p, y), rel=1e-12)
    assert np.mean(rows.brier) == pytest.approx(calibration.brier(p, y), rel=1e-12)
    assert np.mean(rows.prior_loss) == pytest.approx(calibration.log_loss(np.tile(prior, (200, 1)), y), rel=1e-12)


def test_reliability_bins():
    p = np.array([[0.05, 0.9, 0.05], [0.15, 0.7, 0.15], [0.12, 0.0, 0.88], [0.0, 0.0, 1.0]])
    y = np.array([1, 0, 2, 2])
    bins = reliability(p, y)
    down = [b for b in bins if b.class_name == "down"]
    assert [(b.lower, b.upper, b.count) for b in down] == [(0.0, 0.1, 2), (0.1, 0.2, 2)]
    assert down[1].mean_predicted == pytest.approx(0.135) and down[1].observed_frequency == 0.5
    up = {b.lower: b for b in bins if b.class_name == "up"}
    assert up[0.9].count == 1 and up[0.9].observed_frequency == 1.0  # p = 1 falls in the last bin
    for name in ("down", "range", "up"):
        assert sum(b.count for b in bins if b.class_name == name) == 4


def test_summary_of_nothing_is_empty():
    perf = summarise("m", live.Scores(np.empty(0, np.int64), np.empty((0, 3)), np.empty(0, np.int8), np.empty(0),
                                      np.empty(0), np.empty(0)))
    assert perf.scored == 0 and math.isnan(perf.log_loss) and perf.reliability == []


# -- the journal on a real database -------------------------------------------------------------------------------


@pytest.fixture()
def engine(tmp_path):
    url = f"sqlite:///{tmp_path}/live.db"
    upgrade(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


def _model(model_id="m1", horizon=2, train_end=T0 - H):
    rec = SimpleNamespace(model_id=model_id, symbol="BTC/USD", timeframe="1h", label=LabelSpec(horizon, 0.01),
                          prior=(0.25, 0.5, 0.25), train_start_ms=T0 - 1000 * H, train_end_ms=train_end,
                          stage="SERVING")
    return SimpleNamespace(record=rec)


def _answer(times, closes, proba, ready=None, train_end=T0 - H):
    times = np.asarray(times, dtype=np.int64)
    closes = np.asarray(closes, dtype=np.float64)
    n = len(times)
    nan = np.full(n, np.nan)
    candles = CandleBatch(times, closes, closes, closes, closes, np.ones(n), nan, nan)
    ready = np.ones(n, bool) if ready is None else np.asarray(ready)
    preds = Predictions(times.copy(), np.asarray(proba, dtype=np.float64), ready, times <= train_end)
    return preds, candles


def _scores(engine, model_id="m1"):
    return live.read_scores(engine, model_id)


def test_journal_scores_final_versions_once_and_survives_a_restart(engine):
    model = _model()
    j = Journal(engine)
    p = np.array([[0.2, 0.5, 0.3]])
    closes = [100.0, 100.5, 103.0, 101.0, 99.0]
    # candle 0 forming: three versions, the last one counts (probabilities and close)
    for version, close in enumerate([90.0, 95.0, 100.0]):
        j.record(model, *_answer([T0], [close], p + np.array([[0.0, 0.1 * version, -0.1 * version]])))
        j.flush()
    # candles 1..4 one at a time (a stream)
    for k in range(1, 5):
        j.record(model, *_answer([T0 + k * H], [closes[k]], [[0.3, 0.4, 0.3]]))
        j.flush()
    s = _scores(engine)
    # rows 0, 1 realised (their t+2 has a later candle); row 2's horizon ends at the last candle
    assert s.open_time_ms.tolist() == [T0, T0 + H]
    assert s.proba[0].tolist() == pytest.approx([0.2, 0.7, 0.1])  # the final version
    assert s.label.tolist() == [2, 1]  # 100 -> 103: up; 100.5 -> 101: range
    # serving the same candles again (a Predict over them) adds nothing
    j.record(model, *_answer(T0 + H * np.arange(5), closes, np.tile([[0.1, 0.1, 0.8]], (5, 1))))
    j.flush()
    assert len(_scores(engine).label) == 2
    # a restart: a new journal on the same database finishes the pending ones
    j.stop()
    j2 = Journal(engine)
    j2.record(model, *_answer([T0 + 5 * H], [99.5], [[0.3, 0.4, 0.3]]))
    j2.flush()
    s = _scores(engine)
    assert s.open_time_ms.tolist() == [T0, T0 + H, T0 + 2 * H]
    assert s.proba[2].tolist() == pytest.approx([0.1, 0.1, 0.8])  # the last version served for candle 2
    assert s.label[2] == 0  # 103 -> 99: down
    j2.stop()


def test_journal_ignores_in_sample_and_not_ready(engine):
    model = _model()
    j = Journal(engine)
    times = T0 + H * np.arange(-3, 6)
    closes = 100.0 + np.arange(9)
    ready = np.array([True, True, True, True, False, True, True, True, True])
    j.record(model, *_answer(times, closes, np.tile([[0.3, 0.4, 0.3]], (9, 1)), ready=ready))
    j.stop()
    s = _scores(engine)
    # in-sample: times <= T0 - H; not ready: T0 + H; realised: up to T0 + 2H (T0 + 5H is the last candle)
    assert s.open_time_ms.tolist() == [T0, T0 + 2 * H]


def test_journal_bounds_pending_and_candles(engine):
    model = _model()
    now = [T0 / 1000 + 40 * 3600]  # the journal's wall clock, seconds
    j = Journal(engine, clock=lambda: now[0])
    # a gap right after candle 0: its label can never be realised
    j.record(model, *_answer([T0], [100.0], [[0.3, 0.4, 0.3]]))
    times = T0 + H * np.arange(2, 40)
    j.record(model, *_answer(times, np.full(len(times), 100.0), np.tile([[0.3, 0.4, 0.3]], (len(times), 1)),
                             ready=np.zeros(len(times), bool)))
    j.stop()
    with engine.connect() as conn:
        pending = conn.execute(sa.text("select count(*) from live_predictions")).scalar()
    assert pending == 0  # dropped once the candles moved horizon + margin past it
    assert len(_scores(engine).label) == 0
    now[0] += PRUNE_GRACE_SECONDS + 1  # candles received in the grace period are kept: another replica may need them
    j.maintain()
    with engine.connect() as conn:
        assert conn.execute(sa.text("select count(*) from live_candles")).scalar() == 0
