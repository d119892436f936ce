"""Purged, embargoed k-fold cross-validation over a training window, and the reliability of probabilities.

Rows are labelled candles in time order; the label of row ``t`` looks ``h = horizon_bars`` rows ahead. Two rows whose
label spans overlap share information, so a row used for fitting must stay more than ``h`` rows away from every row it
is judged on:

* each fold's test part is one contiguous block of rows (fold ``j`` of ``k``: rows ``[j n / k, (j + 1) n / k)``);
* its fitting rows leave out a purge of ``h`` rows before the test part and ``h`` rows plus an embargo after it (the
  embargo keeps out rows whose features still describe the test period, so it is at least the feature warm-up,
  ``warmup_bars`` rows, and at least 1 % of the window);
* the calibration slice of a fold (where the shrink weight is fitted) is the last part of the remaining rows, with a
  purge of ``h`` rows between it and the fitting rows on each side; it never touches the test part.

Distances are counted in rows. Rows only drop out of a window (warm-up, labels across gaps), so ``h`` rows always
span at least ``h`` candles: the purge is never shorter in time than the label horizon.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_CV_FOLDS = 5
EMBARGO_FRACTION = 0.01  # of the window's rows, after each test part (Lopez de Prado's suggestion)
CALIBRATION_FRACTION = 0.2  # of the rows a fold may learn from
MIN_FOLD_TEST_ROWS = 100
MIN_FOLD_FIT_ROWS = 500
MIN_FOLD_CALIBRATION_ROWS = 100
RELIABILITY_BINS = 10


@dataclass(frozen=True)
class Fold:
    """Row indices of one cross-validation fold (each sorted, pairwise disjoint)."""

    fit: np.ndarray
    calibration: np.ndarray
    test: np.ndarray


def embargo_rows(n: int, warmup_bars: int = 0) -> int:
    """Rows left out after each test part: 1 % of the window's rows, and never fewer than the feature warm-up (a
    row's features read the `warmup_bars` candles up to it, so a row closer than that to the test part is partly
    computed from the test part's candles)."""
    return max(int(np.ceil(n * EMBARGO_FRACTION)), int(warmup_bars))


def near(mask: np.ndarray, before: int, after: int) -> np.ndarray:
    """Rows within `before` rows ahead of a marked row or `after` rows behind one (marked rows included).

    Row r is near when some marked row t has ``t - before <= r <= t + after``.
    """
    mask = np.asarray(mask, dtype=bool)
    n = mask.shape[0]
    counts = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    r = np.arange(n)
    lo = np.clip(r - after, 0, n)
    hi = np.clip(r + before + 1, 0, n)
    return (counts[hi] - counts[lo]) > 0


def purged_kfold(n: int, horizon: int, folds: int = DEFAULT_CV_FOLDS, embargo: int | None = None,
                 warmup_bars: int = 0) -> list[Fold]:
    """The folds of purged, embargoed k-fold CV over `n` rows (see the module docstring). The embargo is
    `embargo_rows(n, warmup_bars)` unless `embargo` gives it.

    Raises ValueError when a fold would get fewer than MIN_FOLD_TEST_ROWS test rows, MIN_FOLD_CALIBRATION_ROWS
    calibration rows or MIN_FOLD_FIT_ROWS fitting rows.
    """
    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    emb = embargo_rows(n, warmup_bars) if embargo is None else int(embargo)
    if emb < 0:
        raise ValueError(f"embargo must be >= 0, got {embargo}")
    bounds = [round(n * j / folds) for j in range(folds + 1)]
    out = []
    for j in range(folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[j]: bounds[j + 1]] = True
        pool = ~near(test, before=horizon, after=horizon + emb)
        pool_idx = np.flatnonzero(pool)
        cal_len = round(len(pool_idx) * CALIBRATION_FRACTION)
        calibration = np.zeros(n, dtype=bool)
        calibration[pool_idx[len(pool_idx) - cal_len:]] = True
        fit = pool & ~near(calibration, before=horizon, after=horizon)
        fold = Fold(fit=np.flatnonzero(fit), calibration=np.flatnonzero(calibration), test=np.flatnonzero(test))
        if (len(fold.test) < MIN_FOLD_TEST_ROWS or len(fold.calibration) < MIN_FOLD_CALIBRATION_ROWS
                or len(fold.fit) < MIN_FOLD_FIT_ROWS):
            raise ValueError(
                f"{n} rows are too few for {folds} purged folds with a purge of {horizon} rows and an embargo of "
                f"{emb} rows (fold {j}: {len(fold.fit)} fitting, {len(fold.calibration)} calibration, "
                f"{len(fold.test)} test rows)"
            )
        out.append(fold)
    return out


def folds_that_fit(n: int, horizon: int, wanted: int = DEFAULT_CV_FOLDS, warmup_bars: int = 0) -> list[Fold]:
    """`purged_kfold` with `wanted` folds, or the most folds (at least 2) the rows allow; [] if not even 2."""
    for k in range(wanted, 1, -1):
        try:
            return purged_kfold(n, horizon, k, warmup_bars=warmup_bars)
        except ValueError:
            continue
    return []


def min_gap(a: np.ndarray, b: np.ndarray) -> int:
    """Smallest |i - j| over rows i of `a` and j of `b` (both sorted); a large number when either is empty."""
    a, b = np.asarray(a), np.asarray(b)
    if a.size == 0 or b.size == 0:
        return np.iinfo(np.int64).max
    pos = np.searchsorted(b, a)
    left = np.abs(a - b[np.clip(pos - 1, 0, b.size - 1)])
    right = np.abs(b[np.clip(pos, 0, b.size - 1)] - a)
    return int(min(left.min(), right.min()))


def reliability(p: np.ndarray, y: np.ndarray, classes: tuple[str, ...], prefix: str = "oos_reliability_",
                bins: int = RELIABILITY_BINS) -> dict[str, float]:
    """Reliability diagram as flat metrics: for class c and bin b (``[b / bins, (b + 1) / bins)``, the last bin
    closed), ``{prefix}{c}_{b}_count`` always, and ``_mean`` (mean predicted probability) and ``_freq`` (observed
    frequency of the class) for bins that hold predictions."""
    out: dict[str, float] = {}
    p = np.asarray(p, dtype=np.float64)
    y = np.asarray(y)
    for k, name in enumerate(classes):
        pk = p[:, k]
        b = np.clip((pk * bins).astype(np.int64), 0, bins - 1)
        hit = (y == k).astype(np.float64)
        for i in range(bins):
            sel = b == i
            count = int(sel.sum())
            out[f"{prefix}{name}_{i}_count"] = float(count)
            if count:
                out[f"{prefix}{name}_{i}_mean"] = float(pk[sel].mean())
                out[f"{prefix}{name}_{i}_freq"] = float(hit[sel].mean())
    return out


def average_uniqueness(open_time_ms: np.ndarray, horizon: int, timeframe_ms: int) -> np.ndarray:
    """Lopez de Prado's average uniqueness of each label: the mean over the candles its horizon spans of
    1 / (number of labels spanning that candle). Labels are counted on the candle grid (a label of row t spans the
    candles t+1 .. t+h), so rows on either side of a gap do not share candles."""
    t = np.asarray(open_time_ms, dtype=np.int64)
    if t.size == 0:
        return np.zeros(0)
    slot = (t - t[0]) // int(timeframe_ms)
    size = int(slot[-1]) + horizon + 2
    conc = np.zeros(size + 1, dtype=np.int64)
    np.add.at(conc, slot + 1, 1)
    np.add.at(conc, slot + horizon + 1, -1)
    c = np.cumsum(conc)[:size]
    inv = np.zeros(size)
    nz = c > 0
    inv[nz] = 1.0 / c[nz]
    csum = np.concatenate([[0.0], np.cumsum(inv)])
    return (csum[slot + horizon + 1] - csum[slot + 1]) / horizon
