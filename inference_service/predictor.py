"""Candles in, probabilities out: validation, features from the model's own spec, and the served probabilities.

Predict and StreamPredict both go through `predict_window`, so a stream fed one candle at a time and one Predict
over the whole series compute every number the same way. A large batch is split into row ranges that are computed
on several threads; every row's features and probabilities are still computed by one thread from its own warm-up
window (ONNX Runtime runs single-threaded per call), so the numbers are bit-identical to a serial run.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from inference_service.domain import CandleBatch, CandleSource, Predictions, candle_field, candles_field, is_columnar
from inference_service.model_store import LoadedModel
from shared.errors import FailedPrecondition, InvalidArgument
from shared.features import feature_matrix
from shared.timeframes import ms_to_iso

PRICE_FIELDS = ("open", "high", "low", "close")
OPTIONAL_FIELDS = ("funding_rate", "open_interest")

# The earliest open time a candle may have: 2010-01-01T00:00:00Z. Earlier times (0 and negative ones included) are
# a client bug, typically an unset field or seconds sent as milliseconds.
EARLIEST_OPEN_MS = 1_262_304_000_000


def check_batch_size(n: int, max_batch: int, field: str = "candles") -> None:
    """A request carries between one and max_batch candles (INVALID_ARGUMENT otherwise)."""
    if n == 0:
        raise InvalidArgument(f"{field}: the request holds no candles; send at least one", field=field)
    if n > max_batch:
        raise InvalidArgument(
            f"{field}: {n} candles in one request, the limit is {max_batch} (MLSIGNAL_MAX_BATCH); split the batch",
            field=field,
        )


def read_candles(model: LoadedModel, candles: CandleSource, max_batch: int) -> CandleBatch:
    """The batch with every column the client sent, so Predict checks funding rate and open interest exactly as a
    stream does, whichever model answers.

    The size is checked before anything is read: an empty or oversized request is refused (INVALID_ARGUMENT).
    """
    check_batch_size(len(candles), max_batch, candles_field(is_columnar(candles)))
    return candles.read(True, True)


def latest_open_ms(timeframe_ms: int, now_ms: int | None = None) -> int:
    """The latest open time a candle may have: the server's clock plus one timeframe."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return now_ms + timeframe_ms


def _row_error(
    c: CandleBatch, i: int, timeframe_ms: int, previous_ms: int | None, latest_ms: int, columnar: bool
) -> tuple[str, str] | None:
    """(field, message) saying why candle i is invalid, or None. The single definition of a valid candle."""

    def at(name: str) -> str:
        return candle_field(columnar, i, name)

    t = int(c.open_time_ms[i])
    if t < EARLIEST_OPEN_MS:
        return at("open_time_ms"), (
            f"{at('open_time_ms')}: {t} is before 2010-01-01T00:00:00Z ({EARLIEST_OPEN_MS}); open times are UTC "
            "epoch milliseconds (0 usually means the field was not sent)")
    if t > latest_ms:
        return at("open_time_ms"), (
            f"{at('open_time_ms')}: {t} is after the server's clock plus one timeframe ({latest_ms}, "
            f"{ms_to_iso(latest_ms)}); open times are UTC epoch milliseconds")
    if t % timeframe_ms:
        return at("open_time_ms"), f"{at('open_time_ms')}: {t} is not aligned to the timeframe ({timeframe_ms} ms)"
    prices = {}
    for name in PRICE_FIELDS:
        value = float(getattr(c, name)[i])
        if not (math.isfinite(value) and value > 0):
            return at(name), f"{at(name)}: must be finite and > 0, got {value!r}"
        prices[name] = value
    low, high = prices["low"], prices["high"]
    if high < low:
        return at("high"), f"{at('high')}: {high!r} is below low {low!r}"
    for name in ("open", "close"):
        if not low <= prices[name] <= high:
            return at(name), (f"{at(name)}: {prices[name]!r} is outside the candle's range [low {low!r}, high "
                              f"{high!r}]; open and close must lie between low and high")
    volume = float(c.volume[i])
    if not (math.isfinite(volume) and volume >= 0):
        return at("volume"), f"{at('volume')}: must be finite and >= 0, got {volume!r}"
    funding = float(c.funding_rate[i])
    if math.isinf(funding):
        return at("funding_rate"), f"{at('funding_rate')}: must be finite when present (NaN = missing), got {funding!r}"
    oi = float(c.open_interest[i])
    if not math.isnan(oi) and not (math.isfinite(oi) and oi > 0):
        return at("open_interest"), (
            f"{at('open_interest')}: must be finite and > 0 when present (NaN = missing), got {oi!r}")
    if i > 0 and t <= c.open_time_ms[i - 1]:
        return at("open_time_ms"), (
            f"{at('open_time_ms')}: {t} is not after the previous candle's {int(c.open_time_ms[i - 1])}; "
            "open times must strictly increase")
    if i == 0 and previous_ms is not None and t < previous_ms:
        return at("open_time_ms"), (
            f"{at('open_time_ms')}: {t} is before the stream's last candle {previous_ms}; open times must keep "
            "increasing (equal replaces the last candle)")
    return None


def _suspect_rows(c: CandleBatch, timeframe_ms: int, previous_ms: int | None, latest_ms: int) -> np.ndarray:
    """Indices of candles that may be invalid (a superset is fine: _row_error decides)."""
    t = c.open_time_ms
    with np.errstate(invalid="ignore"):
        ok = (t >= EARLIEST_OPEN_MS) & (t <= latest_ms) & (t % timeframe_ms == 0)
        ok &= np.isfinite(c.open + c.high + c.low + c.close + c.volume) & (c.low > 0) & (c.volume >= 0)
        ok &= (c.low <= c.open) & (c.low <= c.close) & (c.open <= c.high) & (c.close <= c.high)
        ok &= ~np.isinf(c.funding_rate) & ~(c.open_interest <= 0) & ~np.isinf(c.open_interest)
    ok[1:] &= t[1:] > t[:-1]
    if previous_ms is not None:
        ok[0] &= t[0] >= previous_ms
    return np.flatnonzero(~ok)


SCALAR_CHECK_MAX = 8  # up to this many candles, checking row by row is cheaper than array operations


def validate(
    c: CandleBatch, timeframe_ms: int, previous_ms: int | None = None, *, columnar: bool = False,
    now_ms: int | None = None,
) -> None:
    """Reject a batch with the index and field of the first bad candle (INVALID_ARGUMENT).

    previous_ms is the last open time a stream already holds: the first candle may repeat it (a replacement
    of a still-forming candle); every other time must be later. Open times must lie between 2010-01-01 and the
    server's clock (now_ms, default the current time) plus one timeframe. `columnar` names fields as columns.
    """
    n = len(c)
    if n == 0:
        return
    latest_ms = latest_open_ms(timeframe_ms, now_ms)
    suspects = range(n) if n <= SCALAR_CHECK_MAX else _suspect_rows(c, timeframe_ms, previous_ms, latest_ms)
    for i in suspects:
        error = _row_error(c, int(i), timeframe_ms, previous_ms, latest_ms, columnar)
        if error:
            raise InvalidArgument(error[1], field=error[0])


def require_optional_columns(model: LoadedModel, c: CandleBatch, columnar: bool = False) -> None:
    """A model trained with funding rate or open interest needs them on every candle (FAILED_PRECONDITION)."""
    spec = model.record.feature_spec
    for name, used in (("funding_rate", spec.use_funding_rate), ("open_interest", spec.use_open_interest)):
        if used:
            missing = np.flatnonzero(np.isnan(getattr(c, name)))
            if len(missing):
                field = candle_field(columnar, int(missing[0]), name)
                raise FailedPrecondition(
                    f"{field}: model {model.model_id} was trained with {name} features, "
                    f"so every candle must carry {name}", field=field)


# Rows predicted on one thread before a batch is split across threads, and the smallest share of a thread.
PARALLEL_MIN_ROWS = 384
ROWS_PER_TASK_MIN = 192

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="predict")
        return _pool


def _proba_rows(model: LoadedModel, window: CandleBatch, a: int, b: int, whole: bool) -> np.ndarray:
    """Served probabilities of rows a..b-1 of window, all with a full warm-up window (FailedPrecondition when a
    row's features are not finite). `whole` passes the whole window instead of only the rows the features read."""
    spec = model.record.feature_spec
    lo = 0 if whole else max(0, a - spec.warmup_bars + 1)
    part = window if lo == 0 and b == len(window) else window.slice(lo, b)
    X = feature_matrix(part.columns(), spec, a - lo)
    if not np.isfinite(X).all():
        bad = a + int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise FailedPrecondition(
            f"candles: features of the candle at open_time_ms {int(window.open_time_ms[bad])} are not finite",
            field="candles")
    return model.predict_proba(X)


def predict_window(model: LoadedModel, window: CandleBatch, first_row: int) -> Predictions:
    """Predictions for rows first_row.. of window; the rows before are history only."""
    spec = model.record.feature_spec
    n = len(window)
    start = max(first_row, spec.warmup_bars - 1)  # the first row with a full warm-up window
    ready = np.zeros(n - first_row, dtype=bool)
    ready[start - first_row:] = True
    rows = n - start
    if rows <= 0:
        proba = np.full((n - first_row, 3), np.nan)
    else:
        tasks = min(_workers(), rows // ROWS_PER_TASK_MIN) if rows >= PARALLEL_MIN_ROWS else 1
        if tasks <= 1:
            proba = _proba_rows(model, window, start, n, whole=True)
        else:
            bounds = np.linspace(start, n, tasks + 1).astype(int)
            pool = _thread_pool()
            futures = [pool.submit(_proba_rows, model, window, int(a), int(b), False)
                       for a, b in itertools.pairwise(bounds)]
            proba = np.concatenate([f.result() for f in futures])  # the first failing range (in row order) raises
        if start > first_row:
            proba = np.concatenate([np.full((start - first_row, 3), np.nan), proba])
    t = window.open_time_ms[first_row:].copy()  # owned: a stream's window is a view of arrays it reuses
    rec = model.record
    return Predictions(t, proba, ready, (t >= rec.train_start_ms) & (t <= rec.train_end_ms))
