"""Labels: what happened over the next ``horizon_bars`` candles, as down / range / up.

Two definitions (``LabelSpec.kind``):

* ``fixed_horizon``: the return to the close ``h`` candles later, ``close[t+h] / close[t] - 1``, against
  ``+-threshold``. Only the end point counts.
* ``triple_barrier`` (Lopez de Prado): walk the closes ``t+1 .. t+h``; up if the return first exceeds
  ``+threshold``, down if it first falls below ``-threshold``, range if neither happens within ``h``. A move to +5 %
  that comes back by the horizon is up here and range under the fixed horizon.

Either reads its barrier as a fixed ``threshold`` (the default) or, with ``volatility_bars > 0``, as a multiple of
the market's recent volatility: at candle t the barrier is ``volatility_multiple * sigma_t * sqrt(h)``, where
``sigma_t`` is the population standard deviation of the last ``volatility_bars`` 1-bar returns up to and including
t (closes ``t - volatility_bars .. t``, never a later one; the same finite-window formula as the ``volatility_<n>``
feature). The barrier then moves with the market's regime, so a quiet month and a crash both produce all three
classes. Rows without enough history for ``sigma_t`` are unlabelled.

Labels count candles, so a label whose horizon spans missing candles measures a different span of time than it says;
given the candles' open times, such labels are dropped (``UNLABELLED``).

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
MAX_VOLATILITY_BARS = 10_000

# Binary floating point cannot represent most thresholds or price ratios exactly: 102 / 100 - 1 is
# 0.020000000000000018, not 0.02. A move of exactly the threshold in decimal terms must count as
# "at the threshold" (range), so a return only counts as beyond the threshold when it exceeds it by
# more than this. 1e-12 is far above the rounding error of a ratio (~1e-16) and far below any
# price move that matters.
THRESHOLD_TOLERANCE = 1e-12

FIXED_HORIZON = "fixed_horizon"
TRIPLE_BARRIER = "triple_barrier"
LABEL_KINDS = (FIXED_HORIZON, TRIPLE_BARRIER)

_BLOCK_ROWS = 1 << 16  # rows per block of the triple-barrier path matrix: memory stays bounded on long series


@dataclass(frozen=True)
class LabelSpec:
    """How candles are labelled: the look-ahead in candles, the move (a fraction, 0.02 = 2 %) and the kind."""

    horizon_bars: int = 24
    threshold: float = 0.02
    kind: str = FIXED_HORIZON
    # Volatility-scaled barrier: 0 (the default) means the fixed `threshold`; otherwise the barrier at t is
    # volatility_multiple * (std of the last volatility_bars 1-bar returns) * sqrt(horizon_bars), and `threshold`
    # is not used.
    volatility_bars: int = 0
    volatility_multiple: float = 0.0

    def __post_init__(self) -> None:
        h = self.horizon_bars
        if isinstance(h, bool) or not isinstance(h, numbers.Integral) or not 1 <= h <= MAX_HORIZON_BARS:
            raise ValueError(f"horizon_bars must be an integer between 1 and {MAX_HORIZON_BARS}, got {h!r}")
        object.__setattr__(self, "horizon_bars", int(h))
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not math.isfinite(t) or not 0 < t < 1:
            raise ValueError(f"threshold must be a finite fraction > 0 and < 1 (0.02 means 2 %), got {t!r}")
        object.__setattr__(self, "threshold", float(t))
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"kind must be one of {', '.join(LABEL_KINDS)}, got {self.kind!r}")
        v = self.volatility_bars
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not (v == 0 or 2 <= v <= MAX_VOLATILITY_BARS):
            raise ValueError(f"volatility_bars must be 0 (fixed threshold) or an integer between 2 and "
                             f"{MAX_VOLATILITY_BARS}, got {v!r}")
        object.__setattr__(self, "volatility_bars", int(v))
        m = self.volatility_multiple
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not math.isfinite(m) or not 0 <= m <= 100:
            raise ValueError(f"volatility_multiple must be a finite number between 0 and 100, got {m!r}")
        object.__setattr__(self, "volatility_multiple", float(m))
        if (self.volatility_bars > 0) != (self.volatility_multiple > 0):
            raise ValueError("volatility_bars and volatility_multiple must be set together (both 0 for a fixed "
                             f"threshold), got {self.volatility_bars} and {self.volatility_multiple}")

    def to_dict(self) -> dict:
        """JSON-safe form. A fixed-threshold label has no volatility keys, exactly as stored before they existed, so
        ``LabelSpec(**d)`` reads old and new records alike."""
        d: dict = {"horizon_bars": self.horizon_bars, "threshold": self.threshold, "kind": self.kind}
        if self.volatility_scaled:
            d.update(volatility_bars=self.volatility_bars, volatility_multiple=self.volatility_multiple)
        return d

    @property
    def volatility_scaled(self) -> bool:
        return self.volatility_bars > 0

    @property
    def history_bars(self) -> int:
        """Candles before t that labelling row t reads: volatility_bars for a volatility-scaled barrier, else 0."""
        return self.volatility_bars


def barriers(close: np.ndarray, spec: LabelSpec) -> np.ndarray:
    """The barrier (a return, > 0) of every row: ``threshold`` everywhere for a fixed threshold; for a
    volatility-scaled one ``volatility_multiple * sigma_t * sqrt(horizon_bars)`` from closes <= t, NaN where t has
    fewer than ``volatility_bars`` earlier closes."""
    close = np.asarray(close, dtype=np.float64)
    if not spec.volatility_scaled:
        return np.full(close.shape[0], spec.threshold)
    from shared.features import volatility

    if close.shape[0] <= spec.volatility_bars:
        return np.full(close.shape[0], np.nan)
    return volatility(close, spec.volatility_bars) * (spec.volatility_multiple * math.sqrt(spec.horizon_bars))


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


def make_labels(close: np.ndarray, spec: LabelSpec, open_time_ms: np.ndarray | None = None,
                timeframe_ms: int | None = None) -> np.ndarray:
    """int8 class codes (0 down, 1 range, 2 up); -1 where there is no label: the last ``horizon_bars`` rows, a
    missing close in the path, or (when the open times and the timeframe are given) a horizon that spans missing
    candles.

    up iff the return r > threshold + 1e-12, down iff r < -threshold - 1e-12, range otherwise (for the triple
    barrier: whichever barrier the path crosses first). A move of exactly the threshold is range: 100 -> 102 with
    threshold 0.02 gives r = 0.020000000000000018 in binary floating point, which the tolerance treats as 0.02.
    With a volatility-scaled barrier (``spec.volatility_bars > 0``) the threshold of row t is ``barriers(close,
    spec)[t]``, and rows without enough earlier closes for it are unlabelled.
    """
    barrier = spec.threshold if not spec.volatility_scaled else barriers(close, spec)
    if spec.kind == TRIPLE_BARRIER:
        labels = triple_barrier_labels(close, spec.horizon_bars, barrier)
    else:
        r = future_return(close, spec.horizon_bars)
        labels = np.full(r.shape[0], RANGE, dtype=np.int8)
        with np.errstate(invalid="ignore"):
            labels[r > barrier + THRESHOLD_TOLERANCE] = UP
            labels[r < -barrier - THRESHOLD_TOLERANCE] = DOWN
        labels[np.isnan(r) | np.isnan(barrier)] = UNLABELLED
    if open_time_ms is not None:
        if timeframe_ms is None:
            raise ValueError("timeframe_ms is needed with open_time_ms to find the candles a horizon spans")
        labels[spans_gap(open_time_ms, spec.horizon_bars, timeframe_ms)] = UNLABELLED
    return labels


def spans_gap(open_time_ms: np.ndarray, horizon_bars: int, timeframe_ms: int) -> np.ndarray:
    """True where the candles ``t .. t+h`` are not consecutive (missing candles in between); False for the last
    ``h`` rows, which have no label anyway."""
    t = np.asarray(open_time_ms, dtype=np.int64)
    out = np.zeros(t.shape[0], dtype=bool)
    h = int(horizon_bars)
    if h < t.shape[0]:
        out[:-h] = (t[h:] - t[:-h]) != h * int(timeframe_ms)
    return out


def triple_barrier_labels(close: np.ndarray, horizon_bars: int, threshold: float | np.ndarray) -> np.ndarray:
    """Triple-barrier class codes: the first of ``close[t+k] / close[t] - 1 > threshold`` (up) and
    ``< -threshold`` (down) for k = 1 .. h decides; range if neither happens; -1 for the last h rows and where the
    path has a missing close. `threshold` is one number or one per row (NaN: unlabelled)."""
    close = np.asarray(close, dtype=np.float64)
    if close.ndim != 1:
        raise ValueError(f"close must be one-dimensional, got shape {close.shape}")
    h = int(horizon_bars)
    n = close.shape[0]
    labels = np.full(n, UNLABELLED, dtype=np.int8)
    rows = max(0, n - h)
    per_row = np.ndim(threshold) > 0
    thr = np.asarray(threshold, dtype=np.float64)
    if per_row and thr.shape != (n,):
        raise ValueError(f"threshold must be one number or one per close ({n}), got shape {thr.shape}")
    for a in range(0, rows, _BLOCK_ROWS):
        b = min(rows, a + _BLOCK_ROWS)
        t_ab = thr[a:b, None] if per_row else thr
        upper, lower = t_ab + THRESHOLD_TOLERANCE, -t_ab - THRESHOLD_TOLERANCE
        base = close[a:b, None]
        # path[i, k-1] = close[a + i + k] for k = 1 .. h
        path = np.lib.stride_tricks.sliding_window_view(close[a + 1: b + h], h)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = path / base - 1.0
        up_hit, down_hit = r > upper, r < lower
        never = np.int64(h)
        first_up = np.where(up_hit.any(axis=1), up_hit.argmax(axis=1), never)
        first_down = np.where(down_hit.any(axis=1), down_hit.argmax(axis=1), never)
        block = np.full(b - a, RANGE, dtype=np.int8)
        block[first_up < first_down] = UP
        block[first_down < first_up] = DOWN
        missing = np.isnan(base[:, 0]) | np.isnan(path).any(axis=1)
        if per_row:
            missing |= np.isnan(thr[a:b])
        block[missing] = UNLABELLED
        labels[a:b] = block
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
