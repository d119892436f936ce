"""Funding rate that covers only part of the window: the documented coverage rule decides, and the model reports
the window it was really trained on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from shared.labels import LabelSpec
from shared.params import ForestParams
from training_service.pipeline import train

PARAMS = ForestParams(n_estimators=10)


@pytest.fixture(scope="module")
def window(sample_frame) -> pd.DataFrame:
    t = sample_frame["open_time_ms"]
    start = int(pd.Timestamp("2018-01-01", tz="UTC").value // 1_000_000)
    end = int(pd.Timestamp("2018-07-01", tz="UTC").value // 1_000_000)
    return sample_frame[(t >= start) & (t < end)].reset_index(drop=True)


def test_funding_on_10_percent_of_the_window_is_left_out_and_the_whole_window_trains(window):
    frame = window.copy()
    n = len(frame)
    frame["funding_rate"] = np.where(np.arange(n) >= n - n // 10, 0.0001, np.nan)
    model = train(frame, LabelSpec(), PARAMS, n_jobs=1)
    assert not model.spec.use_funding_rate
    assert model.train_start_ms == int(frame["open_time_ms"].iloc[0])
    assert model.train_end_ms == int(frame["open_time_ms"].iloc[-1])


def test_funding_on_95_percent_is_used_and_train_start_is_where_the_data_starts(window):
    frame = window.copy()
    n = len(frame)
    first = n // 20
    frame["funding_rate"] = np.where(np.arange(n) >= first, 0.0001 * np.sin(np.arange(n)), np.nan)
    model = train(frame, LabelSpec(), PARAMS, n_jobs=1)
    assert model.spec.use_funding_rate
    # the first row with every feature needs funding_window values of funding rate behind it
    first_trained = first + model.spec.funding_window - 1
    want = int(frame["open_time_ms"].iloc[first_trained - (model.spec.warmup_bars - 1)])
    assert model.train_start_ms == want > int(frame["open_time_ms"].iloc[0])
