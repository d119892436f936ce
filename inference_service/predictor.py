"""Candles in, probabilities out: features from the model's own spec, and the served probabilities (candles are
validated by `shared.candles.validate`, the one definition of a valid candle).

Predict and StreamPredict both go through `predict_window`, so a stream fed one candle at a time and one Predict
over the whole series compute every number the same way. A large batch is split into row ranges that are computed
on several threads; every row's features and probabilities are still computed by one thread from its own warm-up
window (ONNX Runtime runs single-threaded per call), so the numbers are bit-identical to a serial run.
"""

from __future__ import annotations

import itertools
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from inference_service.domain import CandleBatch, CandleSource, Predictions, candle_field, candles_field, is_columnar
from inference_service.model_store import LoadedModel
from shared.candles import check_batch_size
from shared.errors import FailedPrecondition
from shared.features import feature_matrix
from shared.ood import ood_flags


def read_candles(model: LoadedModel, candles: CandleSource, max_batch: int) -> CandleBatch:
    """The batch with every column the client sent, so Predict checks funding rate and open interest exactly as a
    stream does, whichever model answers.

    The size is checked before anything is read: an empty or oversized request is refused (INVALID_ARGUMENT).
    """
    check_batch_size(len(candles), max_batch, candles_field(is_columnar(candles)))
    return candles.read(True, True)


def require_optional_columns(model: LoadedModel, c: CandleBatch, columnar: bool = False) -> None:
    """A model trained with funding rate or open interest needs them on every candle (FAILED_PRECONDITION)."""
    spec = model.record.feature_spec
    for name, used in (("funding_rate", spec.use_funding_rate), ("open_interest", spec.use_open_interest)):
        if used:
            missing = np.flatnonzero(np.isnan(getattr(c, name)))
            if len(missing):
                field = candle_field(columnar, int(missing[0]), name)
                raise FailedPrecondition(
                    f"{field}: model {model.model_id} was trained with {name} features, "
                    f"so every candle must carry {name}", field=field)


# Rows predicted on one thread before a batch is split across threads, and the smallest share of a thread.
PARALLEL_MIN_ROWS = 384
ROWS_PER_TASK_MIN = 192

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _thread_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="predict")
        return _pool


def _proba_rows(model: LoadedModel, window: CandleBatch, a: int, b: int,
                whole: bool) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Served probabilities of rows a..b-1 of window, all with a full warm-up window (FailedPrecondition when a
    row's features are not finite), their out-of-distribution scores from the same features (None for a model
    without the score), and the features. `whole` passes the whole window instead of only the rows the features
    read."""
    spec = model.record.feature_spec
    lo = 0 if whole else max(0, a - spec.warmup_bars + 1)
    part = window if lo == 0 and b == len(window) else window.slice(lo, b)
    X = feature_matrix(part.columns(), spec, a - lo)
    if not np.isfinite(X).all():
        bad = a + int(np.flatnonzero(~np.isfinite(X).all(axis=1))[0])
        raise FailedPrecondition(
            f"candles: features of the candle at open_time_ms {int(window.open_time_ms[bad])} are not finite",
            field="candles")
    ood = model.record.ood
    return model.predict_proba(X), (ood.scores(X) if ood is not None else None), X


def predict_window(model: LoadedModel, window: CandleBatch, first_row: int) -> Predictions:
    """Predictions for rows first_row.. of window; the rows before are history only."""
    spec = model.record.feature_spec
    n = len(window)
    start = max(first_row, spec.warmup_bars - 1)  # the first row with a full warm-up window
    ready = np.zeros(n - first_row, dtype=bool)
    ready[start - first_row:] = True
    rows = n - start
    ood = model.record.ood
    score: np.ndarray | None = None
    features: np.ndarray | None = None
    if rows <= 0:
        proba = np.full((n - first_row, 3), np.nan)
        if ood is not None:
            score = np.full(n - first_row, np.nan)
    else:
        tasks = min(_workers(), rows // ROWS_PER_TASK_MIN) if rows >= PARALLEL_MIN_ROWS else 1
        if tasks <= 1:
            proba, score, features = _proba_rows(model, window, start, n, whole=True)
        else:
            bounds = np.linspace(start, n, tasks + 1).astype(int)
            pool = _thread_pool()
            futures = [pool.submit(_proba_rows, model, window, int(a), int(b), False)
                       for a, b in itertools.pairwise(bounds)]
            parts = [f.result() for f in futures]  # the first failing range (in row order) raises
            proba = np.concatenate([p for p, _, _ in parts])
            features = np.concatenate([x for _, _, x in parts])
            if ood is not None:
                score = np.concatenate([s for _, s, _ in parts if s is not None])
        if start > first_row:
            proba = np.concatenate([np.full((start - first_row, 3), np.nan), proba])
            if score is not None:
                score = np.concatenate([np.full(start - first_row, np.nan), score])
    t = window.open_time_ms[first_row:].copy()  # owned: a stream's window is a view of arrays it reuses
    rec = model.record
    flags = ood_flags(ood, score) if ood is not None and score is not None else None
    return Predictions(t, proba, ready, (t >= rec.train_start_ms) & (t <= rec.train_end_ms), score, flags, features)
