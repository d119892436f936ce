"""Walk-forward signals through the real training and inference services: out-of-sample by construction and by check."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest

from mlsignal.client import InferenceClient, TrainingClient
from mlsignal.walkforward import (
    DAY_MS,
    LeakageError,
    check_out_of_sample,
    plan_steps,
    read_signals,
    walk_forward,
    write_signals,
)
from service_fixtures import ms
from shared.store.db import make_engine
from shared.store.marketdata import insert_candles

# A symbol of its own, so the models trained here never become the serving model of another test's symbol.
SYMBOL, TF, TF_MS = "WF/USD", "1h", 3_600_000
START, END = ms("2019-01-01"), ms("2019-03-01")
WINDOW, STEP = 120 * DAY_MS, 20 * DAY_MS
HORIZON = 24
PURGE = HORIZON * TF_MS
SEED = 7
ML = ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY", "ML_IN_SAMPLE"]


@pytest.fixture(scope="module")
def candles(services, sample_frame) -> pd.DataFrame:
    engine = make_engine(services.url)
    try:
        insert_candles(engine, SYMBOL, TF, sample_frame)
    finally:
        engine.dispose()
    keep = (sample_frame.open_time_ms >= START - WINDOW - PURGE) & (sample_frame.open_time_ms < END)
    return sample_frame[keep].reset_index(drop=True)


@pytest.fixture(scope="module")
def clients(services):
    training = TrainingClient(f"127.0.0.1:{services.training.port}")
    inference = InferenceClient(f"127.0.0.1:{services.inference.port}")
    yield training, inference
    training.close()
    inference.close()


def run(clients, candles, on_progress=None) -> pd.DataFrame:
    training, inference = clients
    return walk_forward(training, inference, candles, SYMBOL, TF, START, END, WINDOW, STEP, horizon_bars=HORIZON,
                        threshold=0.02, n_estimators=20, random_state=SEED, on_progress=on_progress)


@pytest.fixture(scope="module")
def first(clients, candles):
    calls = []
    out = run(clients, candles, on_progress=lambda done, total, msg: calls.append((done, total, msg)))
    return out, calls


@pytest.fixture(scope="module")
def second(clients, candles):
    return run(clients, candles)


def test_plan_steps_cut_the_period_and_purge_the_training_windows():
    steps = plan_steps(START, END, WINDOW, STEP, PURGE)
    assert [s.start_ms for s in steps] == [START, START + STEP, START + 2 * STEP]
    assert [s.end_ms for s in steps] == [START + STEP, START + 2 * STEP, END]
    for s in steps:
        assert s.train_end_ms == s.start_ms - PURGE
        assert s.train_start_ms == s.start_ms - PURGE - WINDOW
    with pytest.raises(ValueError):
        plan_steps(END, START, WINDOW, STEP, PURGE)
    with pytest.raises(ValueError):
        plan_steps(START, END, WINDOW, 0, PURGE)


def test_one_row_per_candle_of_the_period(first, candles):
    out, _ = first
    period = candles[(candles.open_time_ms >= START) & (candles.open_time_ms < END)]
    assert out.open_time_ms.tolist() == period.open_time_ms.tolist()
    for col in ("open", "high", "low", "close", "volume"):
        assert np.array_equal(out[col].to_numpy(), period[col].to_numpy())
    assert (out.timestamp == pd.to_datetime(out.open_time_ms, unit="ms", utc=True)).all()
    assert str(out.timestamp.dt.tz) == "UTC"


def test_every_row_comes_from_a_model_trained_only_on_earlier_data(first, clients):
    out, _ = first
    assert not out.ML_IN_SAMPLE.any()
    assert (out.open_time_ms > out.train_end_ms + PURGE).all()
    training, _ = clients
    models = {m.model_id: m for m in training.list_models(SYMBOL, TF)}
    steps = plan_steps(START, END, WINDOW, STEP, PURGE)
    for k, rows in out.groupby("step"):
        step = steps[k]
        assert ((rows.open_time_ms >= step.start_ms) & (rows.open_time_ms < step.end_ms)).all()
        (model_id,) = rows.ML_MODEL_ID.unique()  # each step's rows come from one model
        info = models[model_id]
        assert info.label.horizon_bars == HORIZON
        assert rows.train_end_ms.iat[0] == info.train_end.ToMilliseconds()
        assert rows.train_start_ms.iat[0] == info.train_start.ToMilliseconds()
        # the label each row's model answers, which a backtest holds
        assert rows.ML_HORIZON_BARS.eq(info.label.horizon_bars).all() and info.label.horizon_bars == HORIZON
        assert rows.ML_THRESHOLD.eq(info.label.threshold).all() and info.label.threshold == 0.02
        assert (rows.ML_LABEL_KIND == "fixed_horizon").all()
        assert rows.ML_VOLATILITY_BARS.eq(0).all() and rows.ML_BARRIER.eq(0.02).all()
        # the sample has no gaps: the last training candle opens one candle before the purged end of the window
        assert info.train_end.ToMilliseconds() == step.start_ms - PURGE - TF_MS
        assert info.train_start.ToMilliseconds() == step.start_ms - PURGE - WINDOW


def test_funding_rate_is_written_only_when_the_candles_carry_it(first):
    out, _ = first
    assert "funding_rate" not in out.columns  # the sample has no funding rate stored


def test_several_distinct_models_one_per_step(first):
    out, calls = first
    per_step = out.groupby("step").ML_MODEL_ID.first()
    assert len(per_step) == 3 and per_step.nunique() == 3
    assert out.train_end_ms.is_monotonic_increasing
    assert [c[:2] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]


def test_probabilities_are_ready_sum_to_one_and_vary(first):
    out, _ = first
    assert out.ML_READY.all()  # enough history was sent before each step
    p = out[["ML_DOWN_PROB", "ML_RANGE_PROB", "ML_UP_PROB"]].to_numpy()
    assert np.allclose(p.sum(axis=1), 1.0, atol=1e-9)
    assert ((p > 0) & (p < 1)).all()
    up = out.ML_UP_PROB.to_numpy()
    assert up.std() > 1e-3
    assert len(np.unique(up)) > 0.5 * len(up)


def test_rerun_with_the_same_seed_is_identical(first, second):
    out, _ = first
    assert len(second) == len(out)
    for col in ML:
        assert np.array_equal(second[col].to_numpy(), out[col].to_numpy()), col
    assert np.array_equal(second.train_end_ms, out.train_end_ms)
    assert set(second.ML_MODEL_ID).isdisjoint(set(out.ML_MODEL_ID))  # new models, the same probabilities


def test_history_before_the_step_is_not_output_and_missing_history_means_not_ready(clients, candles):
    training, inference = clients
    start, end = START + 2 * STEP, START + 2 * STEP + 6 * DAY_MS
    few = candles[candles.open_time_ms >= start - 10 * TF_MS]  # only 10 candles of history
    out = walk_forward(training, inference, few, SYMBOL, TF, start, end, WINDOW, 10 * DAY_MS, horizon_bars=HORIZON,
                       threshold=0.02, n_estimators=20, random_state=SEED)
    assert out.open_time_ms.iat[0] == start and out.open_time_ms.iat[-1] == end - TF_MS
    (info,) = [m for m in training.list_models(SYMBOL, TF) if m.model_id == out.ML_MODEL_ID.iat[0]]
    first_ready = info.warmup_bars - 1 - 10  # a row needs warmup_bars candles, its own included
    assert 0 < first_ready < len(out)
    assert not out.ML_READY.iloc[:first_ready].any() and out.ML_READY.iloc[first_ready:].all()
    assert out.ML_UP_PROB[~out.ML_READY].isna().all() and out.ML_UP_PROB[out.ML_READY].notna().all()


def test_the_out_of_sample_check_raises(first):
    out, _ = first
    check_out_of_sample(out, PURGE)
    late = out.copy()
    late.loc[5, "train_end_ms"] = late.loc[5, "open_time_ms"] - PURGE  # not later than train_end + horizon
    with pytest.raises(LeakageError, match="not later"):
        check_out_of_sample(late, PURGE)
    ins = out.copy()
    ins.loc[7, "ML_IN_SAMPLE"] = True
    with pytest.raises(LeakageError, match="in-sample"):
        check_out_of_sample(ins, PURGE)


def test_write_and_read_signals_round_trip_exactly(first, tmp_path):
    out, _ = first
    path = write_signals(out, tmp_path / "signals.csv")
    back = read_signals(path)
    assert back.columns.tolist() == out.columns.tolist()
    for col in (*ML, "ML_MODEL_ID", "open_time_ms", "close", "train_end_ms"):
        assert np.array_equal(back[col].to_numpy(), out[col].to_numpy()), col
    assert (back.timestamp == out.timestamp).all()
    with pytest.raises(ValueError, match="unknown signal file type"):
        write_signals(out, tmp_path / "signals.txt")
    if importlib.util.find_spec("pyarrow") is None:
        with pytest.raises(ValueError, match="pyarrow"):
            write_signals(out, tmp_path / "signals.parquet")
    else:
        back = read_signals(write_signals(out, tmp_path / "signals.parquet"))
        assert np.array_equal(back.ML_UP_PROB.to_numpy(), out.ML_UP_PROB.to_numpy())
