"""Live outcome monitoring: realising the labels of served predictions, scoring them, and summarising the scores.

A ready, out-of-sample prediction for candle t is scored once the candles received for its market realise its label,
exactly as training labels candles (`shared.labels.make_labels` over the stored candle window, so a label whose
horizon spans missing candles is dropped, as in training):

* fixed horizon: the closes of t and t+h;
* triple barrier: the path of closes t+1 .. t+h;
* a volatility-scaled barrier (``LabelSpec.volatility_bars > 0``) also reads the ``volatility_bars`` closes before t,
  as in training; without them in the candle window the label is not realised (a research-only label: the journal
  keeps the candles from each prediction on).

A close counts in its final version: candle t+h is final once a later candle of the market has been received (until
then it may still be forming), so a prediction is scored when a candle after t+h has arrived.

Each score keeps the probabilities served, the label, and per row the log loss, the log loss of the model's training
class prior and the multiclass Brier score, computed as training computes its out-of-sample metrics
(`shared.calibration`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from inference_service.model_store import ModelStore
from inference_service.service import validate_key
from shared.calibration import EPS
from shared.drift import expected_log_loss
from shared.errors import InvalidArgument, NotFound
from shared.labels import CLASSES, UNLABELLED, LabelSpec, make_labels
from shared.store import live, registry

RELIABILITY_BINS = 10


def realised_labels(pred_times: np.ndarray, candle_times: np.ndarray, candle_closes: np.ndarray, spec: LabelSpec,
                    timeframe_ms: int) -> np.ndarray:
    """The realised label code of each prediction (open times `pred_times`), or -1 where it is not realised: its
    candle or a candle of its horizon was not received, the horizon spans missing candles, or no candle after
    t+h has arrived yet (the close of t+h may still change).

    `candle_times` (sorted, unique) and `candle_closes` are the candles received for the market.
    """
    out = np.full(len(pred_times), UNLABELLED, dtype=np.int8)
    n = len(candle_times)
    if n == 0 or len(pred_times) == 0:
        return out
    labels = make_labels(candle_closes, spec, candle_times, timeframe_ms)
    idx = np.searchsorted(candle_times, pred_times)
    ok = idx + spec.horizon_bars + 1 < n  # t, t+h and a later candle are within the received rows
    ok[ok] = candle_times[idx[ok]] == pred_times[ok]
    out[ok] = labels[idx[ok]]
    return out


@dataclass(frozen=True)
class RowScores:
    loss: np.ndarray
    prior_loss: np.ndarray
    brier: np.ndarray


def score_rows(proba: np.ndarray, labels: np.ndarray, prior: np.ndarray | tuple[float, ...]) -> RowScores:
    """Per-row log loss (natural log, clipped at EPS as in training), the prior's log loss, and the multiclass Brier
    score (squared distance to the one-hot truth, 0 best, 2 worst)."""
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(labels, dtype=np.intp)
    rows = np.arange(len(y))
    prior_arr = np.asarray(prior, dtype=np.float64)
    loss = -np.log(np.clip(proba[rows, y], EPS, 1.0))
    prior_loss = -np.log(np.clip(prior_arr[y], EPS, 1.0))
    onehot = np.zeros_like(proba)
    onehot[rows, y] = 1.0
    brier = np.sum((proba - onehot) ** 2, axis=1)
    return RowScores(loss, prior_loss, brier)


@dataclass(frozen=True)
class ReliabilityBin:
    class_name: str
    lower: float
    upper: float
    count: int
    mean_predicted: float
    observed_frequency: float


@dataclass(frozen=True)
class LivePerformance:
    model_id: str
    scored: int
    log_loss: float  # NaN when nothing is scored yet, like the two below
    prior_log_loss: float
    brier: float
    reliability: list[ReliabilityBin]
    first_open_time_ms: int  # 0 when nothing is scored yet
    last_open_time_ms: int
    expected_log_loss: float = math.nan  # mean entropy of the scored probabilities

    @property
    def log_loss_ratio(self) -> float:
        """Live log loss over the prior's: below 1 the model adds information, above 1 it is worse than the prior."""
        if self.scored == 0 or not self.prior_log_loss > 0:
            return math.nan
        return self.log_loss / self.prior_log_loss


def reliability(proba: np.ndarray, labels: np.ndarray, bins: int = RELIABILITY_BINS) -> list[ReliabilityBin]:
    """Reliability diagram data per class: `bins` equal-width bins of the predicted probability over [0, 1] (the last
    bin includes 1), each with its count, mean predicted probability and observed frequency of the class. Empty
    bins are left out."""
    out: list[ReliabilityBin] = []
    if len(labels) == 0:
        return out
    y = np.asarray(labels, dtype=np.intp)
    for k, name in enumerate(CLASSES):
        p = proba[:, k]
        which = np.minimum((p * bins).astype(np.intp), bins - 1)
        counts = np.bincount(which, minlength=bins)
        sum_p = np.bincount(which, weights=p, minlength=bins)
        hits = np.bincount(which, weights=(y == k).astype(np.float64), minlength=bins)
        for b in np.flatnonzero(counts):
            n = int(counts[b])
            out.append(ReliabilityBin(name, b / bins, (b + 1) / bins, n, float(sum_p[b] / n), float(hits[b] / n)))
    return out


def summarise(model_id: str, scores: live.Scores) -> LivePerformance:
    """A model's live performance from its scores."""
    n = len(scores.label)
    if n == 0:
        return LivePerformance(model_id, 0, math.nan, math.nan, math.nan, [], 0, 0)
    return LivePerformance(
        model_id=model_id,
        scored=n,
        log_loss=float(np.mean(scores.loss)),
        prior_log_loss=float(np.mean(scores.prior_loss)),
        brier=float(np.mean(scores.brier)),
        reliability=reliability(scores.proba, scores.label),
        first_open_time_ms=int(scores.open_time_ms[0]),
        last_open_time_ms=int(scores.open_time_ms[-1]),
        expected_log_loss=expected_log_loss(scores.proba),
    )


def live_performance(store: ModelStore, symbol: str, timeframe: str, model_id: str = "") -> LivePerformance:
    """GetLivePerformance: the live scores of `model_id`, or of the model serving the market now when it is empty.

    NOT_FOUND for an unknown model (or a market without a serving model); INVALID_ARGUMENT for a model of another
    market.
    """
    validate_key(symbol, timeframe)
    if model_id:
        row = registry.model_row(store.engine, model_id)
        if row is None:
            raise NotFound(f"model_id: no model {model_id!r} in the registry", field="model_id")
        if (row.symbol, row.timeframe) != (symbol, timeframe):
            raise InvalidArgument(
                f"model_id: model {model_id} is for {row.symbol} {row.timeframe}, not {symbol} {timeframe}",
                field="model_id")
    else:
        model_id = store.current(symbol, timeframe).model_id
    return summarise(model_id, live.read_scores(store.engine, model_id))
