"""Candle consistency on import: low <= min(open, close), max(open, close) <= high, and high >= low.

Each rule rejects the whole file naming the line, on SQLite and PostgreSQL, and nothing is stored.
"""

from __future__ import annotations

import pandas as pd
import pytest
import sqlalchemy as sa

from mlsignal.cli import main
from shared.errors import InvalidArgument
from shared.store.db import candles, make_engine
from shared.store.importers import ImportRejected, check_candles, read_candles

HEADER = "timestamp,open,high,low,close,volume\n"
GOOD = "2024-01-01T00:00:00Z,100,110,90,105,1\n2024-01-01T01:00:00Z,105,115,100,110,1\n"
BINANCE_GOOD = "1679270400000,100,110,90,105,1,1679270699999,0,0,0,0,0\n"

RULES = [
    # (row on line 4, reason the message gives)
    ("2024-01-01T02:00:00Z,120,115,100,110,1", "open 120 is above high 115; expected low <= open <= high"),
    ("2024-01-01T02:00:00Z,95,115,100,110,1", "open 95 is below low 100; expected low <= open <= high"),
    ("2024-01-01T02:00:00Z,105,115,100,116,1", "close 116 is above high 115; expected low <= close <= high"),
    ("2024-01-01T02:00:00Z,105,115,100,99.5,1", "close 99.5 is below low 100; expected low <= close <= high"),
    ("2024-01-01T02:00:00Z,105,95,100,98,1", "high 95 is below low 100"),
]
IDS = ["open>high", "open<low", "close>high", "close<low", "high<low"]


@pytest.fixture
def cli(db_url, monkeypatch, capsys):
    monkeypatch.setenv("MLSIGNAL_DATABASE_URL", db_url)

    def run(*argv) -> tuple[int, str, str]:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def stored_candles(url: str) -> int:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(candles)).scalar_one()
    finally:
        engine.dispose()


@pytest.mark.parametrize(("row", "reason"), RULES, ids=IDS)
def test_each_rule_names_the_line_and_stores_nothing(cli, db_url, tmp_path, row, reason):
    # Two good candles before the bad one, and a good one after it: the file is refused as a whole.
    path = tmp_path / "candles.csv"
    path.write_text(HEADER + GOOD + row + "\n2024-01-01T03:00:00Z,110,112,101,102,0\n")
    code, out, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "1h")
    assert code == 2 and out == ""
    assert err.strip() == f"error: {path} line 4: {reason}"
    assert stored_candles(db_url) == 0


def test_a_rule_broken_in_a_binance_file_names_its_line(cli, db_url, tmp_path):
    path = tmp_path / "klines.csv"
    path.write_text(BINANCE_GOOD + "1679270700000,105,115,100,116,1,1679270999999,0,0,0,0,0\n")
    code, _, err = cli("data", "import", path, "--symbol", "BTC/USDT", "--timeframe", "5m")
    assert code == 2
    assert err.strip() == f"error: {path} line 2: close 116 is above high 115; expected low <= close <= high"
    assert stored_candles(db_url) == 0


def test_boundaries_are_consistent(tmp_path):
    """open or close exactly at the high or the low is a real candle (a bar that closes at its high)."""
    path = tmp_path / "edge.csv"
    path.write_text(HEADER + "2024-01-01T00:00:00Z,90,110,90,110,1\n2024-01-01T01:00:00Z,110,110,110,110,0\n")
    df = read_candles(path, "1h")
    assert df["close"].tolist() == [110.0, 110.0]


@pytest.mark.parametrize(("row", "reason"), RULES, ids=IDS)
def test_frames_built_in_code_follow_the_same_rules(row, reason):
    fields = row.split(",")
    frame = pd.DataFrame({
        "open_time_ms": [1704074400000], "open": [float(fields[1])], "high": [float(fields[2])],
        "low": [float(fields[3])], "close": [float(fields[4])], "volume": [1.0],
    })
    with pytest.raises(InvalidArgument) as err:
        check_candles(frame, "1h")
    assert not isinstance(err.value, ImportRejected)
    column = reason.split()[0]
    assert str(err.value).startswith(f"candles row 0: {column} ")
    assert err.value.field == column
