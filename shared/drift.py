"""Feature drift and expected loss: how the candles a model serves compare with the rows it was trained on.

Training stores, per feature, the decile edges of its training rows and the share of training rows in each of the
10 bins they make (`DriftModel`). Ties can make those shares uneven (a feature that is 0 on 30 % of the rows has
equal edges and an empty bin), so drift is measured against the stored shares, not against 10 % each.

Live, every served candle's features are binned with `bin_index` (one int8 per feature); the counts of the last
window of candles against the training shares give each feature's population stability index (`psi`). Binning is
per value and counts are integers, so the index of a window does not depend on how the candles were batched.

`expected_log_loss` is the mean entropy of the served probabilities: the log loss the model expects of itself. With
calibrated probabilities the realised log loss of the same candles converges to it, so a realised loss well above it
says the probabilities are over-confident on the candles served.

Values are binned as given (training passes its float32 rows, serving its float64 features): a value and its float32
rounding land in different bins only when an edge lies between the two, which moves no index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.calibration import EPS

VERSION = 1
N_BINS = 10
QUANTILES = tuple(q / N_BINS for q in range(1, N_BINS))  # 0.1 .. 0.9: 9 edges, 10 bins
# The share an empty bin counts as in the index (evidently's PSI: an empty bin's share becomes 0.0001 when the
# smallest non-empty share is above 0.0001, which any window of fewer than 10,000 candles satisfies). Applied to both
# sides as a floor, so a bin empty in training and live adds 0.
PSI_EPS = 1e-4
_BLOCK_ROWS = 4096  # rows binned at once: bounds the (rows, k, 9) comparisons


def _as_rows(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"features must be a (n, k) matrix, got shape {X.shape}")
    return X


def decile_edges(X_train: np.ndarray) -> np.ndarray:
    """The 10 %, 20 %, ..., 90 % quantiles (linear interpolation) of every feature over the training rows: (k, 9)
    float64, each row non-decreasing. Rows with a non-finite value in a feature are left out of that feature."""
    X = _as_rows(X_train)  # quantiles in float64 even of float32 rows
    if X.shape[0] == 0:
        raise ValueError("decile edges need at least one training row")
    X = np.where(np.isfinite(X), X, np.nan)
    if np.isnan(X).all(axis=0).any():
        raise ValueError("decile edges need at least one finite value of every feature")
    return np.ascontiguousarray(np.nanquantile(X, QUANTILES, axis=0).T)


def bin_index(edges: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The bin (0 .. 9) of every value of X (n, k): the number of its feature's edges at or below it (what
    ``np.searchsorted(edges[j], x, side="right")`` gives: a value equal to an edge goes to the bin above it, in
    training and live alike); -1 for a value that is not finite. (n, k) int8, one comparison per edge: a few
    microseconds for one row."""
    edges = np.asarray(edges, dtype=np.float64)
    X = _as_rows(X)
    k = edges.shape[0]
    if X.shape[1] != k:
        raise ValueError(f"features must be a (n, {k}) matrix, got shape {X.shape}")
    out = np.empty(X.shape, dtype=np.int8)
    for lo in range(0, X.shape[0], _BLOCK_ROWS):
        x = X[lo:lo + _BLOCK_ROWS]
        np.sum(x[:, :, None] >= edges, axis=2, dtype=np.int8, out=out[lo:lo + _BLOCK_ROWS])
    out[~np.isfinite(X)] = -1
    return out


def bin_counts(bins: np.ndarray, n_bins: int = N_BINS) -> np.ndarray:
    """Counts (k, n_bins) int64 of `bin_index` rows (n, k); -1 (not finite) is not counted."""
    bins = np.asarray(bins)
    k = bins.shape[1]
    out = np.zeros((k, n_bins), dtype=np.int64)
    for j in range(k):
        b = bins[:, j]
        out[j] = np.bincount(b[b >= 0], minlength=n_bins)[:n_bins]
    return out


def bin_fractions(counts: np.ndarray) -> np.ndarray:
    """Each feature's counts as shares of its total (k, n_bins); NaN for a feature with no counted value."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / total


def psi(expected: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Population stability index of every feature (k,): ``sum over bins of (a - e) * ln(a / e)``, with `e` the
    training shares (k, 10) (`DriftModel.train_fractions`) and `a` the shares of the live `counts` (k, 10); both
    floored at PSI_EPS (evidently's convention for empty bins). NaN for a feature with no live value.

    Usual reading: below 0.1 no shift, 0.1 to 0.2 a moderate one, above 0.2 a large one. A window of n candles drawn
    from the training distribution itself has an expected index of about (bins - 1) / n (0.009 for 1,000 candles).
    """
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_EPS)
    a = np.maximum(bin_fractions(counts), PSI_EPS)  # NaN stays NaN
    return np.sum((a - e) * np.log(a / e), axis=1)


def entropy(proba: np.ndarray) -> np.ndarray:
    """The entropy (natural log) of every row of probabilities (n, c): ``-sum_c p_c ln(max(p_c, EPS))``, clipped as
    `shared.calibration.log_loss` clips, so it is the log loss the row expects; summed in class order, so a row's
    value does not depend on the other rows."""
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be a (n, c) matrix, got shape {p.shape}")
    terms = p * np.log(np.clip(p, EPS, 1.0))
    return -np.add.accumulate(terms, axis=1)[:, -1] if p.shape[1] else np.zeros(len(p))


def expected_log_loss(proba: np.ndarray) -> float:
    """The mean entropy of the rows of served probabilities (n, c) whose probabilities are all finite (rows not
    ready, NaN, are left out); NaN when there is none."""
    h = entropy(proba)
    h = h[np.isfinite(h)]
    return float(np.mean(h)) if h.size else float("nan")


@dataclass(frozen=True, eq=False)
class DriftModel:
    """Per feature, the decile `edges` (k, 9) of the training rows and the share of training rows in each of the 10
    bins (`train_fractions`, (k, 10), each row summing to 1), and `n_train`. Immutable; equal when every stored
    number is."""

    edges: np.ndarray
    train_fractions: np.ndarray
    n_train: int

    def __post_init__(self) -> None:
        edges = np.array(self.edges, dtype=np.float64)
        fr = np.array(self.train_fractions, dtype=np.float64)
        k = edges.shape[0] if edges.ndim == 2 else -1
        if edges.shape != (k, N_BINS - 1) or fr.shape != (k, N_BINS) or k == 0:
            raise ValueError(f"a drift model needs edges (k, {N_BINS - 1}) and train fractions (k, {N_BINS}), got "
                             f"{edges.shape} and {fr.shape}")
        edges.setflags(write=False)
        fr.setflags(write=False)
        object.__setattr__(self, "edges", edges)
        object.__setattr__(self, "train_fractions", fr)
        object.__setattr__(self, "n_train", int(self.n_train))

    @property
    def n_features(self) -> int:
        return int(self.edges.shape[0])

    def bins(self, X: np.ndarray) -> np.ndarray:
        """`bin_index(self.edges, X)`."""
        return bin_index(self.edges, X)

    def psi(self, counts: np.ndarray) -> np.ndarray:
        """`psi(self.train_fractions, counts)`."""
        return psi(self.train_fractions, counts)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: Python floats, which JSON round-trips exactly."""
        return {
            "version": VERSION,
            "edges": [[float(v) for v in row] for row in self.edges],
            "train_fractions": [[float(v) for v in row] for row in self.train_fractions],
            "n_train": int(self.n_train),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriftModel:
        if d.get("version") != VERSION:
            raise ValueError(f"unknown drift model version {d.get('version')!r}; this version reads {VERSION}")
        return cls(edges=np.asarray(d["edges"], dtype=np.float64),
                   train_fractions=np.asarray(d["train_fractions"], dtype=np.float64), n_train=d["n_train"])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DriftModel):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def fit_drift(X_train: np.ndarray) -> DriftModel:
    """Decile edges of the training rows (n, k) and the share of them in each bin."""
    edges = decile_edges(X_train)
    return DriftModel(edges=edges, train_fractions=bin_fractions(bin_counts(bin_index(edges, X_train))),
                      n_train=int(np.asarray(X_train).shape[0]))
