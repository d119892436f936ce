"""Candles in, probabilities out: validation, features from the model's own spec, and the served probabilities.

Predict and StreamPredict both go through `predict_window`, so a stream fed one candle at a time and one Predict
over the whole series compute every number the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from shared.errors import FailedPrecondition, InvalidArgument
from shared.features import feature_matrix
from inference_service.models import LoadedModel

PRICE_FIELDS = ("open", "high", "low", "close")
OPTIONAL_FIELDS = ("funding_rate", "open_interest")


@dataclass(frozen=True)
class Candles:
    """Columns of a candle batch, oldest first; optional columns are NaN where the candle lacks them."""

    open_time_ms: np.ndarray  # int64
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    funding_rate: np.ndarray
    open_interest: np.ndarray

    def __len__(self) -> int:
        return len(self.open_time_ms)

    def columns(self) -> dict[str, np.ndarray]:
        return {
            "open": self.open, "high": self.high, "low": self.low, "close": self.close, "volume": self.volume,
            "funding_rate": self.funding_rate, "open_interest": self.open_interest,
        }

    def slice(self, start: int, stop: int | None = None) -> "Candles":
        s = slice(start, stop)
        return Candles(*(getattr(self, f)[s] for f in _FIELDS))

    def concat(self, other: "Candles") -> "Candles":
        return Candles(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in _FIELDS))


_FIELDS = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")


def empty_candles() -> Candles:
    return Candles(np.empty(0, np.int64), *(np.empty(0) for _ in range(7)))


def candles_from_proto(candles, funding_rate: bool = True, open_interest: bool = True) -> Candles:
    """Columns from repeated Candle messages; unset optional fields become NaN.

    Reading a field costs a Python attribute access per candle, so optional fields a model does not use are
    not read at all (left NaN), and the required ones are read in one pass.
    """
    n = len(candles)
    t = np.array([c.open_time_ms for c in candles], dtype=np.int64) if n else np.empty(0, np.int64)
    values = np.array([(c.open, c.high, c.low, c.close, c.volume) for c in candles], dtype=np.float64)
    values = values.reshape(n, 5).T.copy()
    nan = math.nan
    fr = (np.array([c.funding_rate if c.HasField("funding_rate") else nan for c in candles], dtype=np.float64)
          if funding_rate else np.full(n, nan))
    oi = (np.array([c.open_interest if c.HasField("open_interest") else nan for c in candles], dtype=np.float64)
          if open_interest else np.full(n, nan))
    return Candles(t, values[0], values[1], values[2], values[3], values[4], fr.reshape(n), oi.reshape(n))


def model_candles(model: LoadedModel, candles) -> Candles:
    """The candle columns this model needs (funding rate / open interest only when its features use them)."""
    spec = model.record.feature_spec
    return candles_from_proto(candles, spec.use_funding_rate, spec.use_open_interest)


def _row_error(c: Candles, i: int, timeframe_ms: int, previous_ms: int | None) -> str | None:
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


def _suspect_rows(c: Candles, timeframe_ms: int, previous_ms: int | None) -> np.ndarray:
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


def validate(c: Candles, timeframe_ms: int, max_batch: int, previous_ms: int | None = None) -> None:
    """Reject a batch with the index and field of the first bad candle (INVALID_ARGUMENT).

    previous_ms is the last open time a stream already holds: the first candle may repeat it (a replacement
    of a still-forming candle); every other time must be later.
    """
    n = len(c)
    if n == 0:
        raise InvalidArgument("candles: the request holds no candles; send at least one", field="candles")
    if n > max_batch:
        raise InvalidArgument(
            f"candles: {n} candles in one request, the limit is {max_batch} (MLSIGNAL_MAX_BATCH); split the batch",
            field="candles",
        )
    suspects = range(n) if n <= SCALAR_CHECK_MAX else _suspect_rows(c, timeframe_ms, previous_ms)
    for i in suspects:
        message = _row_error(c, int(i), timeframe_ms, previous_ms)
        if message:
            raise InvalidArgument(message, field="candles")


def require_optional_columns(model: LoadedModel, c: Candles) -> None:
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


@dataclass(frozen=True)
class Result:
    open_time_ms: np.ndarray
    proba: np.ndarray  # (n, 3) in CLASSES order (down, range, up); NaN rows when not ready
    ready: np.ndarray
    in_sample: np.ndarray


def predict_window(model: LoadedModel, window: Candles, first_row: int) -> Result:
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
    return Result(t, proba, ready, (t >= rec.train_start_ms) & (t <= rec.train_end_ms))
