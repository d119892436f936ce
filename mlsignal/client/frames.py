"""Candle frames <-> messages: the one place that decides how a pandas frame becomes Candle messages and how
predictions come back as columns.

Times are the risky part of a trading frame (a naive index or epoch seconds shift every candle silently), so they
are checked here before anything is sent; the naive-datetime rule itself belongs to `shared.timeframes`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd

from mlsignal.client.errors import ProtocolError
from mlsignal.v1 import common_pb2, inference_pb2
from shared.timeframes import datetime_to_ms, parse_time

__all__ = [
    "MIN_PLAUSIBLE_MS",
    "ML_COLUMNS",
    "OPTIONAL_COLUMNS",
    "REQUIRED_COLUMNS",
    "TIME_COLUMNS",
    "batch_plan",
    "candle_from_item",
    "frame_times_ms",
    "frame_to_candles",
    "frame_to_columns",
    "predictions_to_frame",
    "to_epoch_ms",
]

ML_COLUMNS = ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY", "ML_IN_SAMPLE", "ML_MODEL_ID",
              "ML_OOD_SCORE", "ML_OOD")
REQUIRED_COLUMNS = ("open", "high", "low", "close", "volume")
OPTIONAL_COLUMNS = ("funding_rate", "open_interest")
# Where a frame or a row may carry its open time, in the order they are looked for.
TIME_COLUMNS = ("open_time_ms", "open_time", "timestamp")
# Epoch milliseconds below this (1973-03-03) are almost certainly epoch seconds passed by mistake.
MIN_PLAUSIBLE_MS = 10**11


def to_epoch_ms(value: Any, what: str = "time") -> int:
    """UTC epoch milliseconds from a tz-aware datetime / pandas Timestamp, an ISO-8601 string, or epoch ms (int).

    ISO strings without an offset are read as UTC (``"2018-01-01"`` is midnight UTC). A tz-naive datetime is refused,
    because nothing says which zone it is in; floats are refused, because seconds and milliseconds look alike.
    `what` names the argument in error messages.

    Example::

        >>> to_epoch_ms("2018-01-01")                                       # doctest: +SKIP
        1514764800000
        >>> to_epoch_ms(pd.Timestamp("2018-01-01", tz="UTC"))              # doctest: +SKIP
        1514764800000
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what}: expected a datetime, ISO-8601 string or epoch milliseconds, got {value!r}")
    if isinstance(value, (int, np.integer)):
        ms = int(value)
        if ms < MIN_PLAUSIBLE_MS:
            raise ValueError(f"{what}: {ms} is before 1973 as epoch milliseconds; epoch seconds must be multiplied "
                             "by 1000")
        return ms
    if isinstance(value, np.datetime64):
        raise ValueError(f"{what}: numpy datetime64 has no time zone; pass pd.Timestamp(value, tz='UTC')")
    if isinstance(value, (str, datetime)):  # datetime includes pd.Timestamp
        try:
            return parse_time(value) if isinstance(value, str) else datetime_to_ms(value)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    raise ValueError(f"{what}: expected a tz-aware datetime, ISO-8601 string or epoch milliseconds (int), "
                     f"got {type(value).__name__}")


# A time of day followed by its zone: `2019-09-01T00:00:00Z`, `... 00:00+02:00` (a date alone names no zone).
_ZONED = r"[T ]\d\d(?::?\d\d){0,2}(?:[.,]\d+)?(?:Z|[+-]\d\d(?::?\d\d)?)$"


def candle_time_text_ms(text: str) -> int:
    """Epoch milliseconds of a candle time written as text: ISO-8601 naming its zone (``Z`` or an offset).

    A candle time without a zone is refused, as a tz-naive datetime is: reading it as UTC would silently shift every
    candle of a file written in local time. `frame_times_ms` (predict) and `candle_from_item` (stream) share this
    rule and its messages.
    """
    if not isinstance(text, str):
        raise ValueError(f"candle time {text!r} is not text")
    stripped = text.strip()
    try:
        ms = parse_time(stripped)
    except ValueError as exc:
        raise ValueError(f"candle time {exc}") from None
    if not re.search(_ZONED, stripped):
        raise ValueError(f"candle time {text!r} has no time zone; write it as UTC (2019-09-01T00:00:00Z) or with "
                         "an offset (+00:00)")
    return ms


def _text_times_ms(values: pd.Series) -> np.ndarray:
    """`candle_time_text_ms` over a column, vectorised; the first bad value raises its message."""
    text = values.astype("string").str.strip()
    zoned = text.str.contains(_ZONED).fillna(False).to_numpy(dtype=bool)
    error: ValueError | None = None
    if zoned.all():
        try:
            return _index_ms(pd.DatetimeIndex(pd.to_datetime(text, format="ISO8601", utc=True)), "candle times")
        except ValueError as exc:
            error = exc
    for value in values:  # the first value that fails, with the message a single candle gets
        candle_time_text_ms(value)
    raise error if error is not None else ValueError("candle times could not be read")


def _index_ms(index: pd.DatetimeIndex, what: str) -> np.ndarray:
    if index.tz is None:
        raise ValueError(f"{what} is tz-naive; candle times must be UTC: use df.tz_localize('UTC') if the times are "
                         "UTC, or tz_convert('UTC') if they carry another zone")
    if index.hasnans:
        raise ValueError(f"{what} has missing (NaT) times")
    ns = index.tz_convert("UTC").as_unit("ns").asi8
    if np.any(ns % 1_000_000):
        raise ValueError(f"{what} has sub-millisecond times; candle times are whole milliseconds")
    return ns // 1_000_000


def frame_times_ms(df: pd.DataFrame) -> np.ndarray:
    """Candle open times of a frame as int64 UTC epoch milliseconds.

    The times come from a tz-aware DatetimeIndex, or else from an ``open_time_ms``, ``open_time`` or ``timestamp``
    column holding tz-aware datetimes, int epoch milliseconds or ISO-8601 text that names its zone (as
    ``pd.read_csv`` leaves ``2019-09-01T00:00:00Z``). A tz-naive index, column or text is refused with ValueError,
    as are integers too small to be epoch milliseconds.

    Example::

        >>> frame_times_ms(df)[:2]                                          # doctest: +SKIP
        array([1514764800000, 1514768400000])
    """
    if isinstance(df.index, pd.DatetimeIndex):
        return _index_ms(df.index, "the DatetimeIndex")
    for name in TIME_COLUMNS:
        if name not in df.columns:
            continue
        col = df[name]
        if isinstance(col.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(col.dtype):
            return _index_ms(pd.DatetimeIndex(col), f"column {name!r}")
        if pd.api.types.is_integer_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            ms = col.to_numpy(dtype=np.int64)
            if len(ms) and ms.min() < MIN_PLAUSIBLE_MS:
                raise ValueError(f"column {name!r} holds integers before 1973 as epoch milliseconds; epoch seconds "
                                 "must be multiplied by 1000")
            return ms
        if pd.api.types.is_object_dtype(col.dtype) or pd.api.types.is_string_dtype(col.dtype):
            return _text_times_ms(col)
        raise ValueError(f"column {name!r} has dtype {col.dtype}; expected tz-aware datetimes, int epoch "
                         "milliseconds or ISO-8601 text with a zone")
    raise ValueError("no candle times: give the frame a tz-aware DatetimeIndex or an "
                     f"{', '.join(repr(c) for c in TIME_COLUMNS)} column")


def _float_column(df: pd.DataFrame, name: str) -> np.ndarray:
    try:
        return df[name].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r} is not numeric ({df[name].dtype}): {exc}") from None


def frame_to_candles(df: pd.DataFrame) -> list[common_pb2.Candle]:
    """Candle messages for the rows of a frame, in row order.

    Needs columns open, high, low, close, volume and times as `frame_times_ms` reads them. Optional funding_rate and
    open_interest columns are sent where they are not NaN; a NaN leaves the field unset (absent, not zero). Values are
    sent as they are; the service validates them and names the bad candle.

    Example::

        >>> candles = frame_to_candles(df)                                  # doctest: +SKIP
        >>> stub.Predict(inference_pb2.PredictRequest(symbol="BTC/USDT", timeframe="1h", candles=candles))
        ... # doctest: +SKIP
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}; a candle frame needs {', '.join(REQUIRED_COLUMNS)}")
    times = frame_times_ms(df).tolist()
    o, h, low, c, v = (_float_column(df, name).tolist() for name in REQUIRED_COLUMNS)
    optional = [name for name in OPTIONAL_COLUMNS if name in df.columns]
    Candle = common_pb2.Candle
    if not optional:
        return [Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f)
                for t, a, b, d, e, f in zip(times, o, h, low, c, v, strict=True)]
    # Python lists with None for NaN: building messages from them is several times faster than per-row numpy access.
    extra = {}
    for name in optional:
        arr = _float_column(df, name)
        obj = arr.astype(object)
        obj[np.isnan(arr)] = None
        extra[name] = obj.tolist()
    none = [None] * len(times)
    fr = extra.get("funding_rate", none)
    oi = extra.get("open_interest", none)
    out = []
    for t, a, b, d, e, f, x, y in zip(times, o, h, low, c, v, fr, oi, strict=True):
        if x is None and y is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f))
        elif y is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, funding_rate=x))
        elif x is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, open_interest=y))
        else:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, funding_rate=x,
                              open_interest=y))
    return out


def frame_columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """The candle columns of a frame as numpy arrays, checked as `frame_to_candles` checks them: open_time_ms (int64,
    from `frame_times_ms`), open..volume (float64) and, when the frame has them, funding_rate and open_interest
    (float64, NaN = missing)."""
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}; a candle frame needs {', '.join(REQUIRED_COLUMNS)}")
    out = {"open_time_ms": frame_times_ms(df)}
    for name in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS):
        if name in df.columns:
            out[name] = _float_column(df, name)
    return out


def columns_message(columns: Mapping[str, np.ndarray], start: int = 0,
                    stop: int | None = None) -> common_pb2.CandleColumns:
    """A CandleColumns message of rows [start, stop) of `frame_columns` output. An optional column is sent only
    when one of those rows has a value (NaN = missing), so candles without funding rate or open interest cost
    nothing for them."""
    msg = common_pb2.CandleColumns()
    for name, values in columns.items():
        part = values[start:stop]
        if name in OPTIONAL_COLUMNS and np.isnan(part).all():
            continue
        getattr(msg, name).extend(part.tolist())
    return msg


def frame_to_columns(df: pd.DataFrame) -> common_pb2.CandleColumns:
    """The rows of a frame as one CandleColumns message (packed arrays, in row order): what a request's `columns`
    field takes instead of one Candle message per row.

    Needs the columns `frame_to_candles` needs; optional funding_rate and open_interest columns are sent when they
    hold a value (NaN = missing).

    Example::

        >>> request = training_pb2.ImportCandlesRequest(symbol="BTC/USDT", timeframe="1h",
        ...                                             columns=frame_to_columns(df))  # doctest: +SKIP
    """
    return columns_message(frame_columns(df))


def predictions_to_frame(
    df: pd.DataFrame,
    predictions: Sequence[inference_pb2.Prediction],
    model_id: str | Sequence[str],
) -> pd.DataFrame:
    """A copy of `df` with the ML columns from one Prediction per row (same order, same open times).

    Adds float ML_UP_PROB, ML_DOWN_PROB, ML_RANGE_PROB (NaN wherever ``ready`` is false, whatever the message holds),
    bool ML_READY, bool ML_IN_SAMPLE, str ML_MODEL_ID (one id for all rows, or one per row), float ML_OOD_SCORE (how
    far the candle lies from the model's training rows; NaN where not ready or where the model has no score) and
    bool ML_OOD (the score above the model's threshold: 1 % of its training rows are). A count or time that does not
    match the frame raises ProtocolError rather than misaligning probabilities.

    Example::

        >>> resp = stub.Predict(request)                                    # doctest: +SKIP
        >>> out = predictions_to_frame(df, resp.predictions, resp.model_id)  # doctest: +SKIP
    """
    times = frame_times_ms(df)
    n = len(df)
    if len(predictions) != n:
        raise ProtocolError(None, f"{len(predictions)} predictions for {n} candles; expected one per candle")
    if isinstance(model_id, str):
        ids = [model_id] * n
    else:
        ids = [str(m) for m in model_id]
        if len(ids) != n:
            raise ProtocolError(None, f"{len(ids)} model ids for {n} candles")
    got_times = np.fromiter((p.open_time_ms for p in predictions), dtype=np.int64, count=n)
    bad = np.flatnonzero(got_times != times)
    if len(bad):
        i = int(bad[0])
        raise ProtocolError(None, f"prediction {i} is for open_time_ms {got_times[i]} but row {i} opens at "
                                  f"{times[i]}; predictions must follow the candles in order")
    ready = np.fromiter((p.ready for p in predictions), dtype=bool, count=n)
    in_sample = np.fromiter((p.in_sample for p in predictions), dtype=bool, count=n)
    up = np.fromiter((p.ml_up_prob for p in predictions), dtype=np.float64, count=n)
    down = np.fromiter((p.ml_down_prob for p in predictions), dtype=np.float64, count=n)
    rng = np.fromiter((p.ml_range_prob for p in predictions), dtype=np.float64, count=n)
    score = np.fromiter((p.ood_score if p.HasField("ood_score") else np.nan for p in predictions), dtype=np.float64,
                        count=n)
    ood = np.fromiter((p.ood for p in predictions), dtype=bool, count=n)
    for arr in (up, down, rng, score):
        arr[~ready] = np.nan
    out = df.copy()
    out["ML_UP_PROB"] = up
    out["ML_DOWN_PROB"] = down
    out["ML_RANGE_PROB"] = rng
    out["ML_READY"] = ready
    out["ML_IN_SAMPLE"] = in_sample
    out["ML_MODEL_ID"] = pd.Series(ids, index=out.index, dtype=str)
    out["ML_OOD_SCORE"] = score
    out["ML_OOD"] = ood & ready
    return out


def candle_from_item(item: Any) -> common_pb2.Candle:
    """A Candle from a Candle message, a mapping, a pandas Series, an iterrows() pair or an itertuples() row.

    Live feeds hand over candles in many shapes; accepting them all keeps conversion code out of strategies.
    The time comes from an open_time_ms / open_time / timestamp key, or else from the row's index.
    """
    if isinstance(item, common_pb2.Candle):
        return item
    time_value: Any = None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (pd.Series, Mapping)):
        time_value, item = item  # df.iterrows(): (index, row)
    elif isinstance(item, tuple) and hasattr(item, "_asdict"):
        d = item._asdict()  # df.itertuples(): Index is the first field
        time_value = d.pop("Index", None)
        item = d
    if isinstance(item, pd.Series):
        if time_value is None and not any(k in item.index for k in TIME_COLUMNS):
            time_value = item.name
        item = item.to_dict()
    if not isinstance(item, Mapping):
        raise ValueError(f"cannot read a candle from {type(item).__name__}; expected a Candle message, a mapping, "
                         "a pandas row, or an (index, row) pair")
    for key in TIME_COLUMNS:
        if key in item:
            time_value = item[key]
            break
    if time_value is None:
        raise ValueError("candle has no time: expected key open_time_ms, open_time or timestamp, or a row whose "
                         "index is its open time")
    # Text follows the rule and message `predict` applies to a text column.
    ms = (candle_time_text_ms(time_value) if isinstance(time_value, str)
          else to_epoch_ms(time_value, "candle open time"))
    fields: dict[str, Any] = {"open_time_ms": ms}
    for name in REQUIRED_COLUMNS:
        if name not in item:
            raise ValueError(f"candle at {ms} has no {name!r}; a candle needs {', '.join(REQUIRED_COLUMNS)}")
        fields[name] = _as_float(item[name], name, ms)
    for name in OPTIONAL_COLUMNS:
        value = item.get(name)
        if value is None:
            continue
        f = _as_float(value, name, ms)
        if not math.isnan(f):
            fields[name] = f
    return common_pb2.Candle(**fields)


def _as_float(value: Any, name: str, ms: int) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"candle at {ms}: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"candle at {ms}: {name} must be a number, got {value!r}") from None


def batch_plan(n: int, max_batch: int, overlap: int) -> list[tuple[int, int, int]]:
    """How `InferenceClient.predict` splits `n` candles: a list of (start, stop, keep_from) row ranges.

    Each request covers rows [start, stop) with at most `max_batch` rows; its predictions for rows [keep_from, stop)
    are kept. Every request after the first starts `overlap` rows before the first row it keeps, so each kept row
    has the same history inside its request as it would have in one request over all rows.

    Example::

        >>> batch_plan(10, 6, 2)
        [(0, 6, 0), (4, 10, 6)]
    """
    if n < 0 or max_batch < 1 or overlap < 0:
        raise ValueError(f"bad batch plan arguments n={n}, max_batch={max_batch}, overlap={overlap}")
    if n <= max_batch:
        return [(0, n, 0)] if n else []
    if overlap >= max_batch:
        raise ValueError(f"max_batch={max_batch} must be larger than the overlap of {overlap} candles the model "
                         "needs as history; raise max_batch")
    plan = [(0, max_batch, 0)]
    keep_from = max_batch
    while keep_from < n:
        start = keep_from - overlap
        stop = min(n, start + max_batch)
        plan.append((start, stop, keep_from))
        keep_from = stop
    return plan
