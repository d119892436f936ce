"""The inference service's domain types: candle batches in, predictions out, both as numpy columns.

Columns, not one object per candle: a 1,024-candle request is a handful of arrays, and slicing or extending a
stream's window copies arrays, never Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np

# Field order of CandleBatch, used to rebuild a batch column by column.
CANDLE_FIELDS = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")


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


class CandleSource(Protocol):
    """Candles that are read into a CandleBatch once the model that answers is known.

    Reading an optional column can cost as much as reading all the others, so a source reads only the optional
    columns asked for and leaves the rest missing. `len` is the number of candles, known before reading.
    A CandleBatch is itself a source. A source may set `columnar = True` (see `is_columnar`): its candles came as
    packed columns, and error messages then name fields as the request spelled them (`columns.close[3]`).
    """

    def __len__(self) -> int: ...

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch: ...


def is_columnar(source: CandleSource) -> bool:
    """Whether a source's candles came as `PredictRequest.columns` rather than repeated `candles`."""
    return bool(getattr(source, "columnar", False))


def candle_field(columnar: bool, i: int, name: str) -> str:
    """The request field of candle i's `name`, as the request spelled it: `candles[i].name` or `columns.name[i]`."""
    return f"columns.{name}[{i}]" if columnar else f"candles[{i}].{name}"


def candles_field(columnar: bool) -> str:
    """The request field that holds the candles: `candles`, or `columns.open_time_ms` for columns."""
    return "columns.open_time_ms" if columnar else "candles"


@dataclass(frozen=True)
class Predictions:
    """One row per predicted candle, in the candles' order."""

    open_time_ms: np.ndarray  # int64
    proba: np.ndarray  # (n, 3) float64 in CLASSES order (down, range, up); NaN rows where not ready
    ready: np.ndarray  # bool: the candle had warmup_bars candles of history
    in_sample: np.ndarray  # bool: the candle lies inside the model's training window
