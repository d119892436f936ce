"""The rules of importing candles (`training_service.candle_import`, `shared.store.marketdata.import_candles`), called
directly with a clock the test sets, on SQLite and PostgreSQL: only closed candles, every candle rule naming the
field, one transaction per message, unchanged and conflicting re-sends, and funding rate and open interest that read
back exactly on the candles that carried them."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from shared.candles import CandleBatch
from shared.errors import InvalidArgument
from shared.store.db import candles, funding_rates, make_engine, open_interest
from shared.store.marketdata import ImportCounts, count_candles, import_candles, insert_series, load_candles
from shared.timeframes import parse_time
from training_service.candle_import import CandleImport, ImportBatch, ImportResult

H = 3_600_000
Q = 900_000  # 15m
T0 = parse_time("2024-01-01T00:00:00Z")
SYMBOL = "BTC/USDT"


class Clock:
    """The server's clock, set by the test."""

    def __init__(self, now_ms: int) -> None:
        self.now = now_ms

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


def make_batch(n: int, start: int = 0, tf_ms: int = H, funding: bool = False, oi: bool = False,
               base: float = 100.0) -> CandleBatch:
    """Valid, distinct candles opening at T0 + (start .. start+n-1) timeframes; funding and open interest optional."""
    k = np.arange(start, start + n)
    o = base + k.astype(float)
    nan = np.full(n, np.nan)
    return CandleBatch(T0 + tf_ms * k.astype(np.int64), o, o + 2, o - 1, o + 1, 10.0 + k,
                       1e-4 * (k + 1) if funding else nan, 1e6 + 1000.0 * k if oi else nan)


def stored_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t.name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for t in (candles, funding_rates, open_interest)}


def frame(c: CandleBatch) -> pd.DataFrame:
    return pd.DataFrame({name: getattr(c, name) for name in ("open_time_ms", "open", "high", "low", "close", "volume",
                                                             "funding_rate", "open_interest")})


# --------------------------------------------------------------------------------------------------------------------
# closed candles only


def test_a_candle_is_stored_once_its_close_is_not_after_the_clock(engine):
    clock = Clock(T0 + 10 * H)  # the candle opening at T0 + 9h closes exactly now
    imp = CandleImport(engine, clock)
    assert imp.add(ImportBatch(SYMBOL, "1h", make_batch(10))) == ImportCounts(inserted=10)

    forming = make_batch(1, start=10)  # opens now, closes in an hour
    for now in (T0 + 10 * H, T0 + 11 * H - 1):
        clock.now = now
        with pytest.raises(InvalidArgument) as err:
            imp.add(ImportBatch("", "", forming))
        assert err.value.field == "candles[0].open_time_ms"
        assert str(err.value).startswith(
            "message 1: candles[0].open_time_ms: the candle opening at 1704103200000 (2024-01-01T10:00:00Z) closes at "
            "2024-01-01T11:00:00Z, after the server's clock")
        assert "only closed candles are stored" in str(err.value)
    assert count_candles(engine, SYMBOL, "1h") == 10

    clock.now = T0 + 11 * H  # closed now
    assert imp.add(ImportBatch("", "", forming)).inserted == 1
    assert imp.result() == ImportResult(inserted=11, last_open_time_ms=T0 + 10 * H)


def test_the_forming_candle_is_named_in_columns_too(engine):
    imp = CandleImport(engine, Clock(T0 + 5 * H))
    with pytest.raises(InvalidArgument) as err:
        imp.add(ImportBatch(SYMBOL, "1h", make_batch(6), columnar=True))
    assert err.value.field == "columns.open_time_ms[5]"
    assert stored_counts(engine)["candles"] == 0


def test_the_store_itself_refuses_a_forming_candle(engine):
    with pytest.raises(InvalidArgument) as err:
        import_candles(engine, SYMBOL, "1h", frame(make_batch(3)), closed_by_ms=T0 + 3 * H - 1)
    assert err.value.field == "open_time_ms" and "candles row 2" in str(err.value)
    assert "only closed candles are stored" in str(err.value)
    assert stored_counts(engine)["candles"] == 0


# --------------------------------------------------------------------------------------------------------------------
# every rule, naming the field; a refused message stores nothing of itself

# (column, index, value, field name, text): one bad value per rule
RULES = [
    ("open", 3, 1e6, "open", "outside the candle's range"),  # open above high
    ("close", 3, 1.0, "close", "outside the candle's range"),  # close below low
    ("high", 3, 50.0, "high", "is below low"),
    ("close", 3, math.nan, "close", "must be finite and > 0"),
    ("low", 3, 0.0, "low", "must be finite and > 0"),
    ("open", 3, -1.0, "open", "must be finite and > 0"),
    ("volume", 3, -1.0, "volume", "must be finite and >= 0"),
    ("open_interest", 3, 0.0, "open_interest", "must be finite and > 0 when present"),
    ("open_interest", 3, -5.0, "open_interest", "must be finite and > 0 when present"),
    ("funding_rate", 3, math.inf, "funding_rate", "must be finite when present"),
    ("open_time_ms", 3, T0 + 3 * H + 1, "open_time_ms", "is not aligned to the timeframe"),
    ("open_time_ms", 0, parse_time("2009-12-31T23:00:00Z"), "open_time_ms", "is before 2010-01-01"),
    ("open_time_ms", 3, T0 + H, "open_time_ms", "is not after the previous candle's"),
]


def with_value(c: CandleBatch, column: str, i: int, value: float) -> CandleBatch:
    arr = getattr(c, column).copy()
    arr[i] = value
    return replace(c, **{column: arr})


@pytest.mark.parametrize("columnar", [False, True], ids=["rows", "columns"])
@pytest.mark.parametrize(("column", "i", "value", "name", "text"), RULES, ids=[f"{r[0]}-{r[4][:24]}" for r in RULES])
def test_a_refused_message_stores_nothing_of_itself(engine, columnar, column, i, value, name, text):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    first = make_batch(5, funding=True, oi=True)
    assert imp.add(ImportBatch(SYMBOL, "1h", first, columnar)).inserted == 5
    bad = with_value(make_batch(12, start=20, funding=True, oi=True), column, i, value)
    with pytest.raises(InvalidArgument) as err:
        imp.add(ImportBatch("", "", bad, columnar))
    field = f"columns.{name}[{i}]" if columnar else f"candles[{i}].{name}"
    assert err.value.field == field
    assert str(err.value).startswith(f"message 1: {field}: ")
    assert text in str(err.value)
    assert str(err.value).endswith("(nothing of it is stored; the message before it is)")
    # The first message stays stored, whole; nothing of the refused one is, not even its valid candles.
    assert stored_counts(engine) == {"candles": 5, "funding_rates": 5, "open_interest": 5}
    pd.testing.assert_frame_equal(load_candles(engine, SYMBOL, "1h"), frame(first))


@pytest.mark.parametrize(
    ("first", "later", "field", "text"),
    [
        (("", "1h"), None, "symbol", "the first message must name the market"),
        ((SYMBOL, ""), None, "timeframe", "the first message must name the market"),
        (("btc/usdt", "1h"), None, "symbol", "expected BASE/QUOTE in upper-case"),
        ((SYMBOL, "2h"), None, "timeframe", "timeframe '2h' is not supported"),
        ((SYMBOL, "1h"), ("ETH/USDT", ""), "symbol", "but this call imports BTC/USDT 1h; a call imports one market"),
        ((SYMBOL, "1h"), ("", "4h"), "timeframe", "but this call imports BTC/USDT 1h"),
    ],
)
def test_the_market_is_named_by_the_first_message_and_kept(engine, first, later, field, text):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    if later is None:
        with pytest.raises(InvalidArgument) as err:
            imp.add(ImportBatch(*first, make_batch(3)))
        assert str(err.value).endswith("(nothing is stored)")
    else:
        imp.add(ImportBatch(*first, make_batch(3)))
        imp.add(ImportBatch(SYMBOL, "", make_batch(3, start=3)))  # repeating the market or leaving it empty is fine
        with pytest.raises(InvalidArgument) as err:
            imp.add(ImportBatch(*later, make_batch(3, start=6)))
    assert err.value.field == field and text in str(err.value)
    assert stored_counts(engine)["candles"] == (0 if later is None else 6)


def test_an_empty_message_and_an_empty_call_are_refused(engine):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    with pytest.raises(InvalidArgument) as err:
        imp.result()
    assert "sent no message" in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        imp.add(ImportBatch(SYMBOL, "1h", CandleBatch.empty(), columnar=True))
    assert err.value.field == "columns.open_time_ms" and "holds no candles" in str(err.value)


# --------------------------------------------------------------------------------------------------------------------
# re-sent candles


def test_identical_resend_is_unchanged_and_different_values_conflict(engine, caplog):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    sent = make_batch(10, funding=True, oi=True)
    assert imp.add(ImportBatch(SYMBOL, "1h", sent)) == ImportCounts(inserted=10)
    before = load_candles(engine, SYMBOL, "1h")

    caplog.set_level(logging.WARNING, logger="mlsignal.training")
    again = CandleImport(engine, Clock(T0 + 100 * H))
    assert again.add(ImportBatch(SYMBOL, "1h", sent)) == ImportCounts(unchanged=10)
    assert not caplog.records

    # Candles 3..9 again with other values on 5 and 7 (close and funding rate), and two new candles.
    changed = with_value(with_value(make_batch(9, start=3, funding=True, oi=True), "close", 2, 106.5),
                         "funding_rate", 4, 0.5)
    counts = again.add(ImportBatch("", "", changed))
    assert counts == ImportCounts(inserted=2, unchanged=5, conflicting=2, first_conflict_ms=T0 + 5 * H)
    assert again.result() == ImportResult(inserted=2, unchanged=15, conflicting=2, last_open_time_ms=T0 + 11 * H)
    after = load_candles(engine, SYMBOL, "1h")
    pd.testing.assert_frame_equal(after.iloc[:10], before)  # the stored values are kept
    assert len(after) == 12

    # One warning for the message, with the count and the first conflicting open time; not one line per candle.
    warnings = [r for r in caplog.records if r.name == "mlsignal.training"]
    assert len(warnings) == 1
    assert warnings[0].getMessage() == (
        "ImportCandles BTC/USDT 1h: 2 of 9 candles in message 1 differ from the stored ones (first at open_time_ms "
        f"{T0 + 5 * H}, 2024-01-01T05:00:00Z); the stored values are kept")


def test_funding_rate_on_a_stored_candle_without_one_is_a_conflict(engine):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    imp.add(ImportBatch(SYMBOL, "1h", make_batch(4)))
    counts = imp.add(ImportBatch("", "", make_batch(4, funding=True)))
    assert counts == ImportCounts(conflicting=4, first_conflict_ms=T0)
    assert stored_counts(engine)["funding_rates"] == 0  # nothing of a conflicting candle is written
    # A re-send that leaves the optional values out claims nothing about them: unchanged.
    imp2 = CandleImport(engine, Clock(T0 + 100 * H))
    imp2.add(ImportBatch("ETH/USDT", "1h", make_batch(4, funding=True, oi=True)))
    assert imp2.add(ImportBatch("", "", make_batch(4))) == ImportCounts(unchanged=4)


# --------------------------------------------------------------------------------------------------------------------
# funding rate and open interest: training sees exactly what Predict sees


def test_funding_and_open_interest_read_back_exactly_on_their_candles(engine):
    n = 12
    sent = make_batch(n, funding=True, oi=True)
    sent = with_value(with_value(sent, "funding_rate", 4, math.nan), "open_interest", 7, math.nan)
    # Series values from files around every candle: mid-candle, one millisecond before the close, and one after it.
    # The as-of join takes the latest value at or before a candle's close, so these are what a candle would read if
    # its own value were stored anywhere but exactly at its close.
    k = np.arange(n)
    near = np.concatenate([T0 + k * H + H // 2, T0 + (k + 1) * H - 1, T0 + (k + 1) * H + 1])
    for kind in ("funding-rate", "open-interest"):
        insert_series(engine, kind, SYMBOL, pd.DataFrame({"time_ms": near, "value": 7.0 + np.arange(3 * n)}))

    imp = CandleImport(engine, Clock(T0 + 100 * H))
    assert imp.add(ImportBatch(SYMBOL, "1h", sent)) == ImportCounts(inserted=n)
    got = load_candles(engine, SYMBOL, "1h")
    for name in ("funding_rate", "open_interest"):
        values = getattr(sent, name)
        has = ~np.isnan(values)
        np.testing.assert_array_equal(got[name].to_numpy()[has], values[has])  # bit for bit
    # A candle without its own value reads the series as of its close, like any candle (here: the file's value one
    # millisecond before the close); it is never given a later value.
    assert got["funding_rate"][4] == 7.0 + n + 4
    assert got["open_interest"][7] == 7.0 + n + 7


def test_a_new_candle_whose_series_slot_holds_another_value_is_stored_and_conflicting(engine):
    close_2 = T0 + 3 * H
    insert_series(engine, "funding-rate", SYMBOL, pd.DataFrame({"time_ms": [close_2], "value": [0.25]}))
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    counts = imp.add(ImportBatch(SYMBOL, "1h", make_batch(4, funding=True)))
    assert counts == ImportCounts(inserted=3, conflicting=1, first_conflict_ms=T0 + 2 * H)
    got = load_candles(engine, SYMBOL, "1h")
    assert len(got) == 4 and got["funding_rate"][2] == 0.25  # the stored value is kept


def test_timeframes_of_a_symbol_share_its_series_at_common_closes(engine):
    imp = CandleImport(engine, Clock(T0 + 100 * H))
    hourly = make_batch(2, funding=True)  # closes at T0 + 1h and T0 + 2h
    imp.add(ImportBatch(SYMBOL, "1h", hourly))
    quarter = make_batch(8, tf_ms=Q)
    quarter = replace(quarter, funding_rate=np.array([1.0, 2.0, 3.0, hourly.funding_rate[0], 5.0, 6.0, 7.0, 9.0]))
    counts = CandleImport(engine, Clock(T0 + 100 * H)).add(ImportBatch(SYMBOL, "15m", quarter))
    # The 15m candle closing at T0 + 1h carries the 1h candle's value: the same; the one closing at T0 + 2h another.
    assert counts == ImportCounts(inserted=7, conflicting=1, first_conflict_ms=T0 + 7 * Q)
    np.testing.assert_array_equal(load_candles(engine, SYMBOL, "15m")["funding_rate"],
                                  [1.0, 2.0, 3.0, hourly.funding_rate[0], 5.0, 6.0, 7.0, hourly.funding_rate[1]])
    np.testing.assert_array_equal(load_candles(engine, SYMBOL, "1h")["funding_rate"], hourly.funding_rate)
