"""Candles as numpy columns (`CandleBatch`) and the single definition of a valid candle (`validate`).

Inference checks every candle it predicts with `validate`, and the training service checks every candle it imports
(`ImportCandles`) with the same function, so a candle is valid or invalid the same way everywhere. The two differ
only in the latest open time they accept: inference takes a still-forming candle (open time up to the server's clock
plus one timeframe), an import only closed candles (`closed_only`: the close, open time plus one timeframe, at or
before the server's clock).

Columns, not one object per candle: a 1,024-candle request is a handful of arrays, and slicing or extending a
stream's window copies arrays, never Python objects.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import numpy as np

from shared.errors import InvalidArgument
from shared.timeframes import ms_to_iso

# Field order of CandleBatch, used to rebuild a batch column by column.
CANDLE_FIELDS = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")
PRICE_FIELDS = ("open", "high", "low", "close")
OPTIONAL_FIELDS = ("funding_rate", "open_interest")

# The earliest open time a candle may have: 2010-01-01T00:00:00Z. Earlier times (0 and negative ones included) are
# a client bug, typically an unset field or seconds sent as milliseconds.
EARLIEST_OPEN_MS = 1_262_304_000_000


@dataclass(frozen=True)
class CandleBatch:
    """Candles oldest first, one equal-length array per field; the optional columns are NaN where a candle lacks
    the value (or where the model being served does not use that column)."""

    open_time_ms: np.ndarray  # int64
    open: np.ndarray  # float64, like every column below
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    funding_rate: np.ndarray
    open_interest: np.ndarray

    @classmethod
    def empty(cls) -> CandleBatch:
        return cls(np.empty(0, np.int64), *(np.empty(0) for _ in range(7)))

    def __len__(self) -> int:
        return len(self.open_time_ms)

    def columns(self) -> dict[str, np.ndarray]:
        """The value columns by name, as `shared.features.feature_matrix` takes them."""
        return {
            "open": self.open, "high": self.high, "low": self.low, "close": self.close, "volume": self.volume,
            "funding_rate": self.funding_rate, "open_interest": self.open_interest,
        }

    def slice(self, start: int, stop: int | None = None) -> CandleBatch:
        s = slice(start, stop)
        return CandleBatch(*(getattr(self, f)[s] for f in CANDLE_FIELDS))

    def concat(self, other: CandleBatch) -> CandleBatch:
        return CandleBatch(*(np.concatenate([getattr(self, f), getattr(other, f)]) for f in CANDLE_FIELDS))

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        """The batch as a model sees it: optional columns the model does not use are missing (NaN)."""
        if funding_rate and open_interest:
            return self
        n = len(self)
        return replace(
            self,
            funding_rate=self.funding_rate if funding_rate else np.full(n, np.nan),
            open_interest=self.open_interest if open_interest else np.full(n, np.nan),
        )


def candle_field(columnar: bool, i: int, name: str) -> str:
    """The request field of candle i's `name`, as the request spelled it: `candles[i].name` or `columns.name[i]`."""
    return f"columns.{name}[{i}]" if columnar else f"candles[{i}].{name}"


def candles_field(columnar: bool) -> str:
    """The request field that holds the candles: `candles`, or `columns.open_time_ms` for columns."""
    return "columns.open_time_ms" if columnar else "candles"


def check_batch_size(n: int, max_batch: int, field: str = "candles") -> None:
    """A request carries between one and max_batch candles (INVALID_ARGUMENT otherwise)."""
    if n == 0:
        raise InvalidArgument(f"{field}: the request holds no candles; send at least one", field=field)
    if n > max_batch:
        raise InvalidArgument(
            f"{field}: {n} candles in one request, the limit is {max_batch} (MLSIGNAL_MAX_BATCH); split the batch",
            field=field,
        )


def latest_open_ms(timeframe_ms: int, now_ms: int | None = None, closed_only: bool = False) -> int:
    """The latest open time a candle may have: the server's clock plus one timeframe, or with `closed_only` the
    clock minus one timeframe (the candle closes, at open time plus one timeframe, at or before the clock)."""
    if now_ms is None:
        now_ms = int(time.time() * 1000)
    return now_ms - timeframe_ms if closed_only else now_ms + timeframe_ms


def _row_error(
    c: CandleBatch, i: int, timeframe_ms: int, previous_ms: int | None, latest_ms: int, columnar: bool,
    closed_only: bool = False,
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
        if closed_only:
            close_ms, clock_ms = t + timeframe_ms, latest_ms + timeframe_ms
            return at("open_time_ms"), (
                f"{at('open_time_ms')}: the candle opening at {t} ({ms_to_iso(t)}) closes at {ms_to_iso(close_ms)}, "
                f"after the server's clock ({clock_ms}, {ms_to_iso(clock_ms)}); only closed candles are stored, "
                "send it again once it has closed")
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
    now_ms: int | None = None, closed_only: bool = False,
) -> None:
    """Reject a batch with the index and field of the first bad candle (INVALID_ARGUMENT).

    previous_ms is the last open time a stream already holds: the first candle may repeat it (a replacement
    of a still-forming candle); every other time must be later. Open times must lie between 2010-01-01 and the
    server's clock (now_ms, default the current time) plus one timeframe; with `closed_only`, every candle must have
    closed by the server's clock (open time + one timeframe <= now_ms). `columnar` names fields as columns.
    """
    n = len(c)
    if n == 0:
        return
    latest_ms = latest_open_ms(timeframe_ms, now_ms, closed_only)
    suspects = range(n) if n <= SCALAR_CHECK_MAX else _suspect_rows(c, timeframe_ms, previous_ms, latest_ms)
    for i in suspects:
        error = _row_error(c, int(i), timeframe_ms, previous_ms, latest_ms, columnar, closed_only)
        if error:
            raise InvalidArgument(error[1], field=error[0])
