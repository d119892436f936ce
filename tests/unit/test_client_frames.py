"""The client's conversions without a server: times, frames <-> Candle messages <-> prediction columns, batch plans."""

from __future__ import annotations

import collections
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mlsignal import client as mc
from mlsignal.client.frames import candle_from_item
from mlsignal.v1 import common_pb2, inference_pb2

T2019 = 1_546_300_800_000
HOUR_MS = 3_600_000


def frame(n: int = 4) -> pd.DataFrame:
    close = 100.0 + np.arange(n, dtype=np.float64)
    return pd.DataFrame(
        {"open": close - 0.5, "high": close + 1.0, "low": close - 1.0, "close": close, "volume": np.full(n, 3.0)},
        index=pd.date_range("2019-01-01", periods=n, freq="h", tz="UTC", name="open_time"),
    )


def answers(candles, ready) -> list[inference_pb2.Prediction]:
    return [inference_pb2.Prediction(open_time_ms=c.open_time_ms, ml_up_prob=0.25, ml_down_prob=0.5,
                                     ml_range_prob=0.25, ready=r, in_sample=False)
            for c, r in zip(candles, ready, strict=True)]


# ----------------------------------------------------------------------------------------------------------------------
# to_epoch_ms: the shared naive-datetime rule


def test_to_epoch_ms_follows_the_shared_rule_for_datetimes():
    assert mc.to_epoch_ms(datetime(2019, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == T2019
    assert mc.to_epoch_ms(pd.Timestamp("2019-01-01", tz="UTC")) == T2019
    with pytest.raises(ValueError, match=r"^start: .*no time zone"):
        mc.to_epoch_ms(datetime(2019, 1, 1), "start")
    with pytest.raises(ValueError, match=r"^end: .*sub-millisecond"):
        mc.to_epoch_ms(datetime(2019, 1, 1, microsecond=1, tzinfo=UTC), "end")


def test_to_epoch_ms_reads_text_as_utc_and_refuses_ambiguous_numbers():
    assert mc.to_epoch_ms("2019-01-01") == T2019
    assert mc.to_epoch_ms(np.int64(T2019)) == T2019
    with pytest.raises(ValueError, match="epoch seconds"):
        mc.to_epoch_ms(T2019 // 1000)
    for bad in (1.5e12, True, np.datetime64("2019-01-01"), None):
        with pytest.raises(ValueError):
            mc.to_epoch_ms(bad)


# ----------------------------------------------------------------------------------------------------------------------
# frames <-> messages


def test_frame_times_come_from_the_index_or_a_time_column():
    expected = [T2019 + i * HOUR_MS for i in range(3)]
    df = frame(3)
    assert mc.frame_times_ms(df).tolist() == expected
    assert mc.frame_times_ms(df.tz_convert("America/New_York")).tolist() == expected
    flat = df.reset_index(drop=True)
    assert mc.frame_times_ms(flat.assign(open_time_ms=expected)).tolist() == expected
    assert mc.frame_times_ms(flat.assign(timestamp=df.index)).tolist() == expected
    with pytest.raises(ValueError, match="tz-naive"):
        mc.frame_times_ms(df.tz_localize(None))
    with pytest.raises(ValueError, match="epoch seconds"):
        mc.frame_times_ms(flat.assign(open_time_ms=[t // 1000 for t in expected]))
    with pytest.raises(ValueError, match="no candle times"):
        mc.frame_times_ms(flat)


def test_frame_to_candles_to_predictions_round_trip_keeps_rows_and_times():
    df = frame(4)
    df["funding_rate"] = [1e-4, np.nan, 0.0, np.nan]
    candles = mc.frame_to_candles(df)
    assert [c.open_time_ms for c in candles] == mc.frame_times_ms(df).tolist()
    assert [c.close for c in candles] == df["close"].tolist()
    assert [c.HasField("funding_rate") for c in candles] == [True, False, True, False]
    assert not any(c.HasField("open_interest") for c in candles)

    out = mc.predictions_to_frame(df, answers(candles, [False, True, True, True]), "m1")
    pd.testing.assert_frame_equal(out[df.columns], df)
    assert list(out.columns) == [*df.columns, *mc.ML_COLUMNS]
    assert np.isnan(out["ML_UP_PROB"].iat[0]) and out["ML_UP_PROB"].iloc[1:].tolist() == [0.25] * 3
    # the candles rebuilt from the output frame are the candles sent
    assert mc.frame_to_candles(out) == candles


def test_predictions_out_of_order_never_misalign():
    df = frame(3)
    preds = answers(mc.frame_to_candles(df), [True] * 3)
    with pytest.raises(mc.ProtocolError, match="prediction 0"):
        mc.predictions_to_frame(df, [preds[1], preds[0], preds[2]], "m")


def test_candle_from_item_reads_every_row_shape_alike():
    df = frame(2)
    expected = mc.frame_to_candles(df)[0]
    row = df.iloc[0]
    items = [
        expected,
        {"open_time_ms": T2019, **row.to_dict()},
        {"timestamp": "2019-01-01T00:00:00Z", **row.to_dict()},
        row,  # a Series named by its open time
        next(df.iterrows()),
        next(df.itertuples()),
    ]
    for item in items:
        assert candle_from_item(item) == expected, type(item)
    assert not candle_from_item({**items[1], "open_interest": float("nan")}).HasField("open_interest")
    with pytest.raises(ValueError, match="no time"):
        candle_from_item(row.to_dict())
    with pytest.raises(ValueError, match="no 'volume'"):
        candle_from_item({"open_time_ms": T2019, "open": 1.0, "high": 1.0, "low": 1.0, "close": 1.0})
    with pytest.raises(ValueError, match="must be a number"):
        candle_from_item({"open_time_ms": T2019, **row.to_dict(), "close": True})
    with pytest.raises(ValueError, match="cannot read a candle"):
        candle_from_item(42)
    assert isinstance(candle_from_item(items[1]), common_pb2.Candle)


# ----------------------------------------------------------------------------------------------------------------------
# batch_plan


@given(n=st.integers(0, 400), max_batch=st.integers(1, 60), overlap=st.integers(0, 59))
def test_batch_plan_keeps_every_row_once_with_its_full_history(n, max_batch, overlap):
    if n > max_batch and overlap >= max_batch:
        with pytest.raises(ValueError, match="raise max_batch"):
            mc.batch_plan(n, max_batch, overlap)
        return
    plan = mc.batch_plan(n, max_batch, overlap)
    kept = collections.Counter()
    for start, stop, keep_from in plan:
        assert 0 <= start <= keep_from < stop <= n
        assert stop - start <= max_batch
        # a kept row sees as much history inside its request as in one request over all rows, up to `overlap`
        assert keep_from - start >= min(overlap, keep_from)
        kept.update(range(keep_from, stop))
    assert sorted(kept) == list(range(n)) and set(kept.values()) <= {1}


def test_batch_plan_examples_and_bad_arguments():
    assert mc.batch_plan(0, 5, 2) == []
    assert mc.batch_plan(5, 5, 9) == [(0, 5, 0)]  # one request needs no overlap
    assert mc.batch_plan(10, 6, 2) == [(0, 6, 0), (4, 10, 6)]
    for args in ((-1, 5, 0), (5, 0, 0), (5, 5, -1)):
        with pytest.raises(ValueError, match="bad batch plan"):
            mc.batch_plan(*args)
