"""The inference service's domain types: candle batches in, predictions out, both as numpy columns.

Columns, not one object per candle: a 1,024-candle request is a handful of arrays, and slicing or extending a
stream's window copies arrays, never Python objects.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# The candle batch and its field names are shared with the training service (`ImportCandles`).
from shared.candles import CANDLE_FIELDS, CandleBatch, candle_field, candles_field

__all__ = ["CANDLE_FIELDS", "CandleBatch", "CandleSource", "Predictions", "candle_field", "candles_field",
           "is_columnar"]


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


@dataclass(frozen=True)
class Predictions:
    """One row per predicted candle, in the candles' order."""

    open_time_ms: np.ndarray  # int64
    proba: np.ndarray  # (n, 3) float64 in CLASSES order (down, range, up); NaN rows where not ready
    ready: np.ndarray  # bool: the candle had warmup_bars candles of history
    in_sample: np.ndarray  # bool: the candle lies inside the model's training window
    ood_score: np.ndarray | None = None  # float64 distance from the training rows (NaN where not ready); None: none
    ood: np.ndarray | None = None  # bool: ood_score above the model's threshold
    # The features of the ready rows (the last len(features) rows), as the model read them: for the drift window
    # (`inference_service.journal`), never served.
    features: np.ndarray | None = None

    def ood_columns(self) -> tuple[np.ndarray, np.ndarray]:
        """(ood_score, ood) as served: NaN and False where the model has no score."""
        n = len(self.open_time_ms)
        score = self.ood_score if self.ood_score is not None else np.full(n, np.nan)
        flag = self.ood if self.ood is not None else np.zeros(n, dtype=bool)
        return score, flag
