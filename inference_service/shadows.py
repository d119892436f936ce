"""Shadow predictions: every candle a market's serving model answers is predicted by the market's SHADOW models too,
off the answering path, and journaled, so the live test (`training_service.promotion`) can compare them on the same
candles.

The answering path only records a job (`submit`): the candles of the answer with the history before them, copied (a
stream's history arrays are reused), and which candles the serving model's answer was journaled for (ready and out
of its training window). The shadows predict them through the same `predict_window` as Predict and StreamPredict,
and journal the shadow's predictions for exactly those candles; the client's answer is built before and never
touched, so the bytes served are the same with or without shadows. Where the work runs:

* a stream message answered while `deferring()` is active (StreamPredict wraps each message in it) whose market's
  shadows are in memory: on the stream's own task once the response has been sent (`run`), when the server would
  otherwise wait for the client's next message; a background thread would compete with the event loop for the
  interpreter while the next message is answered;
* anything else (a Predict, a market whose shadows are not loaded yet): a background thread, which also loads the
  shadows (registry and disk) and never runs on the event loop.

Which models shadow a market is read from the registry the first time the market is answered, and again when the
registry's version says the market changed (one read of the version per poll, as the model store does). A market
known to have no shadow costs the answering path one dict lookup. A shadow that cannot be loaded (file missing,
sha256 mismatch) is skipped and logged once; a shadow whose features cannot be computed for a candle (it needs
funding rate the candles lack) skips those candles. Answers beyond `max_queued` waiting are not shadowed, and counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from inference_service.domain import CANDLE_FIELDS, CandleBatch, Predictions
from inference_service.model_store import LoadedModel, load_model
from inference_service.predictor import predict_window
from shared.errors import MlsignalError, one_line
from shared.store import registry

log = logging.getLogger(__name__)

Record = Callable[[LoadedModel, Predictions, CandleBatch], None]

# The jobs of the message being answered, to run after its response is sent (None: queue them for the thread).
_DEFERRED: contextvars.ContextVar[list | None] = contextvars.ContextVar("shadow_jobs", default=None)


@dataclass(frozen=True)
class _Job:
    key: tuple[str, str]
    serving_id: str
    window: CandleBatch  # owned copy: history then the answered candles
    first_row: int  # the first answered candle in `window`
    journaled: np.ndarray  # bool per answered candle: the serving model's prediction was journaled


class Shadows:
    """Predicts and journals what each market's SHADOW models say about the candles its serving model answered."""

    def __init__(self, engine: sa.Engine, model_dir: Path, record: Record, poll_seconds: float = 2.0,
                 max_queued: int = 20_000, forest_runtime: str | None = None) -> None:
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.forest_runtime = forest_runtime  # None: MLSIGNAL_FOREST_RUNTIME
        self.record = record
        self.poll_seconds = poll_seconds
        self.max_queued = max_queued
        self._queue: deque[_Job] = deque()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._by_market: dict[tuple[str, str], tuple[LoadedModel, ...]] = {}  # markets answered -> shadows
        self._warmup: dict[tuple[str, str], int] = {}  # -> the longest warm-up of its shadows
        self._refused: set[str] = set()
        self._failing: set[str] = set()
        self._seen: int | None = None
        self._polled_at = 0.0
        self.dropped = 0  # answers not shadowed: the queue was full
        self.predicted = 0  # shadow predictions journaled

    # -- the answering path ----------------------------------------------------------------------------------
    def submit(self, model: LoadedModel, predictions: Predictions, window: CandleBatch, first_row: int,
               pinned: bool) -> None:
        """Queue an answer of a market's serving model for its shadows. Only a lookup and, when the market has or
        may have shadows, a copy of the rows the shadows need."""
        if pinned:
            return  # a pinned model is not the market's serving model: nothing to compare with
        rec = model.record
        key = (rec.symbol, rec.timeframe)
        shadows = self._by_market.get(key)
        if shadows is not None and not shadows:
            return
        journaled = predictions.ready & ~predictions.in_sample
        if not journaled.any():
            return
        if len(self._queue) >= self.max_queued:
            self.dropped += 1
            return
        warmup = self._warmup.get(key) if shadows is not None else None
        lo = 0 if warmup is None else max(0, first_row - warmup + 1)
        part = window.slice(lo, len(window))
        copy = CandleBatch(*(np.array(getattr(part, f)) for f in CANDLE_FIELDS))
        job = _Job(key, model.model_id, copy, first_row - lo, journaled.copy())
        deferred = _DEFERRED.get()
        if deferred is not None and shadows:
            deferred.append(job)
            return
        self._queue.append(job)
        self._wake.set()

    @staticmethod
    @contextlib.contextmanager
    def deferring() -> Iterator[list]:
        """Collect the jobs submitted inside the block (in this context, or a worker thread started from it) instead
        of queueing them; the caller passes them to `run` once its answer is sent."""
        jobs: list = []
        token = _DEFERRED.set(jobs)
        try:
            yield jobs
        finally:
            _DEFERRED.reset(token)

    def enqueue(self, jobs: list) -> None:
        """Hand deferred jobs to the background thread instead."""
        self._queue.extend(jobs)
        self._wake.set()

    def run(self, jobs: list) -> None:
        """Predict and journal deferred jobs now (their market's shadows are in memory: no database, no disk)."""
        for job in jobs:
            try:
                self._shadow(job, load=False)
            except Exception:  # a shadow must never break the stream it shadows
                log.exception("shadow predictions failed")

    # -- the worker ------------------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shadow-predictions", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Predict what is queued, then stop."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.drain()

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            try:
                self.drain()
            except Exception:  # never let the worker die
                log.exception("shadow predictions failed")

    def drain(self) -> int:
        """Predict every queued answer with its market's shadows; returns how many answers were handled."""
        with self._lock:
            if time.monotonic() - self._polled_at >= self.poll_seconds:
                self._refresh()
            done = 0
            queue = self._queue
            while queue:
                job = queue.popleft()
                self._shadow(job)
                done += 1
            return done

    def _shadow(self, job: _Job, load: bool = True) -> None:
        shadows = self._by_market.get(job.key)
        if shadows is None:
            if not load:
                self._queue.append(job)
                self._wake.set()
                return
            try:
                shadows = self._load_market(job.key)
            except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
                log.warning("shadow models of %s %s cannot be read: %s", *job.key, one_line(exc))
                return
        for shadow in shadows:
            try:
                predictions = predict_window(shadow, job.window, job.first_row)
            except MlsignalError as exc:
                if shadow.model_id not in self._failing:
                    self._failing.add(shadow.model_id)
                    log.warning("shadow model %s cannot predict %s %s candles: %s", shadow.model_id, *job.key,
                                one_line(exc))
                continue
            self._failing.discard(shadow.model_id)
            predictions = replace(predictions, ready=predictions.ready & job.journaled)
            # No candles: the serving answer journaled them, and a newer version of a forming candle may have been
            # answered since; the shadow's record must not bring an older close back.
            self.record(shadow, predictions, CandleBatch.empty())
            self.predicted += int(predictions.ready.sum())

    # -- which models shadow a market ------------------------------------------------------------------------
    def _load_market(self, key: tuple[str, str]) -> tuple[LoadedModel, ...]:
        if self._seen is None:
            self._seen = registry.version(self.engine)
        models = []
        for row in registry.shadow_rows(self.engine, *key):
            existing = next((m for m in self._by_market.get(key, ()) if m.model_id == row.model_id), None)
            if existing is not None:
                models.append(existing)
                continue
            try:
                models.append(load_model(row.record(), self.model_dir, self.forest_runtime))
                self._refused.discard(row.model_id)
            except Exception as exc:  # a missing or corrupted file, an unreadable row: not shadowed
                if row.model_id not in self._refused:
                    self._refused.add(row.model_id)
                    log.error("shadow model %s is not used: %s", row.model_id, one_line(exc))
        found = tuple(models)
        self._by_market[key] = found
        self._warmup[key] = max((m.record.warmup_bars for m in found), default=0)
        return found

    def _refresh(self) -> None:
        """Re-read the shadows of the markets changed in the registry since the last look."""
        self._polled_at = time.monotonic()
        try:
            now = registry.version(self.engine)
            if self._seen is not None and now > self._seen:
                changed = registry.changed_markets(self.engine, self._seen, now) & set(self._by_market)
                for key in changed:
                    self._load_market(key)
            if self._refused:
                for key in list(self._by_market):
                    if any(r.model_id in self._refused for r in registry.shadow_rows(self.engine, *key)):
                        self._load_market(key)
            self._seen = now
        except (MlsignalError, sa.exc.SQLAlchemyError) as exc:
            log.warning("checking the registry for shadow models failed: %s", one_line(exc))

    def shadows_of(self, symbol: str, timeframe: str) -> tuple[str, ...]:
        """Ids of the models shadowing a market, as last read (empty when unknown)."""
        return tuple(m.model_id for m in self._by_market.get((symbol, timeframe), ()))
