"""Candles in, probabilities out: validation, features from the model's own spec, and the served probabilities.

Predict and StreamPredict both go through `predict_window`, so a stream fed one candle at a time and one Predict
over the whole series compute every number the same way.
"""

from __future__ import annotations

import math

import numpy as np

from inference_service.domain import CandleBatch, CandleSource, Predictions
from inference_service.model_store import LoadedModel
from shared.errors import FailedPrecondition, InvalidArgument
from shared.features import feature_matrix

PRICE_FIELDS = ("open", "high", "low", "close")
OPTIONAL_FIELDS = ("funding_rate", "open_interest")


def check_batch_size(n: int, max_batch: int) -> None:
    """A request carries between one and max_batch candles (INVALID_ARGUMENT otherwise)."""
    if n == 0:
        raise InvalidArgument("candles: the request holds no candles; send at least one", field="candles")
    if n > max_batch:
        raise InvalidArgument(
            f"candles: {n} candles in one request, the limit is {max_batch} (MLSIGNAL_MAX_BATCH); split the batch",
            field="candles",
        )


def read_candles(model: LoadedModel, candles: CandleSource, max_batch: int) -> CandleBatch:
    """The batch with the columns this model needs (funding rate / open interest only when its features use them).

    The size is checked before anything is read: an empty or oversized request is refused (INVALID_ARGUMENT).
    """
    check_batch_size(len(candles), max_batch)
    spec = model.record.feature_spec
    return candles.read(spec.use_funding_rate, spec.use_open_interest)


def _row_error(c: CandleBatch, i: int, timeframe_ms: int, previous_ms: int | None) -> str | None:
    """Why candle i is invalid, or None. The single definition of a valid candle, with the message to show."""
    t = int(c.open_time_ms[i])
    if t % timeframe_ms:
        return f"candles[{i}].open_time_ms: {t} is not aligned to the timeframe ({timeframe_ms} ms)"
    for name in PRICE_FIELDS:
        value = float(getattr(c, name)[i])
        if not (math.isfinite(value) and value > 0):
            return f"candles[{i}].{name}: must be finite and > 0, got {value!r}"
    if c.high[i] < c.low[i]:
        return f"candles[{i}].high: {float(c.high[i])!r} is below low {float(c.low[i])!r}"
    volume = float(c.volume[i])
    if not (math.isfinite(volume) and volume >= 0):
        return f"candles[{i}].volume: must be finite and >= 0, got {volume!r}"
    for name in OPTIONAL_FIELDS:
        if math.isinf(getattr(c, name)[i]):
            return f"candles[{i}].{name}: must be finite"
    if i > 0 and t <= c.open_time_ms[i - 1]:
        return (f"candles[{i}].open_time_ms: {t} is not after the previous candle's {int(c.open_time_ms[i - 1])}; "
                "open times must strictly increase")
    if i == 0 and previous_ms is not None and t < previous_ms:
        return (f"candles[0].open_time_ms: {t} is before the stream's last candle {previous_ms}; open times must "
                "keep increasing (equal replaces the last candle)")
    return None


def _suspect_rows(c: CandleBatch, timeframe_ms: int, previous_ms: int | None) -> np.ndarray:
    """Indices of candles that may be invalid (a superset is fine: _row_error decides)."""
    with np.errstate(invalid="ignore"):
        ok = (c.open_time_ms % timeframe_ms == 0) & (c.high >= c.low) & (c.volume >= 0) & (c.low > 0)
        ok &= np.isfinite(c.open + c.high + c.low + c.close + c.volume) & (c.open > 0) & (c.close > 0)
        ok &= ~np.isinf(c.funding_rate) & ~np.isinf(c.open_interest)
    ok[1:] &= c.open_time_ms[1:] > c.open_time_ms[:-1]
    if previous_ms is not None:
        ok[0] &= c.open_time_ms[0] >= previous_ms
    return np.flatnonzero(~ok)


SCALAR_CHECK_MAX = 8  # up to this many candles, checking row by row is cheaper than array operations


def validate(c: CandleBatch, timeframe_ms: int, previous_ms: int | None = None) -> None:
    """Reject a batch with the index and field of the first bad candle (INVALID_ARGUMENT).

    previous_ms is the last open time a stream already holds: the first candle may repeat it (a replacement
    of a still-forming candle); every other time must be later.
    """
    n = len(c)
    if n == 0:
        return
    suspects = range(n) if n <= SCALAR_CHECK_MAX else _suspect_rows(c, timeframe_ms, previous_ms)
    for i in suspects:
        message = _row_error(c, int(i), timeframe_ms, previous_ms)
        if message:
            raise InvalidArgument(message, field="candles")


def require_optional_columns(model: LoadedModel, c: CandleBatch) -> None:
    """A model trained with funding rate or open interest needs them on every candle (FAILED_PRECONDITION)."""
    spec = model.record.feature_spec
    for name, used in (("funding_rate", spec.use_funding_rate), ("open_interest", spec.use_open_interest)):
        if used:
            missing = np.flatnonzero(np.isnan(getattr(c, name)))
            if len(missing):
                bad = int(missing[0])
                raise FailedPrecondition(
                    f"candles[{bad}].{name}: model {model.model_id} was trained with {name} features, "
                    f"so every candle must carry {name}", field="candles")


def predict_window(model: LoadedModel, window: CandleBatch, first_row: int) -> Predictions:
    """Predictions for rows first_row.. of window; the rows before are history only."""
    spec = model.record.feature_spec
    n = len(window)
    start = max(first_row, spec.warmup_bars - 1)  # the first row with a full warm-up window
    ready = np.zeros(n - first_row, dtype=bool)
    ready[start - first_row:] = True
    if start < n:
        X = feature_matrix(window.columns(), spec, start)
        if not np.isfinite(X).all():
            bad = start + int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
            raise FailedPrecondition(
                f"candles: features of the candle at open_time_ms {int(window.open_time_ms[bad])} are not finite",
                field="candles")
        proba = model.predict_proba(X)
        if start > first_row:
            proba = np.concatenate([np.full((start - first_row, 3), np.nan), proba])
    else:
        proba = np.full((n - first_row, 3), np.nan)
    t = window.open_time_ms[first_row:]
    rec = model.record
    return Predictions(t, proba, ready, (t >= rec.train_start_ms) & (t <= rec.train_end_ms))
