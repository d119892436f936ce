"""`ImportCandles` end to end: a real training server on 127.0.0.1:0 over SQLite and PostgreSQL, called through the
generated stub, the SDK (`TrainingClient.import_candles`) and `mlsignal data push`.

The server's clock is the real one here, so candles are placed relative to it: the last closed hour, and the hour
that is still forming (tests/integration/test_candle_import.py sets the clock itself).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from mlsignal.cli import main as cli_main
from mlsignal.client import InvalidArgumentError, TrainingClient, frame_to_candles, frame_to_columns
from mlsignal.v1 import training_pb2, training_pb2_grpc
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.marketdata import count_candles, load_candles
from shared.store.migrate import upgrade
from shared.timeframes import ms_to_iso

H = 3_600_000
HEADER = "timestamp,open,high,low,close,volume\n"
_markets = itertools.count()


@dataclass
class Server:
    url: str
    port: int
    engine: object
    channel: grpc.Channel

    @property
    def stub(self) -> training_pb2_grpc.TrainingServiceStub:
        return training_pb2_grpc.TrainingServiceStub(self.channel)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def server(request, tmp_path_factory):
    """One training server per database for the module; every test imports its own market."""
    from conftest import fresh_pg_database
    from training_service.server import start as start_training

    root = tmp_path_factory.mktemp(f"import-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{root}/mlsignal.db"
            upgrade(url)
        else:
            url = stack.enter_context(fresh_pg_database(request.getfixturevalue("pg_server")))
        running = start_training(Settings(database_url=url, model_dir=root / "models"), "127.0.0.1:0")
        stack.callback(running.stop, 0.5)
        engine = make_engine(url)
        stack.callback(engine.dispose)
        channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
        stack.callback(channel.close)
        yield Server(url, running.port, engine, channel)


@pytest.fixture
def symbol() -> str:
    """A market of its own for each test."""
    return f"T{next(_markets)}/USDT"


def last_closed_open_ms() -> int:
    """The open time of the newest closed 1h candle by the clock now (it closed at the start of this hour)."""
    return int(time.time() * 1000) // H * H - H


def forming_open_ms() -> int:
    """The open time of a 1h candle that has not closed: this hour's, or, in the last minute of the hour (so that it
    cannot close while the test runs), the next one's."""
    now = int(time.time() * 1000)
    return now // H * H + (H if now % H > H - 60_000 else 0)


def candle_frame(n: int, last_open_ms: int | None = None, funding: bool = False, oi: bool = False,
                 seed: int = 0) -> pd.DataFrame:
    """n valid hourly candles ending at last_open_ms (default: the newest closed one)."""
    rng = np.random.default_rng(seed)
    last = last_closed_open_ms() if last_open_ms is None else last_open_ms
    t = last - H * np.arange(n - 1, -1, -1, dtype=np.int64)
    o = 100 + rng.uniform(0, 10, n)
    c = o * (1 + rng.normal(0, 0.01, n))
    df = pd.DataFrame({"open_time_ms": t, "open": o, "high": np.maximum(o, c) * 1.01, "low": np.minimum(o, c) * 0.99,
                       "close": c, "volume": rng.uniform(1, 10, n)})
    if funding:
        df["funding_rate"] = np.where(np.arange(n) % 5 == 2, np.nan, rng.normal(0, 1e-4, n))
    if oi:
        df["open_interest"] = np.where(np.arange(n) % 7 == 3, np.nan, rng.uniform(1e5, 2e5, n))
    return df


def bad_request_field(err: grpc.RpcError) -> str:
    """The field of the google.rpc.BadRequest field violation in a failed call's status."""
    status = rpc_status.from_call(err)
    assert status is not None, err
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {status}")


def row_messages(symbol: str, df: pd.DataFrame, size: int) -> list[training_pb2.ImportCandlesRequest]:
    """The frame as ImportCandles messages of repeated Candle rows; only the first names the market."""
    out = []
    for start in range(0, len(df), size):
        msg = training_pb2.ImportCandlesRequest(candles=frame_to_candles(df.iloc[start:start + size]))
        if not out:
            msg.symbol, msg.timeframe = symbol, "1h"
        out.append(msg)
    return out


def column_messages(symbol: str, df: pd.DataFrame, size: int) -> list[training_pb2.ImportCandlesRequest]:
    """The frame as ImportCandles messages of packed columns; every message names the market."""
    return [training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="1h",
                                              columns=frame_to_columns(df.iloc[start:start + size]))
            for start in range(0, len(df), size)]


def stored(server: Server, symbol: str) -> pd.DataFrame:
    return load_candles(server.engine, symbol, "1h")


# --------------------------------------------------------------------------------------------------------------------
# rows and columns


def test_rows_and_columns_store_the_same_candles_with_their_funding_and_open_interest(server, symbol):
    df = candle_frame(50, funding=True, oi=True)
    rows_symbol, cols_symbol = symbol, symbol.replace("/", "C/")
    by_rows = server.stub.ImportCandles(iter(row_messages(rows_symbol, df, 16)), timeout=30)
    by_cols = server.stub.ImportCandles(iter(column_messages(cols_symbol, df, 16)), timeout=30)
    expected = training_pb2.ImportCandlesResponse(inserted=50, last_open_time_ms=int(df["open_time_ms"].iloc[-1]))
    assert by_rows == expected and by_cols == expected
    a, b = stored(server, rows_symbol), stored(server, cols_symbol)
    pd.testing.assert_frame_equal(a, b)
    # What training reads is exactly what was sent: the candles, and funding rate and open interest on every candle
    # that carried them (one without reads the latest value at or before its close, as with a series file).
    values = ["open_time_ms", "open", "high", "low", "close", "volume"]
    pd.testing.assert_frame_equal(a[values], df[values], check_exact=True)
    for name in ("funding_rate", "open_interest"):
        has = df[name].notna().to_numpy()
        assert 0 < has.sum() < len(df)
        np.testing.assert_array_equal(a[name].to_numpy()[has], df[name].to_numpy()[has])


def test_funding_rate_reaches_training_exactly_when_it_is_sent_on_some_candles_only(server, symbol):
    df = candle_frame(30, funding=True, oi=True, seed=3)
    assert server.stub.ImportCandles(iter(column_messages(symbol, df, 7)), timeout=30).inserted == 30
    got = stored(server, symbol)
    for name in ("funding_rate", "open_interest"):
        has = df[name].notna().to_numpy()
        np.testing.assert_array_equal(got[name].to_numpy()[has], df[name].to_numpy()[has])


# --------------------------------------------------------------------------------------------------------------------
# refused messages


def test_a_forming_candle_ends_the_call_and_the_messages_before_it_stay_stored(server, symbol):
    closed = candle_frame(10)
    forming = candle_frame(2, last_open_ms=forming_open_ms(), seed=1)
    messages = [*column_messages(symbol, closed, 5), *column_messages(symbol, forming, 5)]
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ImportCandles(iter(messages), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err.value) == "columns.open_time_ms[1]"
    details = err.value.details()
    assert details.startswith("message 2: columns.open_time_ms[1]: the candle opening at ")
    assert "after the server's clock" in details and "only closed candles are stored" in details
    assert "(nothing of it is stored; the 2 messages before it are)" in details
    got = stored(server, symbol)
    pd.testing.assert_frame_equal(got[closed.columns], closed)  # the refused message stored nothing, not even the
    #                                                              closed candle it carried before the forming one


@pytest.mark.parametrize(
    ("column", "value", "name"),
    [("high", 1.0, "high"), ("open", 1e9, "open"), ("close", -1.0, "close"), ("open_interest", 0.0, "open_interest"),
     ("volume", -2.0, "volume")],
)
@pytest.mark.parametrize("layout", ["rows", "columns"])
def test_an_invalid_candle_is_refused_naming_its_field(server, symbol, layout, column, value, name):
    df = candle_frame(8, oi=True, seed=2)
    df.loc[5, column] = value
    make = row_messages if layout == "rows" else column_messages
    with pytest.raises(grpc.RpcError) as err:
        server.stub.ImportCandles(iter(make(symbol, df, 8)), timeout=30)
    field = f"candles[5].{name}" if layout == "rows" else f"columns.{name}[5]"
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_request_field(err.value) == field
    assert err.value.details().startswith(f"message 0: {field}: ")
    assert count_candles(server.engine, symbol, "1h") == 0


def test_request_shape_errors(server, symbol):
    df = candle_frame(3)
    both = training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="1h", candles=frame_to_candles(df),
                                             columns=frame_to_columns(df))
    ragged = training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="1h", columns=frame_to_columns(df))
    del ragged.columns.close[-1]
    cases = [
        ([both], "columns", "either as candles or as columns, not both"),
        ([ragged], "columns.close", "columns.close: 2 values, expected 3"),
        ([training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="2h", columns=frame_to_columns(df))],
         "timeframe", "timeframe '2h' is not supported"),
        ([training_pb2.ImportCandlesRequest(symbol="btc-usdt", timeframe="1h", columns=frame_to_columns(df))],
         "symbol", "expected BASE/QUOTE"),
        ([column_messages(symbol, df, 2)[0],
          training_pb2.ImportCandlesRequest(symbol="ETH/BTC", columns=frame_to_columns(df.iloc[2:]))],
         "symbol", "a call imports one market"),
        ([], "symbol", "the call sent no message"),
        ([training_pb2.ImportCandlesRequest(symbol=symbol, timeframe="1h")], "candles", "holds no candles"),
    ]
    for messages, field, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            server.stub.ImportCandles(iter(messages), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert bad_request_field(err.value) == field
        assert text in err.value.details()
    # Only the first two candles of the market-switching call were stored.
    assert count_candles(server.engine, symbol, "1h") == 2


# --------------------------------------------------------------------------------------------------------------------
# re-sent candles


def test_identical_resend_is_unchanged_and_other_values_conflict(server, symbol):
    df = candle_frame(20, funding=True)
    first = server.stub.ImportCandles(iter(column_messages(symbol, df, 8)), timeout=30)
    assert (first.inserted, first.unchanged, first.conflicting) == (20, 0, 0)
    before = stored(server, symbol)
    again = server.stub.ImportCandles(iter(row_messages(symbol, df, 6)), timeout=30)
    assert (again.inserted, again.unchanged, again.conflicting) == (0, 20, 0)

    changed = df.copy()
    changed.loc[3, "volume"] += 1
    changed.loc[11, "funding_rate"] = 0.001
    extra = candle_frame(1, last_open_ms=int(df["open_time_ms"].iloc[0]) - H, seed=9)
    resent = pd.concat([extra, changed], ignore_index=True)
    third = server.stub.ImportCandles(iter(column_messages(symbol, resent, 100)), timeout=30)
    assert (third.inserted, third.unchanged, third.conflicting) == (1, 18, 2)
    assert third.last_open_time_ms == int(df["open_time_ms"].iloc[-1])
    after = stored(server, symbol)
    pd.testing.assert_frame_equal(after.iloc[1:].reset_index(drop=True), before)  # the stored values are kept


# --------------------------------------------------------------------------------------------------------------------
# the SDK and the CLI


def test_sdk_import_candles_frame_and_batches(server, symbol):
    df = candle_frame(25, funding=True, oi=True, seed=4)
    sent: list[int] = []
    with TrainingClient(server.target) as client:
        result = client.import_candles(symbol, "1h", df, batch_size=10, on_batch=sent.append)
        assert (result.inserted, result.unchanged, result.conflicting) == (25, 0, 0)
        assert sent == [10, 10, 5]
        # An iterable of frames (a collector's batches): each is one message; a bad one ends the call after the
        # ones before it are stored.
        later = candle_frame(25, last_open_ms=int(df["open_time_ms"].iloc[0]) - H, oi=True, seed=5)
        bad = later.iloc[15:].copy()
        bad.loc[bad.index[2], "open_interest"] = 0.0
        with pytest.raises(InvalidArgumentError) as err:
            client.import_candles(symbol, "1h", [later.iloc[:15], bad])
        assert err.value.details.startswith("message 1: columns.open_interest[2]: must be finite and > 0")
        assert count_candles(server.engine, symbol, "1h") == 40
        with pytest.raises(ValueError, match="no candles to import"):
            client.import_candles(symbol, "1h", df.iloc[:0])
        with pytest.raises(ValueError, match="missing column"):
            client.import_candles(symbol, "1h", df.drop(columns=["close"]))


def write_csv(path: Path, df: pd.DataFrame) -> Path:
    cols = [df[name].tolist() for name in ("open_time_ms", "open", "high", "low", "close", "volume")]
    rows = [f"{ms_to_iso(t)},{o!r},{h!r},{lo!r},{c!r},{v!r}" for t, o, h, lo, c, v in zip(*cols, strict=True)]
    path.write_text(HEADER + "\n".join(rows) + "\n")
    return path


def test_data_push_sends_a_file_in_batches(server, symbol, tmp_path, capsys):
    df = candle_frame(23, seed=6)
    path = write_csv(tmp_path / "candles.csv", df)
    argv = ["data", "push", str(path), "--symbol", symbol, "--timeframe", "1h", "--target", server.target,
            "--batch", "5"]
    last = ms_to_iso(int(df["open_time_ms"].iloc[-1]))
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == f"{symbol} 1h: 23 inserted, 0 unchanged, 0 conflicting, last {last}\n"
    pd.testing.assert_frame_equal(stored(server, symbol)[df.columns], df, check_exact=True)

    assert cli_main(argv) == 0
    assert capsys.readouterr().out == f"{symbol} 1h: 0 inserted, 23 unchanged, 0 conflicting, last {last}\n"

    changed = df.copy()
    changed.loc[[4, 9], "volume"] += 1.0
    assert cli_main([*argv[:2], str(write_csv(tmp_path / "changed.csv", changed)), *argv[3:]]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{symbol} 1h: 0 inserted, 21 unchanged, 2 conflicting, last {last}\n"
    assert "2 candles differ from the ones already stored; the stored values are kept" in captured.err
    pd.testing.assert_frame_equal(stored(server, symbol)[df.columns], df, check_exact=True)


def test_data_push_refuses_a_forming_candle_before_sending_anything(server, symbol, tmp_path, capsys):
    df = pd.concat([candle_frame(3, last_open_ms=forming_open_ms() - H), candle_frame(1, last_open_ms=forming_open_ms(),
                                                                                      seed=1)], ignore_index=True)
    path = write_csv(tmp_path / "live.csv", df)
    code = cli_main(["data", "push", str(path), "--symbol", symbol, "--timeframe", "1h", "--target", server.target])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.startswith(f"error: {path} line 5: the 1h candle opening at "
                                   f"{ms_to_iso(forming_open_ms())} is still forming"), captured.err
    assert count_candles(server.engine, symbol, "1h") == 0


def test_data_push_reports_a_refused_batch(server, symbol, tmp_path, capsys):
    # The file reader takes times from 2000 on; the service refuses open times before 2010 (a client bug).
    t0 = int(pd.Timestamp("2009-12-31T22:00:00Z").value // 1_000_000)
    df = candle_frame(4, last_open_ms=t0 + 3 * H)
    path = write_csv(tmp_path / "old.csv", df)
    code = cli_main(["data", "push", str(path), "--symbol", symbol, "--timeframe", "1h", "--target", server.target,
                     "--batch", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: INVALID_ARGUMENT: message 0: columns.open_time_ms[0]: "), err
    assert "is before 2010-01-01" in err
    assert count_candles(server.engine, symbol, "1h") == 0


def test_sdk_rejects_unusable_frames_before_calling(server, symbol):
    df = candle_frame(3)
    with TrainingClient(server.target) as client:
        with pytest.raises(ValueError, match="batch_size must be at least 1"):
            client.import_candles(symbol, "1h", df, batch_size=0)
        naive = df.set_index(pd.to_datetime(df.pop("open_time_ms"), unit="ms"))
        with pytest.raises(ValueError, match="tz-naive"):
            client.import_candles(symbol, "1h", naive)
    assert count_candles(server.engine, symbol, "1h") == 0
