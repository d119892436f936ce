"""`mlsignal data import` and `mlsignal data list` end to end, on SQLite and PostgreSQL."""

from __future__ import annotations

import gzip
import re
import time

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from mlsignal.cli import main
from shared.store.db import candles, funding_rates, make_engine, open_interest
from shared.store.importers import read_candles, resample
from shared.store.marketdata import load_candles, load_series
from shared.timeframes import ms_to_iso, parse_time

HEADER = "timestamp,open,high,low,close,volume\n"
GOOD = [
    "2024-01-01T00:00:00Z,100,110,90,105,12.5",
    "2024-01-01T01:00:00Z,105,115,100,110,8",
    "2024-01-01T02:00:00Z,110,112,101,102,0",
]
BINANCE_HEADER = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore"
)
SAMPLE_SUMMARY = (
    "BTC/USD 1h: 20111 inserted, 0 unchanged, 0 conflicting, 0 gaps, first 2017-07-01T11:00:00Z, "
    "last 2019-10-17T09:00:00Z"
)


@pytest.fixture
def cli(db_url, monkeypatch, capsys):
    """Run `mlsignal ...` against the test database; returns (exit code, stdout, stderr)."""
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", db_url)

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def stored(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (candles, funding_rates, open_interest)}  # fmt: skip


def write(path, text: str):
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------------------------------
# accepted files


def test_sample_imports_once_and_reimport_changes_nothing(cli, engine, sample_csv):
    code, out, err = cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h")
    assert code == 0, err
    assert out.splitlines() == [SAMPLE_SUMMARY]
    first = load_candles(engine, "BTC/USD", "1h")
    assert len(first) == 20111

    code, out, err = cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h", "--format", "csv")
    assert code == 0, err
    assert out.strip() == SAMPLE_SUMMARY.replace("20111 inserted, 0 unchanged", "0 inserted, 20111 unchanged")
    pd.testing.assert_frame_equal(load_candles(engine, "BTC/USD", "1h"), first)
    assert stored(engine) == {"candles": 20111, "funding_rates": 0, "open_interest": 0}


def test_import_migrates_a_new_database_itself(tmp_path, monkeypatch, capsys, sample_csv):
    url = f"sqlite:///{tmp_path}/fresh/new.db"
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", url)
    assert main(["data", "import", str(sample_csv), "--symbol", "BTC/USD", "--timeframe", "1h"]) == 0
    assert capsys.readouterr().out.strip() == SAMPLE_SUMMARY


@pytest.mark.parametrize("name", ["iso.csv", "iso.csv.gz", "epoch.csv", "epoch.csv.gz"])
def test_generic_csv_variants(cli, engine, tmp_path, name):
    rows = list(reversed(GOOD))  # rows need not be sorted
    if name.startswith("epoch"):
        rows = [",".join([str(parse_time(r.split(",")[0])), *r.split(",")[1:]]) for r in rows]
    path = write(tmp_path / name, HEADER + "\n".join(rows) + "\n")
    code, out, err = cli("data", "import", path, "--symbol", "ETH/USDT", "--timeframe", "1h")
    assert code == 0, err
    assert out.strip() == (
        "ETH/USDT 1h: 3 inserted, 0 unchanged, 0 conflicting, 0 gaps, first 2024-01-01T00:00:00Z, "
        "last 2024-01-01T02:00:00Z"
    )
    df = load_candles(engine, "ETH/USDT", "1h")
    t0 = parse_time("2024-01-01T00:00:00Z")
    assert df["open_time_ms"].tolist() == [t0, t0 + 3_600_000, t0 + 7_200_000]
    assert df["close"].tolist() == [105.0, 110.0, 102.0]
    assert df["volume"].tolist() == [12.5, 8.0, 0.0]


def test_binance_file_reports_its_gap(cli, engine, binance_csv):
    code, out, err = cli("data", "import", binance_csv, "--symbol", "BTC/USDT", "--timeframe", "5m")
    assert code == 0, err
    assert out.strip() == (
        "BTC/USDT 5m: 2576 inserted, 0 unchanged, 0 conflicting, 1 gap (16 missing candles), "
        "first 2023-03-20T00:00:00Z, last 2023-03-28T23:55:00Z"
    )
    assert "2023-03-24T12:40:00Z .. 2023-03-24T13:55:00Z: 16 missing candles" in err
    assert stored(engine)["candles"] == 2576


def test_binance_microseconds_with_header(cli, engine, tmp_path, binance_csv):
    lines = binance_csv.read_text().splitlines()[:4]
    micro = []
    for line in lines:
        f = line.split(",")
        f[0], f[6] = str(int(f[0]) * 1000), str(int(f[6]) * 1000 + 999)
        micro.append(",".join(f))
    path = write(tmp_path / "BTCUSDT-5m.csv", "\n".join([BINANCE_HEADER, *micro]) + "\n")
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "5m")
    assert code == 0, err
    assert out.startswith("BTC/USDT 5m: 4 inserted, 0 unchanged, 0 conflicting, 0 gaps, first 2023-03-20T00:00:00Z")
    # The same candles in milliseconds are the same candles: all unchanged.
    code, out, _ = cli("data", "import", write(tmp_path / "ms.csv", "\n".join(lines) + "\n"), "--symbol", "BTC/USDT",
                       "--timeframe", "5m", "--format", "binance")  # fmt: skip
    assert code == 0 and "0 inserted, 4 unchanged, 0 conflicting" in out
    pd.testing.assert_frame_equal(
        load_candles(engine, "BTC/USDT", "5m")[["open_time_ms", "open", "high", "low", "close", "volume"]],
        read_candles(tmp_path / "ms.csv", "5m"),
    )


@pytest.mark.parametrize(("kind", "table"), [("funding-rate", "funding_rates"), ("open-interest", "open_interest")])
def test_series_import(cli, engine, tmp_path, kind, table):
    t0 = parse_time("2023-03-20T00:00:00Z")
    text = (
        "timestamp,value\n"
        "2023-03-20T08:00:00Z,0.00025\n2023-03-20T00:00:00Z,0.0001\n2023-03-20T16:00:00.004Z,0.0003\n"
    )
    path = write(tmp_path / "series.csv.gz", text)
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--kind", kind)
    assert code == 0, err
    assert out.strip() == (
        f"BTC/USDT {kind}: 3 inserted, 0 unchanged, 0 conflicting, first 2023-03-20T00:00:00Z, "
        "last 2023-03-20T16:00:00Z"
    )
    code, out, _ = cli("data", "import", path, "--symbol", "BTC/USDT", "--kind", kind)
    assert code == 0 and "0 inserted, 3 unchanged, 0 conflicting" in out
    series = load_series(engine, kind, "BTC/USDT")
    assert series["time_ms"].tolist() == [t0, t0 + 8 * 3_600_000, t0 + 16 * 3_600_000 + 4]
    assert series["value"].tolist() == [0.0001, 0.00025, 0.0003]
    assert stored(engine)[table] == 3


# --------------------------------------------------------------------------------------------------------------------
# the import rules: closed candles only, conflicts counted and the stored values kept


def test_a_still_forming_candle_rejects_the_file(cli, engine, tmp_path):
    hour = 3_600_000
    forming = int(time.time() * 1000) // hour * hour  # opened this hour: closes after now
    rows = [f"{forming - 2 * hour},100,110,90,105,1", f"{forming - hour},105,115,100,110,1",
            f"{forming},110,112,101,102,1"]
    path = write(tmp_path / "live.csv", HEADER + "\n".join(rows) + "\n")
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "1h")
    assert code == 2 and out == ""
    assert err.startswith(f"error: {path} line 4: the 1h candle opening at {ms_to_iso(forming)} is still forming: "
                          f"it closes at {ms_to_iso(forming + hour)}, after now"), err
    assert stored(engine)["candles"] == 0
    # Without the forming candle the file imports; the candle that closed last is stored.
    code, out, err = cli("data", "import", write(tmp_path / "closed.csv", HEADER + "\n".join(rows[:2]) + "\n"),
                         "--symbol", "BTC/USDT", "--timeframe", "1h")  # fmt: skip
    assert code == 0 and out.startswith("BTC/USDT 1h: 2 inserted, 0 unchanged, 0 conflicting"), err


def test_conflicting_rows_are_counted_and_the_stored_values_kept(cli, engine, tmp_path):
    path = write(tmp_path / "a.csv", HEADER + "\n".join(GOOD) + "\n")
    assert cli("data", "import", path, "--symbol", "ETH/USDT", "--timeframe", "1h")[0] == 0
    before = load_candles(engine, "ETH/USDT", "1h")
    changed = [GOOD[0], GOOD[1].replace(",8", ",9"), GOOD[2].replace(",102,", ",103,"),
               "2024-01-01T03:00:00Z,102,104,100,103,2"]
    code, out, err = cli("data", "import", write(tmp_path / "b.csv", HEADER + "\n".join(changed) + "\n"),
                         "--symbol", "ETH/USDT", "--timeframe", "1h")  # fmt: skip
    assert code == 0, err
    assert out.startswith("ETH/USDT 1h: 1 inserted, 1 unchanged, 2 conflicting, 0 gaps"), out
    assert err.strip() == ("warning: ETH/USDT 1h: 2 candles differ from the ones already stored (the first at "
                           "2024-01-01T01:00:00Z); the stored values are kept")
    after = load_candles(engine, "ETH/USDT", "1h")
    pd.testing.assert_frame_equal(after.iloc[:3], before)  # the stored candles are kept as they were
    assert after["close"].tolist() == [105.0, 110.0, 102.0, 103.0]


def test_conflicting_series_values_are_counted_and_kept(cli, engine, tmp_path):
    first = write(tmp_path / "f1.csv", "timestamp,value\n2023-03-20T00:00:00Z,0.0001\n2023-03-20T08:00:00Z,0.0002\n")
    assert cli("data", "import", first, "--symbol", "BTC/USDT", "--kind", "funding-rate")[0] == 0
    second = write(tmp_path / "f2.csv", "timestamp,value\n2023-03-20T00:00:00Z,0.0001\n2023-03-20T08:00:00Z,0.0003\n"
                                        "2023-03-20T16:00:00Z,0.0004\n")
    code, out, err = cli("data", "import", second, "--symbol", "BTC/USDT", "--kind", "funding-rate")
    assert code == 0
    assert out.startswith("BTC/USDT funding-rate: 1 inserted, 1 unchanged, 1 conflicting, first 2023-03-20T00:00:00Z")
    assert "1 values differ from the ones already stored (the first at 2023-03-20T08:00:00Z)" in err
    assert load_series(engine, "funding-rate", "BTC/USDT")["value"].tolist() == [0.0001, 0.0002, 0.0004]


# --------------------------------------------------------------------------------------------------------------------
# resampling


def test_resample_binance_5m_to_1h(cli, engine, binance_csv):
    code, out, err = cli("data", "import", binance_csv, "--symbol", "BTC/USDT", "--timeframe", "5m", "--resample", "1h")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[1] == (
        "BTC/USDT 1h: 214 inserted, 0 unchanged, 0 conflicting, 1 gap (2 missing candles), "
        "first 2023-03-20T00:00:00Z, last 2023-03-28T23:00:00Z"
    )
    hourly = load_candles(engine, "BTC/USDT", "1h")[["open_time_ms", "open", "high", "low", "close", "volume"]]
    pd.testing.assert_frame_equal(hourly, resample(read_candles(binance_csv, "5m"), "5m", "1h"))
    code, out, _ = cli("data", "import", binance_csv, "--symbol", "BTC/USDT", "--timeframe", "5m", "--resample", "1h")
    assert "0 inserted, 214 unchanged, 0 conflicting" in out.splitlines()[1]


def test_resample_builds_a_bucket_split_across_two_files(cli, engine, tmp_path, binance_csv):
    rows = binance_csv.read_text().splitlines()
    first, second = rows[:30], rows[30:36]  # 00:00..02:25 and 02:30..02:55 on 2023-03-20
    a = write(tmp_path / "a.csv", "\n".join(first) + "\n")
    b = write(tmp_path / "b.csv", "\n".join(second) + "\n")
    code, out, _ = cli("data", "import", a, "--symbol", "BTC/USDT", "--timeframe", "5m", "--resample", "1h")
    assert code == 0 and "BTC/USDT 1h: 2 inserted" in out  # 02:00 is still incomplete
    code, out, _ = cli("data", "import", b, "--symbol", "BTC/USDT", "--timeframe", "5m", "--resample", "1h")
    assert code == 0 and "BTC/USDT 1h: 1 inserted, 0 unchanged, 0 conflicting" in out
    whole = resample(read_candles(write(tmp_path / "ab.csv", "\n".join(rows[:36]) + "\n"), "5m"), "5m", "1h")
    stored_1h = load_candles(engine, "BTC/USDT", "1h")[whole.columns]
    pd.testing.assert_frame_equal(stored_1h, whole)


def test_resample_to_a_shorter_timeframe_is_refused(cli, engine, sample_csv):
    code, _, err = cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h", "--resample", "5m")
    assert code == 2 and "--resample 5m" in err
    assert stored(engine)["candles"] == 0


# --------------------------------------------------------------------------------------------------------------------
# rejected files: the whole file, with the line number, and nothing stored

REJECTIONS = [
    # (file text, line, reason)
    ("2024-01-01T00:00:00Z,100,110,90,105,1\nsoon,1,2,0.5,1,1\n", 3, "cannot parse timestamp 'soon'"),
    ("2024-01-01T00:00:00Z,100,110,90,105,1\n2024-01-01T01:00:00Z,100,1l0,90,105,1\n", 3, "cannot parse high '1l0'"),
    ("2024-01-01T00:00:00Z,100,110,90,,1\n", 2, "close is missing"),
    ("2024-01-01T00:00:00Z,100,inf,90,105,1\n", 2, "high is inf; expected a finite number"),
    ("2024-01-01T00:00:00Z,NaN,110,90,105,1\n", 2, "open is NaN; expected a finite number"),
    ("2024-01-01T00:00:00Z,100,110,0,105,1\n", 2, "low is 0; prices must be positive"),
    ("2024-01-01T00:00:00Z,100,110,90,-105,1\n", 2, "close is -105; prices must be positive"),
    ("2024-01-01T00:00:00Z,100,110,90,105,1\n2024-01-01T01:00:00Z,100,80,90,85,1\n", 3, "high 80 is below low 90"),
    ("2024-01-01T00:00:00Z,100,110,90,105,-0.5\n", 2, "volume is -0.5; volume must not be negative"),
    ("2024-01-01T00:00:00Z,100,110,90,105,nan\n", 2, "volume is nan; expected a finite number"),
    ("2024-01-01T00:00:00Z,100,110,90,105,1\n2024-01-01T01:30:00Z,100,110,90,105,1\n", 3,
     "timestamp 2024-01-01T01:30:00Z is not aligned to the 1h timeframe"),
    ("2024-01-01T01:00:00Z,100,110,90,105,1\n2024-01-01T00:00:00Z,100,110,90,105,1\n2024-01-01T01:00:00Z,1,2,1,1,1\n",
     4, "duplicate timestamp 2024-01-01T01:00:00Z (also on line 2)"),
    ("2024-01-01T00:00:00Z,100,110,90,105,1,7\n", 2, "expected 6 fields, found 7"),
    ("1704067200,100,110,90,105,1\n", 2, "timestamp 1704067200 (read as epoch milliseconds) is outside"),
    ("2024-01-01T00:00:00Z,100,110,90,105,1\n\n2024-01-01T02:00:00Z,100,110,90,105,1\n", 3, "timestamp is missing"),
    ("1704067200000,100,110,90,105,1\n2024-01-01T01:00:00Z,100,110,90,105,1\n", 3,
     "cannot parse timestamp '2024-01-01T01:00:00Z' as an integer epoch time"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "line", "reason"), REJECTIONS, ids=[r[2].split(";")[0][:40] for r in REJECTIONS])
def test_rejected_csv_stores_nothing(cli, engine, tmp_path, body, line, reason):
    path = write(tmp_path / "bad.csv", HEADER + "\n".join(GOOD[:0]) + body)
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "1h")
    assert code == 2
    assert out == ""
    assert err.strip().startswith(f"error: {path} line {line}: {reason}"), err
    assert stored(engine) == {"candles": 0, "funding_rates": 0, "open_interest": 0}


def test_bad_last_line_rejects_a_large_file_into_a_filled_database(cli, engine, tmp_path, sample_csv):
    assert cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h")[0] == 0
    before = load_candles(engine, "BTC/USD", "1h")
    text = gzip.decompress(sample_csv.read_bytes()).decode()
    # New candles after the sample, then one whose high is below its low on the very last line.
    extra = "".join(f"2019-10-17T{h:02d}:00:00Z,8000,8010,7990,8005,1\n" for h in range(10, 23))
    bad = "2019-10-17T23:00:00Z,8000,7000,7990,8005,1\n"
    path = write(tmp_path / "bad.csv.gz", text + extra + bad)
    n_lines = len((text + extra + bad).splitlines())
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USD", "--timeframe", "1h")
    assert code == 2 and out == ""
    assert err.strip() == f"error: {path} line {n_lines}: high 7000 is below low 7990"
    pd.testing.assert_frame_equal(load_candles(engine, "BTC/USD", "1h"), before)
    assert stored(engine)["candles"] == 20111


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("x1679270400000,1,2,0.5,1,1,1679270699999,0,0,0,0,0", "cannot parse open_time 'x1679270400000'"),
        ("1679270400000,1,2,0.5,1,1,1679270999999,0,0,0,0,0", "close_time 1679270999999 does not fall inside a 5m"),
        ("1679270400500,1,2,0.5,1,1,1679270699999,0,0,0,0,0", "is not aligned to the 5m timeframe"),
        ("1679270400000123,1,2,0.5,1,1,1679270699999999,0,0,0,0,0", "(microseconds) is not a whole millisecond"),
    ],
)
def test_rejected_binance_rows(cli, engine, tmp_path, binance_csv, row, reason):
    lines = binance_csv.read_text().splitlines()[1:4]
    path = write(tmp_path / "bad.csv", "\n".join([*lines, row]) + "\n")
    code, _, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "5m", "--format", "binance")
    assert code == 2
    assert err.startswith(f"error: {path} line 4: "), err
    assert reason in err
    assert stored(engine)["candles"] == 0


@pytest.mark.parametrize(
    ("kind", "body", "line", "reason"),
    [
        ("funding-rate", "2024-01-01T00:00:00Z,0.1\n2024-01-01T08:00:00Z,inf\n", 3, "value is inf"),
        ("funding-rate", "2024-01-01T00:00:00Z,0.1\n2024-01-01T00:00:00Z,0.2\n", 3, "duplicate timestamp"),
        ("open-interest", "2024-01-01T00:00:00Z,10\n2024-01-01T01:00:00Z,-1\n", 3,
         "open interest is -1; it must be > 0"),
        ("open-interest", "2024-01-01T00:00:00Z,10\n2024-01-01T01:00:00Z,0\n", 3,
         "open interest is 0; it must be > 0"),
    ],
)
def test_rejected_series_stores_nothing(cli, engine, tmp_path, kind, body, line, reason):
    path = write(tmp_path / "s.csv", "timestamp,value\n" + body)
    code, _, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--kind", kind)
    assert code == 2
    assert err.startswith(f"error: {path} line {line}: {reason}"), err
    assert stored(engine) == {"candles": 0, "funding_rates": 0, "open_interest": 0}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--symbol", "btc/usdt", "--timeframe", "1h"], "symbol 'btc/usdt' is not valid"),
        (["--symbol", "BTC/USDT"], "--timeframe is required"),
        (["--symbol", "BTC/USDT", "--kind", "funding-rate", "--timeframe", "1h"], "--timeframe applies to candles"),
    ],
)
def test_bad_arguments(cli, engine, sample_csv, argv, message):
    code, _, err = cli("data", "import", sample_csv, *argv)
    assert code == 2 and message in err
    assert stored(engine)["candles"] == 0


def test_unknown_layout_and_missing_file(cli, tmp_path):
    unknown = write(tmp_path / "x.csv", "date,price\n1,2\n")
    code, _, err = cli("data", "import", unknown, "--symbol", "A/B", "--timeframe", "1h")
    assert code == 2 and "line 1: cannot tell the file format" in err
    code, _, err = cli("data", "import", write(tmp_path / "y.csv", "timestamp,open,close\n1,2,3\n"), "--symbol", "A/B",
                       "--timeframe", "1h")  # fmt: skip
    assert code == 2 and "line 1: header lacks column(s) high, low, volume" in err
    code, _, err = cli("data", "import", tmp_path / "missing.csv", "--symbol", "A/B", "--timeframe", "1h")
    assert code == 2 and "no such file" in err


# --------------------------------------------------------------------------------------------------------------------
# data list


def test_data_list(cli, tmp_path, sample_csv, binance_csv):
    code, out, _ = cli("data", "list")
    assert code == 0 and out.startswith("no market data stored")
    assert cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h")[0] == 0
    assert cli("data", "import", binance_csv, "--symbol", "BTC/USDT", "--timeframe", "5m", "--resample", "1h")[0] == 0
    funding = write(tmp_path / "f.csv", "timestamp,value\n2023-03-20T00:00:00Z,0.0001\n2023-03-20T08:00:00Z,0.0002\n")
    assert cli("data", "import", funding, "--symbol", "BTC/USDT", "--kind", "funding-rate")[0] == 0

    code, out, _ = cli("data", "list")
    assert code == 0
    candles_part, series_part = out.split("\n\n")
    lines = candles_part.splitlines()
    assert [line.split() for line in lines] == [
        ["symbol", "timeframe", "first", "last", "rows", "gaps", "missing"],
        ["BTC/USD", "1h", "2017-07-01T11:00:00Z", "2019-10-17T09:00:00Z", "20111", "0", "0"],
        ["BTC/USDT", "5m", "2023-03-20T00:00:00Z", "2023-03-28T23:55:00Z", "2576", "1", "16"],  # one gap, 16 candles
        ["BTC/USDT", "1h", "2023-03-20T00:00:00Z", "2023-03-28T23:00:00Z", "214", "1", "2"],
    ]
    # aligned: every column starts at the same offset on every line, numbers are right-aligned
    for word in ("first", "last"):
        col = lines[0].index(word)
        assert all(re.match(r"\d{4}-", line[col:]) for line in lines[1:])
    assert len({len(line) for line in lines}) == 1
    assert [line.split() for line in series_part.splitlines()] == [
        ["symbol", "series", "first", "last", "rows"],
        ["BTC/USDT", "funding-rate", "2023-03-20T00:00:00Z", "2023-03-20T08:00:00Z", "2"],
    ]


def test_data_list_does_not_create_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", f"sqlite:///{tmp_path}/none.db")
    assert main(["data", "list"]) == 0
    assert capsys.readouterr().out.startswith("no market data stored")
    assert not (tmp_path / "none.db").exists()


def test_sample_then_asof_join_through_the_cli(cli, engine, tmp_path, sample_csv):
    """Funding imported from a file is visible only to candles that close at or after its time."""
    assert cli("data", "import", sample_csv, "--symbol", "BTC/USD", "--timeframe", "1h")[0] == 0
    t = parse_time("2018-01-01T08:00:00Z")
    path = write(tmp_path / "f.csv", f"timestamp,value\n{t},0.0005\n{t + 1},0.0007\n")
    assert cli("data", "import", path, "--symbol", "BTC/USD", "--kind", "funding-rate")[0] == 0
    df = load_candles(engine, "BTC/USD", "1h", t - 2 * 3_600_000, t + 3_600_000)
    # candles opening 06:00, 07:00, 08:00 close at 07:00, 08:00, 09:00
    assert np.isnan(df["funding_rate"].iloc[0])
    assert df["funding_rate"].tolist()[1:] == [0.0005, 0.0007]
