"""The prediction journal: every ready, out-of-sample prediction inference serves with a production model (any stage
but RESEARCH: the serving model, its shadows, a model pinned by model_id), and the candles it receives, kept until
the prediction can be scored (`inference_service.live_scores`), then its score.

The hot path (`record`) only appends the answer to a queue. A background thread takes the queue every
`flush_seconds` (sooner when it grows long), once answers have stopped arriving for a moment (`QUIET_SECONDS`, at
most `MAX_DEFER_SECONDS` later): a candle-close burst over a fleet of markets is answered first and journaled right
after, instead of sharing the interpreter with the journal's work while it is answered. Then, per market:

1. keeps the last version of each candle (close) and of each prediction (probabilities) per model, last in the order
   the answers were recorded (the queue's), so a forming candle sent again counts in its final version, and drops
   predictions already scored (serving the same candles again adds nothing);
2. scores the pending predictions whose label the candles received now realise, and drops those that can no longer
   be realised (see "Bounds");
3. writes candles, pending predictions and new scores in one transaction (`shared.store.live`).

Replicas. Inference replicas sharing a database journal and score together: a prediction one of them served is
scored with the candles any of them received, once per model and candle (a second score for a key is ignored). Each
batch locks the rows of its markets in `live_markets` for its transaction and advances their versions; a journal whose
copy of a market is older than the version it finds there (another replica changed the market since) reads the
market's pending predictions and candles again, under that lock, before scoring.

What the journal holds per market (pending predictions, the candles they need, the newest candle) is kept in memory,
read from the database the first time a market is seen and again only when another replica changed it, so the writes
are only the rows that changed and scoring needs no reads. The times already scored are kept per model as well (read
once per model). Scores and pending predictions survive a restart.

Bounds:
* a pending prediction is dropped when the market's candles have moved `horizon_bars + PENDING_MARGIN_BARS` candles
  past it without realising its label (a gap in the candles received);
* candles are written from the oldest pending prediction of their market on, and those at or after the newest candle
  journaled before them (a prediction another replica has not written yet may need them). Every
  `MAINTENANCE_SECONDS`, maintenance deletes, in the markets this journal changed, the candles that no prediction
  pending at that moment needs (those before the oldest one, read from the database in the statement that deletes,
  with the market locked), except candles received in the last `PRUNE_GRACE_SECONDS`;
* maintenance also deletes scores scored, predictions served and candles received more than the retention
  (MLSIGNAL_LIVE_RETENTION_DAYS) ago; this journal forgets exactly the rows it deleted, and the markets it changed
  are read again by the other replicas;
* the queue holds at most `max_queued` answers; beyond that (the database far slower than the traffic) answers are
  not journaled, and counted in `dropped` (the metric `mlsignal_journal_dropped`).

While the database is unavailable (unreachable, locked, read-only) a batch cannot be written: the journal keeps its
answers, at most `max_held` (`MAX_HELD_ANSWERS` by default; beyond that the oldest are dropped and counted in
`dropped`), and journals them at its next flushes, in the order they were recorded and before anything recorded
later, once the database works again; a warning says how many it keeps. A batch the database refuses for another
reason is dropped and counted. Wall-clock times (served, received, scored, the retention) come from `clock`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sqlalchemy as sa

from inference_service.domain import CandleBatch, Predictions
from inference_service.drift_window import DEFAULT_WINDOW, DriftWindows
from inference_service.live_scores import realised_labels, score_rows
from inference_service.model_store import LoadedModel
from shared.errors import MlsignalError, Unavailable, one_line
from shared.labels import UNLABELLED
from shared.store import live, registry
from shared.store.registry import ModelRecord
from shared.timeframes import timeframe_ms

log = logging.getLogger(__name__)

#: Candles past a pending prediction's horizon after which it is dropped as unrealisable (missing candles).
PENDING_MARGIN_BARS = 24
#: How often expired rows are deleted (retention) and unneeded candles pruned, in seconds.
MAINTENANCE_SECONDS = 60.0
#: Candles received this recently (seconds) are never pruned: a prediction another replica has not written yet may
#: need them.
PRUNE_GRACE_SECONDS = 300.0
#: Answers kept while the database cannot be written; beyond that the oldest are dropped (and counted).
MAX_HELD_ANSWERS = 50_000
#: A flush waits until no answer has been recorded for this long (seconds) ...
QUIET_SECONDS = 0.05
#: ... but no longer than this past its due time.
MAX_DEFER_SECONDS = 5.0
#: How long a score summary read for the metrics endpoint is reused, in seconds.
SUMMARY_TTL_SECONDS = 30.0
_WARN_SECONDS = 60.0

Market = tuple[str, str]  # (symbol, timeframe)
Entry = tuple[ModelRecord, Predictions, np.ndarray, np.ndarray]  # an answer: model, predictions, candle times, closes


def last_per_time(times: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique times, sorted, each with the value of its last occurrence."""
    if len(times) == 0:
        return times, values
    reverse = times[::-1]
    unique, first_in_reverse = np.unique(reverse, return_index=True)  # a stable sort: the first in reverse order
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


def _outage(exc: BaseException) -> bool:
    """Whether a database error means the database cannot be used now (unreachable, locked, read-only)."""
    if isinstance(exc, (Unavailable, sa.exc.OperationalError, sa.exc.InterfaceError)):
        return True
    return isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated


@dataclass
class _Market:
    timeframe_ms: int
    pending: dict[str, tuple[np.ndarray, np.ndarray]]  # model id -> (times sorted, probabilities (n, 3))
    candle_times: np.ndarray  # the candles from the oldest pending prediction on
    candle_closes: np.ndarray
    last_ms: int | None  # the newest candle any journal received
    version: int  # the market's version in the database this copy matches
    prune_ms: int | None = None  # wall time of the last batch that may have left unneeded candles (None: none)

    def oldest_pending(self) -> int | None:
        firsts = [int(t[0]) for t, _ in self.pending.values() if len(t)]
        return min(firsts) if firsts else None


@dataclass
class _Served:
    """One market's share of a batch, before its lock: per model, the ready out-of-sample predictions (last version
    per candle); the candles (last close per candle)."""

    predictions: dict[str, tuple[np.ndarray, np.ndarray]]
    candle_times: np.ndarray
    candle_closes: np.ndarray


@dataclass
class _Summary:
    value: live.ScoreSummary
    read_at: float


class Journal:
    """Journals served predictions and received candles, and scores predictions as their labels are realised."""

    def __init__(self, engine: sa.Engine, *, flush_seconds: float = 1.0, retention_days: float = 90.0,
                 max_queued: int = 50_000, wake_entries: int = 1024, max_held: int = MAX_HELD_ANSWERS,
                 clock: Callable[[], float] = time.time, drift_window: int = DEFAULT_WINDOW) -> None:
        self.engine = engine
        self.flush_seconds = flush_seconds
        self.retention_ms = int(retention_days * 86_400_000)
        self.max_queued = max_queued
        self.wake_entries = wake_entries
        self.max_held = max_held
        self.clock = clock  # wall clock, seconds since the epoch
        self._queue: deque[Entry] = deque()
        self._held: deque[Entry] = deque()  # answers of batches the database could not take, oldest first
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one batch at a time
        self._markets: dict[Market, _Market] = {}
        self._scored: dict[str, np.ndarray] = {}  # model id -> open times scored, sorted
        self._records: dict[str, ModelRecord | None] = {}  # model id -> its record (None: not in the registry)
        self._summaries: dict[str, _Summary] = {}
        self._summary_lock = threading.Lock()
        self._maintained_at = time.monotonic()
        self._warned_at = 0.0
        self._recorded_at = 0.0  # monotonic time of the last answer recorded
        self.dropped = 0  # answers not journaled: queue full, held beyond `max_held`, or refused by the database
        self.drift = DriftWindows(drift_window)  # the features and OOD flags of the last candles each model served

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
        """Write what is queued and stop the writer. Answers the database still cannot take are dropped (counted)."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.flush()
        with self._lock:
            if self._held:
                self.dropped += len(self._held)
                log.warning("prediction journal: stopped with %d answers the database could not take; they are not "
                            "journaled", len(self._held))
                self._held.clear()

    @property
    def held(self) -> int:
        """Answers kept until the database can take them."""
        return len(self._held)

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
        """Process the answers held from batches the database could not take, then everything queued now, in the
        order they were recorded (the writer does this every `flush_seconds`)."""
        with self._lock:
            entries = list(self._held)
            self._held.clear()
            queue = self._queue
            drift = self.drift
            while queue:
                entry = queue.popleft()
                drift.add(entry[0], entry[1])
                entries.append(entry)
            if entries:
                self._process(entries)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- maintenance ---------------------------------------------------------------------------------------------
    def maintain(self) -> None:
        """Delete candles no pending prediction needs, and rows past the retention."""
        with self._lock:
            self._maintained_at = time.monotonic()
            now_ms = self._now_ms()
            try:
                self._prune(now_ms)
                self._expire(now_ms - self.retention_ms)
            except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
                log.warning("prediction journal: maintenance failed: %s", one_line(exc))

    def _prune(self, now_ms: int) -> None:
        """Delete the candles of the markets this journal changed that no prediction pending now needs. The bound is
        read when the candles are deleted, with the markets locked."""
        keys = sorted(key for key, m in self._markets.items() if m.prune_ms is not None)
        if not keys:
            return
        grace_ms = int(PRUNE_GRACE_SECONDS * 1000)
        with self.engine.begin() as conn:
            live.lock_markets(conn, keys, bump=False)  # only what no journal needs goes: their copies stay current
            live.prune_candles(conn, keys, received_before=now_ms - grace_ms)
        for key in keys:
            market = self._markets.get(key)
            if market is not None and market.prune_ms is not None and market.prune_ms < now_ms - grace_ms:
                market.prune_ms = None  # everything it wrote is past the grace: pruned for good

    def _expire(self, before_ms: int) -> None:
        """Delete rows past the retention, and forget exactly those."""
        with self.engine.begin() as conn:
            scores = live.expire_scores(conn, before_ms)
        by_model: dict[str, list[int]] = {}
        for model_id, t in scores:
            by_model.setdefault(model_id, []).append(t)
        for model_id, times in by_model.items():
            scored = self._scored.get(model_id)
            if scored is not None:
                self._scored[model_id] = np.setdiff1d(scored, np.array(times, dtype=np.int64), assume_unique=True)
        if by_model:
            with self._summary_lock:
                for model_id in by_model:
                    self._summaries.pop(model_id, None)

        with self.engine.begin() as conn:
            keys = live.expiring_markets(conn, before_ms)
            if not keys:
                expired: dict[Market, live.Expired] = {}
                rows: dict[Market, live.MarketRow] = {}
            else:
                rows = live.lock_markets(conn, keys)  # other journals read these markets again
                expired = {key: live.expire_market(conn, key, before_ms) for key in keys}
        for key, gone in expired.items():
            market = self._markets.get(key)
            if market is None:
                continue
            if market.version != rows[key].version - 1:
                del self._markets[key]  # another journal changed it meanwhile: read again at its next batch
                continue
            market.version = rows[key].version
            self._forget(market, gone)
        n_pending = sum(len(g.predictions) for g in expired.values())
        n_candles = sum(len(g.candles) for g in expired.values())
        if scores or n_pending or n_candles:
            log.info("prediction journal: deleted %d scores, %d pending predictions and %d candles past the "
                     "retention", len(scores), n_pending, n_candles)

    @staticmethod
    def _forget(market: _Market, gone: live.Expired) -> None:
        """Drop from a market's copy the pending predictions and candles expiry deleted."""
        by_model: dict[str, list[int]] = {}
        for model_id, open_time in gone.predictions:
            by_model.setdefault(model_id, []).append(open_time)
        for model_id, times in by_model.items():
            if model_id not in market.pending:
                continue
            t, p = market.pending[model_id]
            keep = ~np.isin(t, np.array(times, dtype=np.int64))
            if keep.any():
                market.pending[model_id] = (t[keep], p[keep])
            else:
                del market.pending[model_id]
        if gone.candles:
            keep = ~np.isin(market.candle_times, np.array(gone.candles, dtype=np.int64))
            market.candle_times, market.candle_closes = market.candle_times[keep], market.candle_closes[keep]

    # -- one batch -----------------------------------------------------------------------------------------------
    def _process(self, entries: list[Entry]) -> None:
        now_ms = self._now_ms()
        by_market: dict[Market, list[Entry]] = {}
        records = self._records
        for entry in entries:
            rec = entry[0]
            records[rec.model_id] = rec
            by_market.setdefault((rec.symbol, rec.timeframe), []).append(entry)
        batch = live.JournalWrite()
        try:
            served = {key: self._served(items) for key, items in by_market.items()}
            with self.engine.begin() as conn:
                rows = live.lock_markets(conn, served)
                for key in sorted(served):
                    market = self._current(conn, key, rows[key])
                    self._process_market(conn, key, market, served[key], batch, now_ms)
                if batch:
                    live.write(conn, batch)
        except Exception as exc:
            # The copies of these markets may be ahead of the database now: read them again at their next batch.
            for key in by_market:
                self._markets.pop(key, None)
            for model_id in {row["model_id"] for row in batch.scores}:
                self._scored.pop(model_id, None)
            if not isinstance(exc, (MlsignalError, sa.exc.SQLAlchemyError)):
                self.dropped += len(entries)
                raise
            self._failed(entries, exc)
            return
        if batch.scores:
            with self._summary_lock:
                for model_id in {row["model_id"] for row in batch.scores}:
                    self._summaries.pop(model_id, None)

    def _failed(self, entries: list[Entry], exc: BaseException) -> None:
        """Keep the answers of a batch the database could not take (it is unavailable), the oldest dropped beyond
        `max_held`; drop those it refused."""
        outage = _outage(exc)
        if outage:
            held = self._held
            held.extend(entries)
            lost = max(len(held) - self.max_held, 0)
            for _ in range(lost):
                held.popleft()
        else:
            lost = len(entries)
        self.dropped += lost
        now = time.monotonic()
        if now - self._warned_at > _WARN_SECONDS:
            self._warned_at = now
            if outage:
                log.warning("prediction journal: the database cannot take a batch; keeping %d answers until it works "
                            "again (%d dropped so far): %s", len(self._held), self.dropped, one_line(exc))
            else:
                log.warning("prediction journal: the database refused a batch of %d answers; they are not journaled "
                            "(%d so far): %s", len(entries), self.dropped, one_line(exc))

    def _served(self, items: list[Entry]) -> _Served:
        """A market's answers reduced to the last version of each candle and of each production model's ready,
        out-of-sample prediction per candle, in the order the answers were recorded."""
        by_model: dict[str, list[Predictions]] = {}
        candle_t: list[np.ndarray] = []
        candle_c: list[np.ndarray] = []
        for rec, pred, times, closes in items:  # no array work per answer: a stream sends one candle at a time
            candle_t.append(times)
            candle_c.append(closes)
            if rec.stage != registry.RESEARCH:  # a research model's predictions are not live ones
                by_model.setdefault(rec.model_id, []).append(pred)
        predictions: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for model_id, preds in by_model.items():
            keep = np.concatenate([q.ready for q in preds]) & ~np.concatenate([q.in_sample for q in preds])
            if keep.any():
                predictions[model_id] = last_per_time(np.concatenate([q.open_time_ms for q in preds])[keep],
                                                      np.concatenate([q.proba for q in preds])[keep])
        ct, cc = last_per_time(np.concatenate(candle_t), np.concatenate(candle_c))
        return _Served(predictions, ct, cc)

    def _current(self, conn: sa.Connection, key: Market, row: live.MarketRow) -> _Market:
        """This journal's copy of a market, read again when another journal changed the market since (its version
        moved by more than this batch's own step); the market's row is locked."""
        market = self._markets.get(key)
        if market is None or market.version != row.version - 1:
            stored = live.read_market(conn, *key)
            fresh = _Market(timeframe_ms(key[1]), stored.pending, stored.candle_times, stored.candle_closes,
                            row.last_candle_ms, row.version)
            if market is not None:
                fresh.prune_ms = market.prune_ms
            self._markets[key] = market = fresh
        market.version = row.version
        market.last_ms = row.last_candle_ms
        return market

    def _scored_times(self, conn: sa.Connection, model_id: str) -> np.ndarray:
        times = self._scored.get(model_id)
        if times is None:
            times = self._scored[model_id] = live.scored_times(conn, model_id)
        return times

    def _process_market(self, conn: sa.Connection, key: Market, market: _Market, served: _Served,
                        batch: live.JournalWrite, now_ms: int) -> None:
        symbol, timeframe = key

        # 1. The new predictions per model: not scored yet, and those that changed written.
        for model_id, (t, p) in served.predictions.items():
            fresh = ~np.isin(t, self._scored_times(conn, model_id), assume_unique=True)
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

        # 2. The candles: from the oldest pending prediction on, and those at or after the newest candle journaled
        #    before them (the newest of this batch for a market new to the journal).
        ct, cc = served.candle_times, served.candle_closes
        if len(ct):
            newest = int(ct[-1])
            keep_from = newest if market.last_ms is None else market.last_ms
            if market.last_ms is None or newest > market.last_ms:
                market.last_ms = batch.last_candles[key] = newest
            oldest = market.oldest_pending()
            if oldest is not None:
                keep_from = min(keep_from, oldest)
            needed = ct >= keep_from
            ct, cc = ct[needed], cc[needed]
            idx, found = _lookup(market.candle_times, ct)
            changed = ~found
            if len(market.candle_times):
                changed |= market.candle_closes[idx] != cc
            if changed.any():
                for ti, ci in zip(ct[changed].tolist(), cc[changed].tolist(), strict=True):
                    batch.candles.append({"symbol": symbol, "timeframe": timeframe, "open_time": ti, "close": ci,
                                          "received_at": now_ms})
                market.prune_ms = now_ms
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
            if rec is None or rec.stage == registry.RESEARCH:
                # gone from the registry (nothing to score against), or a research model's (not live predictions)
                batch.resolved.extend((model_id, int(t)) for t in times.tolist())
                del market.pending[model_id]
                market.prune_ms = now_ms
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
                self._scored[model_id] = np.union1d(self._scored_times(conn, model_id), s_t)
            batch.resolved.extend((model_id, int(t)) for t in times[done].tolist())
            market.prune_ms = now_ms
            if done.all():
                del market.pending[model_id]
            else:
                market.pending[model_id] = (times[~done], proba[~done])

        # 4. The copy keeps the candles from the oldest pending prediction on, and the newest candle (maintenance
        #    prunes the database).
        bounds = [b for b in (market.oldest_pending(), market.last_ms) if b is not None]
        if not bounds:
            market.candle_times, market.candle_closes = np.empty(0, np.int64), np.empty(0)
        elif len(market.candle_times) and market.candle_times[0] < min(bounds):
            keep = market.candle_times >= min(bounds)
            market.candle_times, market.candle_closes = market.candle_times[keep], market.candle_closes[keep]

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
