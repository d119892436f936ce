"""Time conversions: one rule for naive datetimes, exact milliseconds, protobuf Timestamps and ISO text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pandas as pd
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from shared.timeframes import (
    datetime_to_ms,
    ms_to_datetime,
    ms_to_iso,
    ms_to_timestamp,
    parse_duration,
    parse_time,
    timeframe_ms,
)

T2019 = 1_546_300_800_000  # 2019-01-01T00:00:00Z
# 0001-01-01 .. 9999-12-31, the range a datetime can hold.
MS_RANGE = st.integers(-62_135_596_800_000, 253_402_300_799_999)


def test_aware_datetimes_in_any_zone_give_utc_epoch_ms():
    assert datetime_to_ms(datetime(2019, 1, 1, tzinfo=UTC)) == T2019
    assert datetime_to_ms(datetime(2019, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))) == T2019
    assert datetime_to_ms(pd.Timestamp("2019-01-01 01:00", tz="Europe/Berlin")) == T2019
    assert datetime_to_ms(datetime(2019, 1, 1, 0, 0, 0, 123_000, tzinfo=UTC)) == T2019 + 123
    assert datetime_to_ms(datetime(1969, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)) == -1


def test_naive_datetimes_are_refused_not_guessed():
    with pytest.raises(ValueError, match="no time zone"):
        datetime_to_ms(datetime(2019, 1, 1))
    with pytest.raises(ValueError, match="no time zone"):
        datetime_to_ms(pd.Timestamp("2019-01-01"))


def test_sub_millisecond_precision_is_refused_not_rounded():
    with pytest.raises(ValueError, match="sub-millisecond"):
        datetime_to_ms(datetime(2019, 1, 1, 0, 0, 0, 500, tzinfo=UTC))
    with pytest.raises(ValueError, match="sub-millisecond"):
        datetime_to_ms(pd.Timestamp("2019-01-01 00:00:00.000000001", tz="UTC"))
    with pytest.raises(ValueError, match="sub-millisecond"):
        parse_time("2019-01-01T00:00:00.0005Z")


def test_iso_text_without_an_offset_is_utc():
    assert parse_time("2019-01-01") == T2019
    assert parse_time("2019-01-01T00:00:00") == T2019
    assert parse_time(" 2019-01-01T00:00:00Z ") == T2019
    assert parse_time("2019-01-01T01:00:00+01:00") == T2019
    assert parse_time("2019-01-01T00:00:00.250Z") == T2019 + 250
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_time("yesterday")


@given(MS_RANGE)
def test_epoch_ms_round_trips_exactly_through_datetime_and_timestamp(ms):
    dt = ms_to_datetime(ms)
    assert dt.tzinfo is not None and dt.utcoffset() == timedelta(0)
    assert datetime_to_ms(dt) == ms
    t = ms_to_timestamp(ms)
    assert isinstance(t, Timestamp) and t.ToMilliseconds() == ms


def test_timestamp_of_none_stays_none_so_optional_fields_stay_unset():
    assert ms_to_timestamp(None) is None
    t = ms_to_timestamp(T2019 + 7)
    assert (t.seconds, t.nanos) == (T2019 // 1000, 7_000_000)


def test_iso_text_is_utc_with_z_at_second_resolution():
    assert ms_to_iso(T2019) == "2019-01-01T00:00:00Z"
    assert ms_to_iso(T2019 + 3_600_999) == "2019-01-01T01:00:00Z"
    assert parse_time(ms_to_iso(T2019 + 3_600_000)) == T2019 + 3_600_000


def test_timeframes_and_durations():
    assert timeframe_ms("1h") == 3_600_000 and timeframe_ms("1d") == 86_400_000
    with pytest.raises(ValueError, match="not supported"):
        timeframe_ms("2h")
    assert parse_duration("2w") == 14 * 86_400_000 and parse_duration(" 90M ") == 90 * 60_000
    with pytest.raises(ValueError, match="positive duration"):
        parse_duration("0d")
