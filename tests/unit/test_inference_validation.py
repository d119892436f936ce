"""Request validation in the inference service, called directly: every rule refused with the field that is wrong,
the batch size checked before anything is converted, and the shape of columnar requests."""

# ruff: noqa: F811  (pytest fixtures imported from test_inference_service_logic are redefined as parameters)
from __future__ import annotations

import math
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest
from test_inference_service_logic import (  # noqa: F401  (fixtures)
    MAX_BATCH,
    SYMBOL,
    T0,
    TF,
    H,
    make_candles,
    model,
    registry,
    service,
    store,
    with_value,
)

from inference_service.converters import batch_from_request, columns_batch
from inference_service.domain import CandleBatch
from mlsignal.v1 import common_pb2, inference_pb2
from shared.candles import EARLIEST_OPEN_MS, validate
from shared.errors import InvalidArgument

NOW = T0 + 10_000 * H  # a fixed server clock for the tests of the time range
YEAR_2200 = 7_258_118_400_000  # 2200-01-01T00:00:00Z

# (column, index, value, text in the message): one bad value per rule. Index 40 lies on the vectorised path.
RULES = [
    ("close", 40, math.nan, "must be finite and > 0"),
    ("open", 40, math.inf, "must be finite and > 0"),
    ("low", 40, -1.0, "must be finite and > 0"),
    ("high", 40, 1.0, "is below low"),
    ("open", 40, 1e6, "outside the candle's range"),  # open above high
    ("close", 40, 1e-3, "outside the candle's range"),  # close below low
    ("volume", 40, -5.0, "must be finite and >= 0"),
    ("volume", 40, math.inf, "must be finite and >= 0"),
    ("funding_rate", 40, math.inf, "must be finite when present"),
    ("funding_rate", 40, -math.inf, "must be finite when present"),
    ("open_interest", 40, 0.0, "must be finite and > 0 when present"),
    ("open_interest", 40, -3.0, "must be finite and > 0 when present"),
    ("open_interest", 40, math.inf, "must be finite and > 0 when present"),
    ("open_time_ms", 0, 0, "is before 2010-01-01"),
    ("open_time_ms", 0, -H, "is before 2010-01-01"),
    ("open_time_ms", 0, EARLIEST_OPEN_MS - H, "is before 2010-01-01"),
    ("open_time_ms", 40, YEAR_2200, "after the server's clock plus one timeframe"),
    ("open_time_ms", 40, T0 + 40 * H + 1, "is not aligned to the timeframe"),
    ("open_time_ms", 40, T0 + 39 * H, "is not after the previous candle's"),
]


def full_candles(n: int = 60) -> CandleBatch:
    """Valid candles that carry funding rate and open interest, so every column is checked."""
    c = make_candles(n, funding=True)
    return replace(c, open_interest=np.linspace(1e4, 2e4, n))


def bad(c: CandleBatch, column: str, i: int, value: float) -> CandleBatch:
    return with_value(c, column, i, value)


# Every rule on the vectorised path (60 candles) and on the one-candle path, except the order rule, which needs two.
RULE_CASES = [(*rule, n) for n in (60, 1) for rule in RULES
              if not (n == 1 and rule[0] == "open_time_ms" and "previous candle" in rule[3])]


@pytest.mark.parametrize(("column", "i", "value", "text", "n"), RULE_CASES)
def test_each_rule_is_refused_with_the_field_named(column, i, value, text, n):
    i = min(i, n - 1)
    c = full_candles(n)
    with pytest.raises(InvalidArgument) as err:
        validate(bad(c, column, i, value), H, now_ms=NOW)
    assert err.value.field == f"candles[{i}].{column}"
    assert str(err.value).startswith(f"candles[{i}].{column}: ") and text in str(err.value)
    with pytest.raises(InvalidArgument) as err:
        validate(bad(c, column, i, value), H, now_ms=NOW, columnar=True)
    assert err.value.field == f"columns.{column}[{i}]"


def test_valid_candles_pass_and_missing_optional_values_are_fine():
    c = full_candles()
    validate(c, H, now_ms=NOW)
    validate(replace(c, funding_rate=np.full(len(c), np.nan), open_interest=np.full(len(c), np.nan)), H, now_ms=NOW)
    # open == low and close == high (and a flat candle) are consistent
    flat = replace(c, open=c.low.copy(), close=c.high.copy())
    validate(flat, H, now_ms=NOW)
    validate(replace(c, open=c.close.copy(), high=c.close.copy(), low=c.close.copy()), H, now_ms=NOW)


def test_the_open_time_range_follows_the_server_clock():
    c = make_candles(1)
    last_allowed = replace(c, open_time_ms=np.array([NOW + H]))
    validate(last_allowed, H, now_ms=NOW)  # the server's clock plus one timeframe
    with pytest.raises(InvalidArgument, match="after the server's clock plus one timeframe"):
        validate(replace(c, open_time_ms=np.array([NOW + 2 * H])), H, now_ms=NOW)
    validate(replace(c, open_time_ms=np.array([EARLIEST_OPEN_MS])), H, now_ms=NOW)
    # and the real clock is the default
    now = int(time.time() * 1000) // H * H
    validate(replace(c, open_time_ms=np.array([now])), H)
    with pytest.raises(InvalidArgument, match="after the server's clock"):
        validate(replace(c, open_time_ms=np.array([now + 3 * H])), H)


def test_the_first_bad_candle_is_reported():
    c = bad(bad(full_candles(), "close", 30, math.nan), "open_interest", 12, -1.0)
    with pytest.raises(InvalidArgument) as err:
        validate(c, H, now_ms=NOW)
    assert err.value.field == "candles[12].open_interest"


@pytest.mark.parametrize(("column", "i", "value", "text"), RULES)
def test_each_rule_through_the_service_rows_and_columns(service, column, i, value, text):
    """The same rules through InferenceService.predict, from request messages, rows and columns alike."""
    c = bad(full_candles(), column, i, value)
    for request, field in ((rows_request(c), f"candles[{i}].{column}"), (columns_request(c), f"columns.{column}[{i}]")):
        source = batch_from_request(request, MAX_BATCH)
        if column in ("funding_rate", "open_interest"):
            # Predict reads (and so checks) the optional columns its model uses; a stream keeps and checks them all
            source = FullColumns(source)
        with pytest.raises(InvalidArgument) as err:
            service.predict(SYMBOL, TF, "", source)
        assert err.value.field == field and text in str(err.value)


class FullColumns:
    """A source read with every column, whatever the model asks for."""

    def __init__(self, source):
        self.source = source
        self.columnar = getattr(source, "columnar", False)

    def __len__(self) -> int:
        return len(self.source)

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        return self.source.read(True, True)


# --------------------------------------------------------------------------------------------------------------------
# requests: rows, columns and the batch size


def rows_request(c: CandleBatch, **kw) -> inference_pb2.PredictRequest:
    candles = []
    for i in range(len(c)):
        m = common_pb2.Candle(open_time_ms=int(c.open_time_ms[i]), open=c.open[i], high=c.high[i], low=c.low[i],
                              close=c.close[i], volume=c.volume[i])
        if not np.isnan(c.funding_rate[i]):
            m.funding_rate = c.funding_rate[i]
        if not np.isnan(c.open_interest[i]):
            m.open_interest = c.open_interest[i]
        candles.append(m)
    return inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=candles, **kw)


def columns_request(c: CandleBatch, optional: bool = True, **kw) -> inference_pb2.PredictRequest:
    cols = common_pb2.CandleColumns(open_time_ms=c.open_time_ms.tolist(), open=c.open, high=c.high, low=c.low,
                                    close=c.close, volume=c.volume)
    if optional:
        cols.funding_rate.extend(c.funding_rate.tolist())
        cols.open_interest.extend(c.open_interest.tolist())
    return inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, columns=cols, **kw)


def test_a_request_with_both_candles_and_columns_is_refused():
    c = make_candles(3)
    request = columns_request(c)
    request.candles.extend(rows_request(c).candles)
    with pytest.raises(InvalidArgument, match="either as candles or as columns, not both") as err:
        batch_from_request(request, MAX_BATCH)
    assert err.value.field == "columns"


@pytest.mark.parametrize("column", ["open", "high", "low", "close", "volume", "funding_rate", "open_interest"])
def test_columns_of_unequal_length_are_refused(column):
    c = make_candles(5, funding=True)
    request = columns_request(c)
    del getattr(request.columns, column)[-1]
    with pytest.raises(InvalidArgument, match=rf"columns\.{column}: 4 values, expected") as err:
        batch_from_request(request, MAX_BATCH)
    assert err.value.field == f"columns.{column}"


def test_optional_columns_may_be_empty_or_one_per_candle():
    c = make_candles(5, funding=True)
    batch = columns_batch(columns_request(c, optional=False).columns)
    assert np.isnan(batch.funding_rate).all() and np.isnan(batch.open_interest).all()
    full = columns_batch(columns_request(c).columns)
    assert np.array_equal(full.funding_rate, c.funding_rate) and np.isnan(full.open_interest).all()
    assert full.open_time_ms.dtype == np.int64 and np.array_equal(full.open_time_ms, c.open_time_ms)


def test_empty_requests_are_refused_naming_their_field():
    with pytest.raises(InvalidArgument, match="candles: the request holds no candles") as err:
        batch_from_request(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF), MAX_BATCH)
    assert err.value.field == "candles"
    empty_columns = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, columns=common_pb2.CandleColumns())
    with pytest.raises(InvalidArgument, match=r"columns\.open_time_ms: the request holds no candles") as err:
        batch_from_request(empty_columns, MAX_BATCH)
    assert err.value.field == "columns.open_time_ms"


def test_an_oversized_column_request_is_refused_before_its_columns_are_read():
    """The size error wins over a malformed column: it is checked before any column is looked at."""
    c = make_candles(MAX_BATCH + 1)
    request = columns_request(c)
    del request.columns.close[:]  # converting would fail on this column
    with pytest.raises(InvalidArgument, match=f"the limit is {MAX_BATCH}") as err:
        batch_from_request(request, MAX_BATCH)
    assert err.value.field == "columns.open_time_ms"


def test_an_oversized_row_request_is_refused_before_its_candles_are_read():
    """Candles that would fail validation, too many of them: refused for the size, without reading a candle."""
    request = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF)
    for _ in range(MAX_BATCH + 1):
        request.candles.add()  # open_time_ms = 0 and zero prices: invalid if they were ever read
    with pytest.raises(InvalidArgument, match=f"the limit is {MAX_BATCH}") as err:
        batch_from_request(request, MAX_BATCH)
    assert err.value.field == "candles"


@pytest.mark.parametrize("columnar", [False, True])
def test_refusing_a_huge_request_allocates_nothing_per_candle(columnar):
    """200,000 empty candles cost their parsing only: refusing them allocates under 64 KB (converting them would
    take tens of megabytes)."""
    n = 200_000
    if columnar:
        request = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, columns=common_pb2.CandleColumns(
            open_time_ms=[0] * n, open=[0.0] * n, high=[0.0] * n, low=[0.0] * n, close=[0.0] * n, volume=[0.0] * n))
    else:
        request = inference_pb2.PredictRequest.FromString(b"\x22\x00" * n)  # n empty Candle messages
        assert len(request.candles) == n
    tracemalloc.start()
    try:
        with pytest.raises(InvalidArgument, match="the limit is"):
            batch_from_request(request, MAX_BATCH)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 10, peak
