"""Labels: what happened over the next ``horizon_bars`` candles, as down / range / up.

The model's probability columns follow ``CLASSES``: ML_DOWN_PROB, ML_RANGE_PROB, ML_UP_PROB.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

CLASSES = ("down", "range", "up")
DOWN, RANGE, UP = 0, 1, 2
UNLABELLED = -1

MAX_HORIZON_BARS = 10_000

# Binary floating point cannot represent most thresholds or price ratios exactly: 102 / 100 - 1 is
# 0.020000000000000018, not 0.02. A move of exactly the threshold in decimal terms must count as
# "at the threshold" (range), so a return only counts as beyond the threshold when it exceeds it by
# more than this. 1e-12 is far above the rounding error of a ratio (~1e-16) and far below any
# price move that matters.
THRESHOLD_TOLERANCE = 1e-12


@dataclass(frozen=True)
class LabelSpec:
    """How candles are labelled: the look-ahead in candles and the move (a fraction, 0.02 = 2 %)."""

    horizon_bars: int = 24
    threshold: float = 0.02

    def __post_init__(self) -> None:
        h = self.horizon_bars
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or not 1 <= h <= MAX_HORIZON_BARS:
            raise ValueError(f"horizon_bars must be an integer between 1 and {MAX_HORIZON_BARS}, got {h!r}")
        object.__setattr__(self, "horizon_bars", int(h))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or not 0 < t < 1:
            raise ValueError(f"threshold must be a finite fraction > 0 and < 1 (0.02 means 2 %), got {t!r}")
        object.__setattr__(self, "threshold", float(t))


def future_return(close: np.ndarray, horizon_bars: int) -> np.ndarray:
    """``close[t + h] / close[t] - 1``; NaN for the last ``h`` rows, whose future is not known."""
    if isinstance(horizon_bars, bool) or not isinstance(horizon_bars, numbers.Integral) or horizon_bars < 1:
        raise ValueError(f"horizon_bars must be an integer >= 1, got {horizon_bars!r}")
    close = np.asarray(close, dtype=np.float64)
    if close.ndim != 1:
        raise ValueError(f"close must be one-dimensional, got shape {close.shape}")
    h = int(horizon_bars)
    out = np.full(close.shape[0], np.nan)
    if h < close.shape[0]:
        with np.errstate(divide="ignore", invalid="ignore"):
            out[:-h] = close[h:] / close[:-h] - 1.0
    return out


def make_labels(close: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """int8 class codes (0 down, 1 range, 2 up); -1 where there is no label (the last
    ``horizon_bars`` rows, or a missing close).

    up iff the future return r > threshold + 1e-12, down iff r < -threshold - 1e-12, range
    otherwise. A move of exactly the threshold is range: 100 -> 102 with threshold 0.02 gives
    r = 0.020000000000000018 in binary floating point, which the tolerance treats as 0.02.
    """
    r = future_return(close, spec.horizon_bars)
    labels = np.full(r.shape[0], RANGE, dtype=np.int8)
    labels[r > spec.threshold + THRESHOLD_TOLERANCE] = UP
    labels[r < -spec.threshold - THRESHOLD_TOLERANCE] = DOWN
    labels[np.isnan(r)] = UNLABELLED
    return labels


def class_balance(labels: np.ndarray) -> dict[str, float]:
    """Fraction of the labelled rows (code >= 0) in each class, keyed by class name.

    Raises ValueError when nothing is labelled, since a balance of an empty set would be a
    made-up number, or when a code is not a class code or -1.
    """
    labels = np.asarray(labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integer class codes, got dtype {labels.dtype}")
    valid = (labels >= UNLABELLED) & (labels <= UP)
    if not valid.all():
        raise ValueError(f"labels must be class codes 0..{UP} or {UNLABELLED}, got {labels[~valid][0]!r}")
    counts = np.bincount(labels[labels >= 0].astype(np.intp), minlength=len(CLASSES))
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no labelled rows: class balance is undefined")
    return {name: float(counts[i]) / total for i, name in enumerate(CLASSES)}
