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


def candles_from_proto(candles) -> Candles:
    """Columns from repeated Candle messages; unset optional fields become NaN."""
    n = len(candles)
    t = np.fromiter((c.open_time_ms for c in candles), np.int64, n)
    o = np.fromiter((c.open for c in candles), np.float64, n)
    h = np.fromiter((c.high for c in candles), np.float64, n)
    lo = np.fromiter((c.low for c in candles), np.float64, n)
    cl = np.fromiter((c.close for c in candles), np.float64, n)
    v = np.fromiter((c.volume for c in candles), np.float64, n)
    fr = np.fromiter((c.funding_rate if c.HasField("funding_rate") else math.nan for c in candles), np.float64, n)
    oi = np.fromiter((c.open_interest if c.HasField("open_interest") else math.nan for c in candles), np.float64, n)
    return Candles(t, o, h, lo, cl, v, fr, oi)


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if len(idx) else None


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
    bad = _first(c.open_time_ms % timeframe_ms != 0)
    if bad is not None:
        raise InvalidArgument(
            f"candles[{bad}].open_time_ms: {int(c.open_time_ms[bad])} is not aligned to the timeframe "
            f"({timeframe_ms} ms)", field="candles")
    for name in PRICE_FIELDS:
        col = getattr(c, name)
        bad = _first(~(np.isfinite(col) & (col > 0)))
        if bad is not None:
            raise InvalidArgument(f"candles[{bad}].{name}: must be finite and > 0, got {col[bad]!r}", field="candles")
    bad = _first(c.high < c.low)
    if bad is not None:
        raise InvalidArgument(
            f"candles[{bad}].high: {c.high[bad]!r} is below low {c.low[bad]!r}", field="candles")
    bad = _first(~(np.isfinite(c.volume) & (c.volume >= 0)))
    if bad is not None:
        raise InvalidArgument(f"candles[{bad}].volume: must be finite and >= 0, got {c.volume[bad]!r}", field="candles")
    for name in OPTIONAL_FIELDS:
        col = getattr(c, name)
        bad = _first(np.isinf(col))
        if bad is not None:
            raise InvalidArgument(f"candles[{bad}].{name}: must be finite", field="candles")
    bad = _first(np.diff(c.open_time_ms) <= 0)
    if bad is not None:
        raise InvalidArgument(
            f"candles[{bad + 1}].open_time_ms: {int(c.open_time_ms[bad + 1])} is not after the previous candle's "
            f"{int(c.open_time_ms[bad])}; open times must strictly increase", field="candles")
    if previous_ms is not None and c.open_time_ms[0] < previous_ms:
        raise InvalidArgument(
            f"candles[0].open_time_ms: {int(c.open_time_ms[0])} is before the stream's last candle "
            f"{previous_ms}; open times must keep increasing (equal replaces the last candle)", field="candles")


def require_optional_columns(model: LoadedModel, c: Candles) -> None:
    """A model trained with funding rate or open interest needs them on every candle (FAILED_PRECONDITION)."""
    spec = model.record.feature_spec
    for name, used in (("funding_rate", spec.use_funding_rate), ("open_interest", spec.use_open_interest)):
        if used:
            bad = _first(np.isnan(getattr(c, name)))
            if bad is not None:
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
    rows = np.arange(first_row, n)
    ready = rows >= spec.warmup_bars - 1
    proba = np.full((n - first_row, 3), np.nan)
    if ready.any():
        start = first_row + int(np.argmax(ready))
        X = feature_matrix(window.columns(), spec, start)
        if not np.isfinite(X).all():
            bad = start + int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
            raise FailedPrecondition(
                f"candles: features of the candle at open_time_ms {int(window.open_time_ms[bad])} are not finite",
                field="candles")
        proba[start - first_row:] = model.predict_proba(X)
    t = window.open_time_ms[first_row:]
    rec = model.record
    return Result(t, proba, ready, (t >= rec.train_start_ms) & (t <= rec.train_end_ms))
