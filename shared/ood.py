"""Out-of-distribution score: how far a candle's features lie from the rows a model was trained on.

The score is the Mahalanobis distance of a feature row from the training rows' mean, in standardised feature space,
with a shrunk correlation matrix:

    z = W (x - mean),    score = sqrt(z_1^2 + ... + z_k^2),    ood = score > threshold

where ``W = L^-1 diag(1 / std)`` and ``L L^T = (1 - a) C + a I`` is the Cholesky factor of the training rows'
correlation matrix ``C`` shrunk toward the identity with Ledoit and Wolf's intensity ``a`` (at least
``MIN_SHRINKAGE``, so two almost collinear features keep the matrix well conditioned and every score finite). The
threshold is the training rows' own score that leaves ``1 - QUANTILE`` of them (1 %) above it; `rate_train` is the
share actually above (ties can make it smaller).

Why this distance: it costs k^2 multiply-adds per row (k = 18 features by default), a few microseconds, and needs only
k + k^2 stored numbers. A k-nearest-neighbour distance to the training rows (FreqAI's dissimilarity index) costs
n_train * k per candle and needs the training rows at serving time; an isolation forest would need a second ONNX
session per request.

Stream = batch, bit for bit: a row's score never depends on the other rows of the call. Matrix products through BLAS
(``X @ W``) are avoided, because BLAS picks kernels and summation orders by the shape of the whole batch, and so are
``np.sum``/``np.dot`` reductions (pairwise and unrolled by shape). Each coordinate ``z_j`` is summed strictly in
feature order, ``((W[j,0] d_0 + W[j,1] d_1) + W[j,2] d_2) + ...``, and so is ``z_1^2 + ... + z_k^2``: for a few rows
by ``np.add.accumulate`` over a fixed-length axis (an accumulate is sequential by definition), for many rows by the
same additions as whole-row vector adds (cheaper per row). Everything is element-wise and correctly rounded
(``- * + sqrt``, no fused multiply-add), so the two ways, and SIMD and scalar code paths, give the same bits. Rows go
through in blocks of ``_BLOCK_ROWS`` to bound memory; rows are independent, so neither the block size nor the way
chosen can change a value.

Features enter as float32, as the forest sees them (training stores float32 rows; ONNX Runtime casts the served
float64 features to float32), and are widened to float64 exactly; all arithmetic is float64.

Cost, k = 18: about a dozen numpy calls for one row. Measured on a shared 2-core machine where one trivial numpy call
took 3 us: 35 us for 1 row (the 200-tree forest's ONNX call for the same row: 50 to 75 us; its features: 190 us) and
0.7 ms for 1,024 rows. ``tests/unit/test_ood.py`` prints the figures of the machine it runs on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

METHOD = "mahalanobis"
VERSION = 1
QUANTILE = 0.99  # the training rows' flag rate is 1 - QUANTILE
MIN_SHRINKAGE = 1e-3  # floor on the shrinkage toward the identity (correlation scale): condition number <= k / 1e-3
_BLOCK_ROWS = 4096  # rows per block: memory stays bounded on long histories
# From this many rows on, sums use whole-row vector adds instead of an accumulate over (rows, k, k) products: the
# same additions in the same order, so the same bits (tested); fewer numpy calls below, a third of the cost above.
_VECTOR_ADD_MIN_ROWS = 32
_accumulate = np.add.accumulate


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)  # an owned copy
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class OodModel:
    """The fitted parameters: `mean` (k,), `whitening` (k, k) lower triangular, `threshold` and the share of training
    rows above it, plus how the fit went (`shrinkage`, `n_train`, `quantile`). Immutable; equal when every stored
    number is."""

    mean: np.ndarray
    whitening: np.ndarray
    threshold: float
    rate_train: float
    shrinkage: float
    n_train: int
    quantile: float = QUANTILE

    def __post_init__(self) -> None:
        mean, w = _readonly(self.mean), _readonly(self.whitening)
        k = mean.shape[0]
        if mean.ndim != 1 or w.shape != (k, k) or k == 0:
            raise ValueError(f"an OOD model needs a mean (k,) and a whitening matrix (k, k), got {mean.shape} and "
                             f"{w.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(w).all()):
            raise ValueError("an OOD model's mean and whitening matrix must be finite")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "whitening", w)
        for name in ("threshold", "rate_train", "shrinkage", "quantile"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "n_train", int(self.n_train))

    @property
    def n_features(self) -> int:
        return int(self.mean.shape[0])

    def scores(self, X: np.ndarray) -> np.ndarray:
        """`ood_scores(self, X)`."""
        return ood_scores(self, X)

    def flags(self, X: np.ndarray) -> np.ndarray:
        """`ood_flags(self, ood_scores(self, X))`."""
        return ood_flags(self, ood_scores(self, X))

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form: Python floats, which JSON round-trips exactly."""
        return {
            "method": METHOD,
            "version": VERSION,
            "mean": [float(v) for v in self.mean],
            "whitening": [[float(v) for v in row] for row in self.whitening],
            "threshold": float(self.threshold),
            "rate_train": float(self.rate_train),
            "shrinkage": float(self.shrinkage),
            "n_train": int(self.n_train),
            "quantile": float(self.quantile),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OodModel:
        if d.get("method") != METHOD or d.get("version") != VERSION:
            raise ValueError(f"unknown OOD model {d.get('method')!r} version {d.get('version')!r}; this version "
                             f"reads {METHOD!r} version {VERSION}")
        return cls(mean=np.asarray(d["mean"], dtype=np.float64),
                   whitening=np.asarray(d["whitening"], dtype=np.float64).reshape(len(d["mean"]), -1),
                   threshold=d["threshold"], rate_train=d["rate_train"], shrinkage=d["shrinkage"],
                   n_train=d["n_train"], quantile=d.get("quantile", QUANTILE))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, OodModel):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


def _as_rows(X: np.ndarray) -> np.ndarray:
    """Feature rows as the forest sees them: float32, widened exactly to float64, shape (n, k)."""
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"features must be a (n, k) matrix, got shape {X.shape}")
    return X.astype(np.float32).astype(np.float64)


def ledoit_wolf_shrinkage(Z: np.ndarray) -> float:
    """Ledoit and Wolf's (2004) optimal intensity for shrinking the covariance of the centred rows Z (n, k) toward
    ``mu I`` (``mu`` the mean variance), in [0, 1]; the estimator scikit-learn's ``ledoit_wolf_shrinkage`` computes."""
    n, k = Z.shape
    if n == 0:
        return 1.0
    S = (Z.T @ Z) / n
    mu = float(np.trace(S)) / k
    Z2 = Z * Z
    beta_ = float(np.sum(Z2.T @ Z2)) / n  # sum over i, j of the mean of z_i^2 z_j^2
    delta_ = float(np.sum(S * S))  # squared Frobenius norm of S
    beta = (beta_ - delta_) / (k * n)
    delta = (delta_ - 2.0 * mu * float(np.trace(S)) + k * mu * mu) / k
    beta = min(beta, delta)
    return 0.0 if beta <= 0.0 else beta / delta


def fit_ood(X_train: np.ndarray, quantile: float = QUANTILE) -> OodModel:
    """Fit the score on the training rows (n, k), all finite, and fix the threshold that flags 1 - `quantile` of
    them (see the module docstring). A feature that is constant over the training rows is left unscaled."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    X = _as_rows(X_train)
    n, k = X.shape
    if n < 2 or k == 0:
        raise ValueError(f"fitting the OOD score needs at least 2 rows and 1 feature, got shape {X.shape}")
    if not np.isfinite(X).all():
        raise ValueError("fitting the OOD score needs finite training rows")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    constant = ~(std > 0.0)
    std[constant] = 1.0
    Z = (X - mean) / std
    shrinkage = max(ledoit_wolf_shrinkage(Z), MIN_SHRINKAGE)
    corr = (Z.T @ Z) / n
    corr = 0.5 * (corr + corr.T)
    corr[constant, constant] = 1.0  # a constant feature: unit variance, uncorrelated, unscaled
    shrunk = (1.0 - shrinkage) * corr + shrinkage * np.eye(k)
    L = np.linalg.cholesky(shrunk)
    whitening = np.linalg.solve(L, np.eye(k)) / std  # L^-1 diag(1 / std), lower triangular
    whitening = np.tril(whitening)
    model = OodModel(mean=mean, whitening=whitening, threshold=math.inf, rate_train=0.0, shrinkage=shrinkage,
                     n_train=n, quantile=quantile)
    s = np.sort(ood_scores(model, X))
    flagged = math.floor((1.0 - quantile) * n + 1e-9)  # rows to leave above the threshold
    threshold = float(s[n - 1 - flagged])
    rate = float(np.count_nonzero(s > threshold)) / n
    return OodModel(mean=mean, whitening=whitening, threshold=threshold, rate_train=rate, shrinkage=shrinkage,
                    n_train=n, quantile=quantile)


def _scores_accumulate(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Few rows: every row's k x k products at once, each z_j summed over i by an accumulate (sequential)."""
    k = w.shape[0]
    z = _accumulate(d[:, None, :] * w, axis=2)[:, :, k - 1]  # z[r, j] = ((W[j,0] d[r,0] + W[j,1] d[r,1]) + ...)
    return np.sqrt(_accumulate(z * z, axis=1)[:, k - 1])


def _scores_vector_adds(d: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Many rows: the same products added in the same order, as whole-row vector adds over the rows."""
    k = w.shape[0]
    dt = np.ascontiguousarray(d.T)  # (k, m)
    cols = w.T[:, :, None]  # cols[i] = W[:, i] as a (k, 1) column
    z = cols[0] * dt[0]  # (k, m)
    tmp = np.empty_like(z)
    for i in range(1, k):
        np.multiply(cols[i], dt[i], out=tmp)
        np.add(z, tmp, out=z)
    np.multiply(z, z, out=z)
    s = z[0].copy()
    for j in range(1, k):
        np.add(s, z[j], out=s)
    return np.sqrt(s, out=s)


def ood_scores(model: OodModel, X: np.ndarray) -> np.ndarray:
    """The score of every row of X (n, k) as float64 (n,); NaN for a row with a non-finite feature, +inf for a
    finite row beyond float32's range. Row i's score is the same bits whatever the other rows of X are."""
    X = np.asarray(X)
    w = model.whitening
    k = w.shape[0]
    if X.ndim != 2 or X.shape[1] != k:
        raise ValueError(f"features must be a (n, {k}) matrix, got shape {X.shape}")
    n = X.shape[0]
    with np.errstate(over="ignore", invalid="ignore"):  # only rows that are not finite as float32 warn
        X32 = X.astype(np.float32)  # the subtraction widens it to float64 exactly
        if n < _VECTOR_ADD_MIN_ROWS:
            out = _scores_accumulate(X32 - model.mean, w)
        else:
            out = np.empty(n, dtype=np.float64)
            for lo in range(0, n, _BLOCK_ROWS):
                hi = min(n, lo + _BLOCK_ROWS)
                out[lo:hi] = _scores_vector_adds(X32[lo:hi] - model.mean, w)
    if not math.isfinite(out.sum()):  # a row that is not finite as float32 (finite scores are far below overflow)
        finite = np.isfinite(X).all(axis=1)
        out[~finite] = np.nan
        out[finite & ~np.isfinite(out)] = np.inf
    return out


def ood_flags(model: OodModel, scores: np.ndarray) -> np.ndarray:
    """``scores > threshold`` (bool); a NaN score is not flagged (NaN compares false)."""
    return np.asarray(scores, dtype=np.float64) > model.threshold
