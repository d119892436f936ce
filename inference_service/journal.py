"""The prediction journal: every ready, out-of-sample prediction inference serves, and the candles it receives, kept
until the prediction can be scored (`inference_service.live_scores`), then its score.

The hot path (`record`) only appends the answer to a queue. A background thread takes the queue every
`flush_seconds` (sooner when it grows long), once answers have stopped arriving for a moment (`QUIET_SECONDS`, at
most `MAX_DEFER_SECONDS` later): a candle-close burst over a fleet of markets is answered first and journaled right
after, instead of sharing the interpreter with the journal's work while it is answered. Then, per market:

1. keeps the last version of each candle (close) and of each prediction (probabilities) per model, so a forming
   candle sent again counts in its final version, and drops predictions already scored (serving the same candles
   again adds nothing);
2. scores the pending predictions whose label the candles received now realise, and drops those that can no longer
   be realised (see "Bounds");
3. writes candles, pending predictions and new scores in one transaction (`shared.store.live`).

What the journal holds per market is kept in memory as well (pending predictions, the candles they need, the times
already scored per model), loaded from the database the first time a market or model is seen, so the writes are
only the rows that changed and scoring needs no reads. Scores and pending predictions survive a restart.

Bounds:
* a pending prediction is dropped when the market's candles have moved `horizon_bars + PENDING_MARGIN_BARS` candles
  past it without realising its label (a gap in the candles received), or when it was served more than the retention
  (MLSIGNAL_LIVE_RETENTION_DAYS) ago;
* candles are kept only from the oldest pending prediction of their market on;
* scores are kept for the retention, counted from when they were scored.
* the queue holds at most `max_queued` answers; beyond that (the database far slower than the traffic) answers are
  not journaled, and a warning says how many.

While the database is unreachable a batch cannot be written; it is dropped (and counted) and the journal reloads its
state from the database when it works again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from inference_service.domain import CandleBatch, Predictions
from inference_service.live_scores import realised_labels, score_rows
from inference_service.model_store import LoadedModel
from shared.errors import MlsignalError, one_line
from shared.labels import UNLABELLED
from shared.store import live, registry
from shared.store.registry import ModelRecord
from shared.timeframes import timeframe_ms

log = logging.getLogger(__name__)

#: Candles past a pending prediction's horizon after which it is dropped as unrealisable (missing candles).
PENDING_MARGIN_BARS = 24
#: How often expired rows are deleted (retention) and unneeded candles pruned, in seconds.
MAINTENANCE_SECONDS = 60.0
#: A flush waits until no answer has been recorded for this long (seconds) ...
QUIET_SECONDS = 0.05
#: ... but no longer than this past its due time.
MAX_DEFER_SECONDS = 5.0
#: How long a score summary read for the metrics endpoint is reused, in seconds.
SUMMARY_TTL_SECONDS = 30.0
_WARN_SECONDS = 60.0


def last_per_time(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique times, sorted, each with the value of its last occurrence."""
    if len(times) == 0:
        return times, values
    reverse = times[::-1]
    unique, first_in_reverse = np.unique(reverse, return_index=True)
    return unique, values[::-1][first_in_reverse]


def _lookup(cache_times: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(index into cache_times, whether the time is there) for each of `times`."""
    idx = np.searchsorted(cache_times, times)
    found = idx < len(cache_times)
    found[found] = cache_times[idx[found]] == times[found]
    return np.minimum(idx, max(len(cache_times) - 1, 0)), found


def _merge(a_t: np.ndarray, a_v: np.ndarray, b_t: np.ndarray, b_v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two sorted series merged; b wins where both have a time."""
    if len(a_t) == 0:
        return b_t, b_v
    if len(b_t) == 0:
        return a_t, a_v
    return last_per_time(np.concatenate([a_t, b_t]), np.concatenate([a_v, b_v]))


@dataclass
class _Market:
    timeframe_ms: int
    pending: dict[str, tuple[np.ndarray, np.ndarray]]  # model id -> (times sorted, probabilities (n, 3))
    candle_times: np.ndarray
    candle_closes: np.ndarray
    last_ms: int | None  # the latest candle received
    prune_from: int | None = None  # candles before this are no longer needed (None: none are), pruned in the database
    needs_prune: bool = False

    def oldest_pending(self) -> int | None:
        firsts = [int(t[0]) for t, _ in self.pending.values() if len(t)]
        return min(firsts) if firsts else None


@dataclass
class _Summary:
    value: live.ScoreSummary
    read_at: float


class Journal:
    """Journals served predictions and received candles, and scores predictions as their labels are realised."""

    def __init__(self, engine: sa.Engine, *, flush_seconds: float = 1.0, retention_days: float = 90.0,
                 max_queued: int = 50_000, wake_entries: int = 1024) -> None:
        self.engine = engine
        self.flush_seconds = flush_seconds
        self.retention_ms = int(retention_days * 86_400_000)
        self.max_queued = max_queued
        self.wake_entries = wake_entries
        self._queue: deque[tuple[ModelRecord, Predictions, np.ndarray, np.ndarray]] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one batch at a time
        self._markets: dict[tuple[str, str], _Market] = {}
        self._scored: dict[str, np.ndarray] = {}  # model id -> open times scored, sorted
        self._records: dict[str, ModelRecord | None] = {}  # model id -> its record (None: not in the registry)
        self._summaries: dict[str, _Summary] = {}
        self._summary_lock = threading.Lock()
        self._maintained_at = time.monotonic()
        self._warned_at = 0.0
        self._recorded_at = 0.0  # monotonic time of the last answer recorded
        self.dropped = 0  # answers not journaled: queue full, or their batch could not be written

    # -- the hot path --------------------------------------------------------------------------------------------
    def record(self, model: LoadedModel, predictions: Predictions, candles: CandleBatch) -> None:
        """Journal one answer: the predictions served and the candles the request carried. Only an append."""
        queue = self._queue
        if len(queue) >= self.max_queued:
            self.dropped += 1
            return
        queue.append((model.record, predictions, candles.open_time_ms, candles.close))
        self._recorded_at = time.monotonic()
        if len(queue) == self.wake_entries:
            self._wake.set()

    # -- the writer ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="prediction-journal", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued and stop the writer."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.flush_seconds)
            self._wake.clear()
            self._wait_for_quiet()
            try:
                self.flush()
                if time.monotonic() - self._maintained_at >= MAINTENANCE_SECONDS:
                    self.maintain()
            except Exception:  # never let the writer die
                log.exception("the prediction journal failed to process a batch")

    def _wait_for_quiet(self) -> None:
        """Wait until no answer has been recorded for QUIET_SECONDS (at most MAX_DEFER_SECONDS, or until stop)."""
        deadline = time.monotonic() + MAX_DEFER_SECONDS
        while not self._stopping.is_set():
            now = time.monotonic()
            quiet_for = now - self._recorded_at
            if quiet_for >= QUIET_SECONDS or now >= deadline:
                return
            self._stopping.wait(min(QUIET_SECONDS - quiet_for, deadline - now))

    def flush(self) -> None:
        """Process everything queued now (the writer does this every `flush_seconds`)."""
        with self._lock:
            entries = []
            queue = self._queue
            while queue:
                entries.append(queue.popleft())
            if entries:
                self._process(entries)

    def maintain(self) -> None:
        """Delete rows past the retention and candles no pending prediction needs."""
        with self._lock:
            self._maintained_at = time.monotonic()
            try:
                prune = {key: m.prune_from for key, m in self._markets.items() if m.needs_prune}
                if prune:
                    live.prune_candles(self.engine, prune)
                    for key in prune:
                        self._markets[key].needs_prune = False
                removed = live.expire(self.engine, int(time.time() * 1000) - self.retention_ms)
            except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
                log.warning("prediction journal: cannot delete expired rows: %s", one_line(exc))
                return
            if any(removed):
                log.info("prediction journal: deleted %d scores, %d pending predictions and %d candles past the "
                         "retention", *removed)
                self._markets.clear()  # reloaded from the database on their next use
                self._scored.clear()
                with self._summary_lock:
                    self._summaries.clear()

    # -- one batch -----------------------------------------------------------------------------------------------
    def _process(self, entries: list) -> None:
        now_ms = int(time.time() * 1000)
        by_market: dict[tuple[str, str], list] = {}
        records = self._records
        for entry in entries:
            rec = entry[0]
            records[rec.model_id] = rec
            by_market.setdefault((rec.symbol, rec.timeframe), []).append(entry)
        batch = live.JournalWrite()
        try:
            for key, items in by_market.items():
                self._process_market(key, items, batch, now_ms)
            if batch:
                live.write(self.engine, batch)
        except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
            self.dropped += len(entries)
            for key in by_market:
                self._markets.pop(key, None)
            for items in by_market.values():
                for entry in items:
                    self._scored.pop(entry[0].model_id, None)
            now = time.monotonic()
            if now - self._warned_at > _WARN_SECONDS:
                self._warned_at = now
                log.warning("prediction journal: %d answers could not be journaled (%d so far): %s", len(entries),
                            self.dropped, one_line(exc))
            return
        if batch.scores:
            with self._summary_lock:
                for model_id in {row["model_id"] for row in batch.scores}:
                    self._summaries.pop(model_id, None)

    def _market(self, key: tuple[str, str]) -> _Market:
        market = self._markets.get(key)
        if market is None:
            stored = live.read_market(self.engine, *key)
            market = _Market(timeframe_ms(key[1]), stored.pending, stored.candle_times, stored.candle_closes,
                             stored.last_candle_ms)
            self._markets[key] = market
        return market

    def _scored_times(self, model_id: str) -> np.ndarray:
        times = self._scored.get(model_id)
        if times is None:
            times = self._scored[model_id] = live.scored_times(self.engine, model_id)
        return times

    def _process_market(self, key: tuple[str, str], items: list, batch: live.JournalWrite, now_ms: int) -> None:
        symbol, timeframe = key
        market = self._market(key)

        # 1. The new predictions per model: ready and out of sample, last version per candle, not scored yet.
        served: dict[str, list[Predictions]] = {}
        candle_t: list[np.ndarray] = []
        candle_c: list[np.ndarray] = []
        for rec, pred, times, closes in items:  # no array work per answer: a stream sends one candle at a time
            candle_t.append(times)
            candle_c.append(closes)
            served.setdefault(rec.model_id, []).append(pred)
        for model_id, preds in served.items():
            keep = np.concatenate([q.ready for q in preds]) & ~np.concatenate([q.in_sample for q in preds])
            if not keep.any():
                continue
            t = np.concatenate([q.open_time_ms for q in preds])[keep]
            p = np.concatenate([q.proba for q in preds])[keep]
            t, p = last_per_time(t, p)
            fresh = ~np.isin(t, self._scored_times(model_id), assume_unique=True)
            t, p = t[fresh], p[fresh]
            if not len(t):
                continue
            old_t, old_p = market.pending.get(model_id, (np.empty(0, np.int64), np.empty((0, 3))))
            idx, found = _lookup(old_t, t)
            changed = ~found
            if len(old_t):
                changed |= ~(old_p[idx] == p).all(axis=1)
            for ti, pi in zip(t[changed].tolist(), p[changed].tolist(), strict=True):
                batch.predictions.append({"model_id": model_id, "open_time": ti, "symbol": symbol,
                                          "timeframe": timeframe, "p_down": pi[0], "p_range": pi[1], "p_up": pi[2],
                                          "served_at": now_ms})
            market.pending[model_id] = _merge(old_t, old_p, t, p)

        # 2. The candles: last close per candle; kept from the oldest pending prediction on.
        ct, cc = last_per_time(np.concatenate(candle_t), np.concatenate(candle_c))
        if len(ct):
            market.last_ms = max(int(ct[-1]), market.last_ms if market.last_ms is not None else int(ct[-1]))
        oldest = market.oldest_pending()
        if oldest is not None and len(ct):
            needed = ct >= oldest
            ct, cc = ct[needed], cc[needed]
            idx, found = _lookup(market.candle_times, ct)
            changed = ~found
            if len(market.candle_times):
                changed |= market.candle_closes[idx] != cc
            for ti, ci in zip(ct[changed].tolist(), cc[changed].tolist(), strict=True):
                batch.candles.append({"symbol": symbol, "timeframe": timeframe, "open_time": ti, "close": ci,
                                      "received_at": now_ms})
            market.candle_times, market.candle_closes = _merge(market.candle_times, market.candle_closes, ct, cc)

        # 3. Score what the candles realise; drop what they never will.
        for model_id in list(market.pending):
            times, proba = market.pending[model_id]
            try:
                rec = self._record(model_id)
            except (MlsignalError, sa.exc.SQLAlchemyError):
                raise
            except Exception as exc:  # a registry row this version cannot read: its predictions wait
                log.warning("prediction journal: model %s cannot be read: %s", model_id, one_line(exc))
                continue
            if rec is None:  # the model is gone from the registry: nothing to score it against
                batch.resolved.extend((model_id, int(t)) for t in times.tolist())
                del market.pending[model_id]
                continue
            spec = rec.label
            labels = realised_labels(times, market.candle_times, market.candle_closes, spec, market.timeframe_ms)
            done = labels != UNLABELLED
            if market.last_ms is not None:
                horizon_ms = (spec.horizon_bars + PENDING_MARGIN_BARS) * market.timeframe_ms
                done |= times < market.last_ms - horizon_ms
            if not done.any():
                continue
            scored = labels != UNLABELLED
            if scored.any():
                s_t, s_p, s_y = times[scored], proba[scored], labels[scored]
                rows = score_rows(s_p, s_y, rec.prior)
                for ti, pi, yi, loss, prior_loss, brier in zip(
                        s_t.tolist(), s_p.tolist(), s_y.tolist(), rows.loss.tolist(), rows.prior_loss.tolist(),
                        rows.brier.tolist(), strict=True):
                    batch.scores.append({"model_id": model_id, "open_time": ti, "symbol": symbol,
                                         "timeframe": timeframe, "label": yi, "p_down": pi[0], "p_range": pi[1],
                                         "p_up": pi[2], "loss": loss, "prior_loss": prior_loss, "brier": brier,
                                         "scored_at": now_ms})
                self._scored[model_id] = np.union1d(self._scored_times(model_id), s_t)
            batch.resolved.extend((model_id, int(t)) for t in times[done].tolist())
            if done.all():
                del market.pending[model_id]
            else:
                market.pending[model_id] = (times[~done], proba[~done])

        # 4. Candles before the oldest pending prediction are no longer needed.
        oldest = market.oldest_pending()
        if oldest is None:
            if len(market.candle_times):
                market.needs_prune = True
            market.candle_times, market.candle_closes = np.empty(0, np.int64), np.empty(0)
            market.prune_from = None
        elif len(market.candle_times) and market.candle_times[0] < oldest:
            keep = market.candle_times >= oldest
            market.candle_times, market.candle_closes = market.candle_times[keep], market.candle_closes[keep]
            market.prune_from, market.needs_prune = oldest, True

    def _record(self, model_id: str) -> ModelRecord | None:
        """A model's registry record (None when it is not in the registry); read once for pending predictions
        read back from the database, else the one the answer carried."""
        if model_id not in self._records:
            self._records[model_id] = registry.get_model(self.engine, model_id)
        return self._records[model_id]

    # -- the metrics endpoint --------------------------------------------------------------------------------------
    def summary(self, model_id: str) -> live.ScoreSummary:
        """Count and sums of the live log loss and the prior's log loss of a model (re-read at most every
        SUMMARY_TTL_SECONDS, and after this journal scored the model)."""
        now = time.monotonic()
        with self._summary_lock:
            cached = self._summaries.get(model_id)
            if cached is not None and now - cached.read_at < SUMMARY_TTL_SECONDS:
                return cached.value
        value = live.summaries(self.engine, [model_id]).get(model_id, live.ScoreSummary(0, 0.0, 0.0))
        with self._summary_lock:
            self._summaries[model_id] = _Summary(value, now)
        return value
