"""The candle store and the file importers: parsing, validation, resampling, gaps, idempotent inserts, as-of joins."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from shared.errors import InvalidArgument
from shared.store.db import make_engine
from shared.store.importers import ImportRejected, detect_format, find_gaps, read_candles, read_series, resample
from shared.store.marketdata import (
    count_candles,
    insert_candles,
    insert_series,
    load_candles,
    load_series,
    summarize,
    summarize_series,
)
from shared.symbols import validate_symbol
from shared.timeframes import parse_time

H = 3_600_000
M5 = 300_000
T0 = parse_time("2024-01-01T00:00:00Z")
GAP_START = parse_time("2023-03-24T12:40:00Z")
BINANCE_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore"
)


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def candle_frame(times_ms, base: float = 100.0) -> pd.DataFrame:
    """Valid candles at the given open times; prices step by 1 so that every row is distinguishable."""
    t = np.asarray(times_ms, dtype=np.int64)
    o = base + np.arange(len(t), dtype=float)
    return pd.DataFrame({"open_time_ms": t, "open": o, "high": o + 2, "low": o - 1, "close": o + 1, "volume": 10.0})


def write(path, text: str):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------------------------
# symbols and formats


@pytest.mark.parametrize("symbol", ["BTC/USDT", "BTC/USD", "1INCH/USDT", "ETH/BTC"])
def test_validate_symbol_accepts(symbol):
    assert validate_symbol(symbol) == symbol


@pytest.mark.parametrize("symbol", ["", "BTCUSDT", "btc/usdt", "BTC-USDT", " BTC/USDT", "BTC/USDT/X", "BTC/", "/USDT"])
def test_validate_symbol_rejects(symbol):
    with pytest.raises(InvalidArgument) as exc:
        validate_symbol(symbol)
    assert exc.value.field == "symbol"
    assert "BTC/USDT" in str(exc.value)


def test_detect_format(tmp_path, sample_csv, binance_csv):
    assert detect_format(sample_csv) == "csv"
    assert detect_format(binance_csv) == "binance"
    assert detect_format(write(tmp_path / "h.csv", BINANCE_HEADER + "\n" + binance_csv.read_text())) == "binance"
    with pytest.raises(ImportRejected) as exc:
        detect_format(write(tmp_path / "x.csv", "time,price\n1,2\n"))
    assert exc.value.line == 1 and "--format" in exc.value.reason


# --------------------------------------------------------------------------------------------------------------------
# reading files


def test_generic_csv_iso_epoch_and_gzip_agree(tmp_path):
    rows = [("2024-01-01T02:00:00Z", 3), ("2024-01-01T00:00:00Z", 1), ("2024-01-01T01:00:00Z", 2)]  # unsorted
    iso = "timestamp,open,high,low,close,volume\n" + "".join(
        f"{t},{p},{p + 1},{p - 0.5},{p + 0.5},{p * 10}\n" for t, p in rows
    )
    epoch = "timestamp,open,high,low,close,volume\n" + "".join(
        f"{parse_time(t)},{p},{p + 1},{p - 0.5},{p + 0.5},{p * 10}\n" for t, p in rows
    )
    a = read_candles(write(tmp_path / "iso.csv", iso), "1h")
    b = read_candles(write(tmp_path / "epoch.csv", epoch), "1h", fmt="csv")
    c = read_candles(write(tmp_path / "iso.csv.gz", iso), "1h")
    expected = pd.DataFrame(
        {"open_time_ms": [T0, T0 + H, T0 + 2 * H], "open": [1.0, 2.0, 3.0], "high": [2.0, 3.0, 4.0],
         "low": [0.5, 1.5, 2.5], "close": [1.5, 2.5, 3.5], "volume": [10.0, 20.0, 30.0]}
    )  # fmt: skip
    for df in (a, b, c):
        pd.testing.assert_frame_equal(df, expected)


def test_generic_csv_columns_in_any_order_and_case(tmp_path):
    text = "Volume,Close,Low,High,Open,Timestamp,source\n5,1.5,0.5,2,1,2024-01-01T00:00:00Z,x\n"
    df = read_candles(write(tmp_path / "c.csv", text), "1h")
    assert df.iloc[0].to_dict() == {
        "open_time_ms": T0, "open": 1.0, "high": 2.0, "low": 0.5, "close": 1.5, "volume": 5.0
    }  # fmt: skip


def test_sample_reads_complete(sample_csv):
    df = read_candles(sample_csv, "1h")
    assert len(df) == 20111
    assert list(df.columns) == ["open_time_ms", "open", "high", "low", "close", "volume"]
    assert df["open_time_ms"].dtype == np.int64
    assert df["open_time_ms"].iloc[0] == parse_time("2017-07-01T11:00:00Z")
    assert df["open_time_ms"].iloc[-1] == parse_time("2019-10-17T09:00:00Z")
    assert find_gaps(df["open_time_ms"], H) == []


def test_binance_milliseconds_microseconds_and_header_agree(tmp_path, binance_csv):
    lines = binance_csv.read_text().splitlines()[:5]
    micro = []
    for line in lines:
        f = line.split(",")
        f[0], f[6] = str(int(f[0]) * 1000), str(int(f[6]) * 1000 + 999)
        micro.append(",".join(f))
    ms = read_candles(write(tmp_path / "ms.csv", "\n".join(lines) + "\n"), "5m")
    us = read_candles(write(tmp_path / "us.csv", "\n".join(micro) + "\n"), "5m")
    headed = write(tmp_path / "h.csv", "\n".join([BINANCE_HEADER, *lines]) + "\n")
    with_header = read_candles(headed, "5m", fmt="binance")
    pd.testing.assert_frame_equal(ms, us)
    pd.testing.assert_frame_equal(ms, with_header)
    assert ms["open_time_ms"].tolist() == [parse_time("2023-03-20T00:00:00Z") + i * M5 for i in range(5)]
    first = ms.iloc[0][["open", "high", "low", "close", "volume"]].tolist()
    assert first == [27972.87, 28038.28, 27941.97, 27953.83, 1975.47751]


def test_binance_sample_has_one_gap_of_16_candles(binance_csv):
    df = read_candles(binance_csv, "5m")
    assert len(df) == 2576
    assert find_gaps(df["open_time_ms"], M5) == [(GAP_START, 16)]


def test_binance_close_time_longer_than_timeframe_is_rejected(binance_csv):
    # 5m klines declared as 1m: the first open time is aligned to 1m too, so close_time is what catches it.
    with pytest.raises(ImportRejected) as exc:
        read_candles(binance_csv, "1m")
    assert exc.value.line == 1 and "close_time" in exc.value.reason and "--timeframe" in exc.value.reason


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        ("2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,oops\n", 3, "cannot parse value 'oops'"),
        ("2024-01-01T00:00:00Z,1\n2024-01-01T01:00:00Z,nan\n", 3, "value is nan; expected a finite number"),
        ("2024-01-01T00:00:00Z,1\nyesterday,2\n", 3, "cannot parse timestamp 'yesterday'"),
        ("2024-01-01T00:00:00Z,1\n2024-01-01T00:00:00Z,2\n", 3, "duplicate timestamp 2024-01-01T00:00:00Z (also on"),
    ],
)
def test_series_rejections(tmp_path, body, line, reason):
    with pytest.raises(ImportRejected) as exc:
        read_series(write(tmp_path / "s.csv", "timestamp,value\n" + body), "funding-rate")
    assert exc.value.line == line
    assert reason in exc.value.reason


def test_series_reads_unaligned_times_and_negative_funding(tmp_path):
    # Exchanges stamp funding a few milliseconds after the hour; that is the real publication time, kept as it is.
    text = f"timestamp,value\n{T0 + 8 * H + 3},-0.0001\n{T0},0.0002\n"
    df = read_series(write(tmp_path / "f.csv", text), "funding-rate")
    assert df["time_ms"].tolist() == [T0, T0 + 8 * H + 3]
    assert df["value"].tolist() == [0.0002, -0.0001]
    with pytest.raises(ImportRejected) as exc:
        read_series(write(tmp_path / "oi.csv", text), "open-interest")
    assert exc.value.line == 2 and "it must be > 0" in exc.value.reason
    with pytest.raises(ImportRejected) as exc:  # no open interest at all is not a value: refused like a negative one
        read_series(write(tmp_path / "oi0.csv", f"timestamp,value\n{T0},5\n{T0 + H},0\n"), "open-interest")
    assert exc.value.line == 3 and exc.value.reason == "open interest is 0; it must be > 0"


# --------------------------------------------------------------------------------------------------------------------
# resampling and gaps


def test_resample_keeps_complete_buckets_only_with_hand_checked_values():
    # 15m buckets from 5m candles: [00:00 complete], [00:15 lacks 00:20], [00:30 complete]
    df = pd.DataFrame(
        {
            "open_time_ms": [T0, T0 + M5, T0 + 2 * M5, T0 + 3 * M5, T0 + 5 * M5, T0 + 6 * M5, T0 + 7 * M5, T0 + 8 * M5],
            "open": [10.0, 11.0, 12.0, 50.0, 51.0, 20.0, 21.0, 22.0],
            "high": [12.0, 15.0, 13.0, 99.0, 99.0, 21.0, 25.0, 23.0],
            "low": [9.0, 10.0, 8.0, 1.0, 1.0, 19.0, 20.0, 18.0],
            "close": [11.0, 12.0, 12.5, 51.0, 52.0, 21.0, 22.0, 22.5],
            "volume": [1.0, 2.0, 3.0, 100.0, 100.0, 4.0, 5.0, 6.0],
        }
    )
    out = resample(df, "5m", "15m")
    expected = pd.DataFrame(
        {"open_time_ms": [T0, T0 + 6 * M5], "open": [10.0, 20.0], "high": [15.0, 25.0], "low": [8.0, 18.0],
         "close": [12.5, 22.5], "volume": [6.0, 15.0]}
    )  # fmt: skip
    pd.testing.assert_frame_equal(out, expected)


def test_resample_binance_5m_to_1h(binance_csv):
    df = read_candles(binance_csv, "5m")
    out = resample(df, "5m", "1h")
    # 9 days = 216 hours; 12:00 on 2023-03-24 is incomplete (the gap starts at 12:40) and 13:00 has no candle at all.
    assert len(out) == 214
    assert parse_time("2023-03-24T12:00:00Z") not in set(out["open_time_ms"])
    assert find_gaps(out["open_time_ms"], H) == [(parse_time("2023-03-24T12:00:00Z"), 2)]
    hours = df.assign(hour=df["open_time_ms"] // H * H).groupby("hour")
    ref = hours.agg(open=("open", "first"), high=("high", "max"), low=("low", "min"), close=("close", "last"),
                    volume=("volume", "sum"), n=("open", "size"))  # fmt: skip
    ref = ref[ref["n"] == 12].drop(columns="n").reset_index().rename(columns={"hour": "open_time_ms"})
    pd.testing.assert_frame_equal(out, ref.astype({"open_time_ms": np.int64}), check_exact=False, rtol=1e-12)


@pytest.mark.parametrize(("src", "dst"), [("1h", "5m"), ("1h", "1h"), ("5m", "2h")])
def test_resample_rejects_shorter_equal_or_unknown_target(src, dst):
    with pytest.raises(InvalidArgument) as exc:
        resample(candle_frame([T0]), src, dst)
    assert exc.value.field == "resample"


def test_find_gaps():
    assert find_gaps([], H) == []
    assert find_gaps([T0], H) == []
    assert find_gaps([T0, T0 + H, T0 + 4 * H, T0 + 5 * H, T0 + 7 * H], H) == [(T0 + 2 * H, 2), (T0 + 6 * H, 1)]


# --------------------------------------------------------------------------------------------------------------------
# the store (SQLite and PostgreSQL)


def test_insert_load_roundtrip_is_exact(engine, sample_csv):
    df = read_candles(sample_csv, "1h")
    assert insert_candles(engine, "BTC/USD", "1h", df) == (20111, 0)
    loaded = load_candles(engine, "BTC/USD", "1h")
    assert list(loaded.columns) == [
        "open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest"
    ]  # fmt: skip
    assert loaded["open_time_ms"].dtype == np.int64
    assert all(loaded[c].dtype == np.float64 for c in loaded.columns[1:])
    pd.testing.assert_frame_equal(loaded[df.columns], df, check_exact=True)
    assert loaded["funding_rate"].isna().all() and loaded["open_interest"].isna().all()
    assert count_candles(engine, "BTC/USD", "1h") == 20111
    assert summarize(engine) == [
        {"symbol": "BTC/USD", "timeframe": "1h", "first_ms": int(df["open_time_ms"].iloc[0]),
         "last_ms": int(df["open_time_ms"].iloc[-1]), "rows": 20111, "gaps": 0}
    ]  # fmt: skip


def test_load_and_count_use_half_open_ranges(engine):
    insert_candles(engine, "BTC/USDT", "1h", candle_frame([T0 + i * H for i in range(10)]))
    part = load_candles(engine, "BTC/USDT", "1h", T0 + 2 * H, T0 + 5 * H)
    assert part["open_time_ms"].tolist() == [T0 + 2 * H, T0 + 3 * H, T0 + 4 * H]
    assert count_candles(engine, "BTC/USDT", "1h", T0 + 2 * H, T0 + 5 * H) == 3
    assert count_candles(engine, "BTC/USDT", "1h", start_ms=T0 + 8 * H) == 2
    assert count_candles(engine, "BTC/USDT", "1h", end_ms=T0 + H) == 1
    assert count_candles(engine, "BTC/USDT", "5m") == 0
    empty = load_candles(engine, "ETH/USDT", "1h")
    assert empty.empty and empty["open_time_ms"].dtype == np.int64 and empty["close"].dtype == np.float64
    with pytest.raises(InvalidArgument) as exc:
        load_candles(engine, "BTC/USDT", "1h", T0 + 5 * H, T0 + 5 * H)
    assert exc.value.field == "start_ms"
    with pytest.raises(InvalidArgument) as exc:
        count_candles(engine, "BTC/USDT", "2h")
    assert exc.value.field == "timeframe"


def test_insert_is_idempotent_and_never_updates(engine):
    first = candle_frame([T0 + i * H for i in range(5)])
    assert insert_candles(engine, "BTC/USDT", "1h", first) == (5, 0)
    before = load_candles(engine, "BTC/USDT", "1h")
    assert insert_candles(engine, "BTC/USDT", "1h", first) == (0, 5)
    # Overlapping data with different prices: new keys are added, existing ones keep their stored values.
    overlap = candle_frame([T0 + i * H for i in range(3, 8)], base=500.0)
    assert insert_candles(engine, "BTC/USDT", "1h", overlap) == (3, 2)
    after = load_candles(engine, "BTC/USDT", "1h")
    pd.testing.assert_frame_equal(after.iloc[:5].reset_index(drop=True), before)
    assert after["open"].tolist()[5:] == [502.0, 503.0, 504.0]
    # Same times under another symbol or timeframe are different keys.
    assert insert_candles(engine, "ETH/USDT", "1h", first) == (5, 0)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"high": 50.0}, "high"),  # below low
        ({"close": np.nan}, "close"),
        ({"open": 0.0}, "open"),
        ({"volume": -1.0}, "volume"),
        ({"open_time_ms": T0 + 1}, "open_time_ms"),  # not aligned
        ({"open_time_ms": T0 + H}, "open_time_ms"),  # duplicate
    ],
)
def test_insert_rejects_invalid_frames_and_stores_nothing(engine, change, field):
    df = candle_frame([T0 + i * H for i in range(4)])
    for col, value in change.items():
        df.loc[2, col] = value
    with pytest.raises(InvalidArgument) as exc:
        insert_candles(engine, "BTC/USDT", "1h", df)
    assert exc.value.field == field and "row 2" in str(exc.value)
    assert count_candles(engine, "BTC/USDT", "1h") == 0


def test_series_insert_is_idempotent_and_validated(engine):
    fr = pd.DataFrame({"time_ms": [T0, T0 + 8 * H], "value": [0.0001, -0.0002]})
    assert insert_series(engine, "funding-rate", "BTC/USDT", fr) == (2, 0)
    assert insert_series(engine, "funding-rate", "BTC/USDT", fr) == (0, 2)
    pd.testing.assert_frame_equal(load_series(engine, "funding-rate", "BTC/USDT"), fr)
    with pytest.raises(InvalidArgument):
        insert_series(engine, "funding-rate", "BTC/USDT", pd.DataFrame({"time_ms": [T0 + H], "value": [np.inf]}))
    for oi in (-5.0, 0.0):
        with pytest.raises(InvalidArgument):
            insert_series(engine, "open-interest", "BTC/USDT", pd.DataFrame({"time_ms": [T0], "value": [oi]}))
    with pytest.raises(InvalidArgument) as exc:
        insert_series(engine, "basis", "BTC/USDT", fr)
    assert exc.value.field == "kind"
    assert [(r["kind"], r["rows"]) for r in summarize_series(engine)] == [("funding-rate", 2)]


# --------------------------------------------------------------------------------------------------------------------
# the as-of join: no look-ahead, no back-fill


def test_asof_join_sees_only_values_published_by_the_close(engine):
    insert_candles(engine, "BTC/USDT", "1h", candle_frame([T0 + i * H for i in range(6)]))
    insert_candles(engine, "ETH/USDT", "1h", candle_frame([T0 + i * H for i in range(6)]))
    # candle k opens at T0 + k h and closes at T0 + (k + 1) h
    funding = pd.DataFrame(
        {
            "time_ms": [T0 + H + 1, T0 + 3 * H, T0 + 3 * H + 1, T0 + 100 * H],
            "value": [0.1, 0.2, 0.3, 0.9],
        }
    )
    insert_series(engine, "funding-rate", "BTC/USDT", funding)
    insert_series(engine, "open-interest", "BTC/USDT", pd.DataFrame({"time_ms": [T0 - 10 * H], "value": [7.0]}))
    insert_series(engine, "funding-rate", "ETH/USDT", pd.DataFrame({"time_ms": [T0], "value": [5.0]}))

    df = load_candles(engine, "BTC/USDT", "1h")
    fr = df["funding_rate"].tolist()
    assert np.isnan(fr[0])  # 0.1 came 1 ms after candle 0 closed: never back-filled
    assert fr[1] == 0.1  # published during candle 1
    assert fr[2] == 0.2  # published exactly at candle 2's close
    assert fr[3] == 0.3  # 0.3 came 1 ms after candle 2's close, so only candle 3 sees it
    assert fr[4:] == [0.3, 0.3]  # the latest known value; 0.9 is published long after the last close
    assert df["open_interest"].tolist() == [7.0] * 6  # a value before the first candle applies to all

    # A window that starts later still sees the latest value published before it (loaded as the anchor row).
    late = load_candles(engine, "BTC/USDT", "1h", start_ms=T0 + 4 * H)
    assert late["funding_rate"].tolist() == [0.3, 0.3]
    assert late["open_interest"].tolist() == [7.0, 7.0]
    # Other symbols' series never leak in.
    assert load_candles(engine, "ETH/USDT", "1h")["funding_rate"].tolist() == [5.0] * 6
    assert load_candles(engine, "ETH/USDT", "1h")["open_interest"].isna().all()


def test_asof_join_matches_brute_force(engine):
    rng = np.random.default_rng(7)
    times = T0 + np.sort(rng.choice(300, size=120, replace=False)) * M5
    insert_candles(engine, "BTC/USDT", "5m", candle_frame(times))
    series_t = np.unique(T0 - 5 * M5 + rng.integers(0, 320 * M5, size=60))
    series = pd.DataFrame({"time_ms": series_t, "value": rng.normal(size=series_t.size)})
    insert_series(engine, "funding-rate", "BTC/USDT", series)
    for start in (None, int(times[40]), int(times[-1])):
        df = load_candles(engine, "BTC/USDT", "5m", start_ms=start)
        for t, got in zip(df["open_time_ms"], df["funding_rate"], strict=True):
            published = series[series["time_ms"] <= t + M5]
            want = published["value"].iloc[-1] if len(published) else np.nan
            assert (np.isnan(want) and np.isnan(got)) or got == want


def test_summarize_counts_missing_slots(engine, binance_csv):
    insert_candles(engine, "BTC/USDT", "5m", read_candles(binance_csv, "5m"))
    insert_candles(engine, "BTC/USDT", "1h", candle_frame([T0, T0 + 3 * H]))
    rows = summarize(engine)
    assert [(r["symbol"], r["timeframe"], r["rows"], r["gaps"]) for r in rows] == [
        ("BTC/USDT", "5m", 2576, 16),
        ("BTC/USDT", "1h", 2, 2),
    ]
    assert rows[0]["first_ms"] == parse_time("2023-03-20T00:00:00Z")
    assert rows[0]["last_ms"] == parse_time("2023-03-28T23:55:00Z")


def test_an_interrupted_insert_leaves_nothing_behind(engine):
    """One transaction per insert: stopping after the first chunk (here from the progress callback) stores nothing."""
    df = candle_frame([T0 + i * H for i in range(12_000)])  # more than one chunk
    written = []

    def interrupt(n: int) -> None:
        written.append(n)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        insert_candles(engine, "BTC/USDT", "1h", df, progress=interrupt)
    assert written and written[0] < len(df)
    assert count_candles(engine, "BTC/USDT", "1h") == 0
    assert insert_candles(engine, "BTC/USDT", "1h", df) == (12_000, 0)
