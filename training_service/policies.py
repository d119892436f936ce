"""Retrain policies: their validation, and the runner that starts the job of every due policy.

A policy retrains one market every `every` on the last `window` of closed candles, with its label and params, as an
ordinary production job: it is queued on the scheduler, runs on the configured executor and goes through the
promotion gate like any other job. The runner's `tick` does one round; the server calls it every
MLSIGNAL_POLICY_INTERVAL_SECONDS from a background thread, tests call it directly with their own clock.

One tick:
1. records how the jobs started earlier ended (`last_outcome`): a FAILED or CANCELLED job is a failure, retried at
   the policy's next due time, never sooner;
2. claims each due, unpaused policy (`shared.store.policies.claim`: one conditional UPDATE advances its next due time
   to the first one after now and takes the lease, so of several replicas exactly one claims a due time, and a due
   time missed while the service was down runs once, not once per missed period), then
   - skips it when the market has no closed candle newer than the `train_end` of its newest production model
     (whatever that model's stage), or while the job it started last is still queued or running;
   - otherwise queues a production job over [end - window, end), where end is the close of the newest stored candle
     that closed by now.
   A policy is only claimed for a job while the training queue has room; the others stay due for the next tick, so
   a burst of due policies is queued as the queue drains and none is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import sqlalchemy as sa

from shared.errors import InvalidArgument, ResourceExhausted, Unavailable, one_line
from shared.features import FeatureSpec
from shared.store import policies as store
from shared.store import registry
from shared.store.policies import JOB_ACTIVE, RetrainPolicy
from shared.timeframes import format_duration, ms_to_iso, timeframe_ms
from training_service.evaluation import DEFAULT_CV_FOLDS
from training_service.jobs import CANCELLED, FAILED, SUCCEEDED, Job, TrainingRequest, now_ms
from training_service.pipeline import MIN_LABELLED_ROWS, min_candles_needed
from training_service.scheduler import Scheduler

log = logging.getLogger(__name__)

#: How long a claim keeps other replicas off a policy while its job is queued.
LEASE_MS = 5 * 60_000
#: Longest `every` and `window`: fifty years, like the longest training range.
MAX_DURATION_MS = 50 * 366 * 86_400_000
STARTED, SKIPPED, FAILURE = "started", "skipped", "failed"

Clock = Callable[[], int]


def validate(policy: RetrainPolicy) -> RetrainPolicy:
    """Check `every` and `window` against the timeframe, the label and the feature warm-up; InvalidArgument names the
    field. (Symbol, timeframe, label and params are checked as StartTraining checks them, when the message is
    converted.)"""
    tf_ms = timeframe_ms(policy.timeframe)
    if not tf_ms <= policy.every_ms <= MAX_DURATION_MS:
        raise InvalidArgument(
            f"every: must be at least one {policy.timeframe} candle ({format_duration(tf_ms)}) and at most 50 years, "
            f"got {format_duration(policy.every_ms)}", field="every")
    needed = min_candles_needed(FeatureSpec(), policy.label)
    if policy.window_ms < needed * tf_ms:
        raise InvalidArgument(
            f"window: {format_duration(policy.window_ms)} holds {policy.window_ms // tf_ms} {policy.timeframe} "
            f"candles, but training with label.horizon_bars={policy.label.horizon_bars} needs at least {needed} "
            f"(feature warm-up, horizon and {MIN_LABELLED_ROWS} labelled rows): at least "
            f"{format_duration(needed * tf_ms)}", field="window")
    if policy.window_ms > MAX_DURATION_MS:
        raise InvalidArgument(f"window: must be at most 50 years, got {format_duration(policy.window_ms)}",
                              field="window")
    return policy


@dataclass
class TickReport:
    """What one tick did."""

    started: list[str] = field(default_factory=list)  # ids of the jobs it queued
    skipped: int = 0  # due policies skipped (no new candle, or the previous job still running)
    failed: int = 0  # failures recorded: jobs that ended FAILED or CANCELLED, and jobs that could not be queued
    succeeded: int = 0  # successful job ends recorded
    waiting: int = 0  # due policies left due because the training queue was full


def _owner() -> str:
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class PolicyRunner:
    """Starts the jobs of due retrain policies through `scheduler`.

    `clock()` gives the time in epoch milliseconds (the wall clock unless a test injects its own): it decides which
    policies are due and which candles are closed. `interval` is the seconds between two ticks of the background
    thread (0: no thread; `tick` is then called by the caller). `on_outcome(kind, symbol, timeframe)` (kind started,
    skipped or failed) feeds the metrics.
    """

    def __init__(self, engine: sa.Engine, scheduler: Scheduler, *, clock: Clock = now_ms, interval: float = 5.0,
                 owner: str | None = None, lease_ms: int = LEASE_MS) -> None:
        self.engine = engine
        self.scheduler = scheduler
        self.jobs = scheduler.store
        self.clock = clock
        self.interval = interval
        self.owner = owner or _owner()
        self.lease_ms = lease_ms
        self.on_outcome: Callable[[str, str, str], None] | None = None
        self._lock = threading.Lock()  # one tick at a time
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        # Releases of claims that the database refused (it went away meanwhile): retried at the next tick, while
        # the lease is still ours, so a started job or a handed-back due time is not lost.
        self._unreleased: dict[tuple[str, str], tuple[RetrainPolicy, dict]] = {}

    # -- lifecycle ---------------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the background thread (none when `interval` is 0)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="retrain-policies", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 0.0) -> None:
        """Stop the background thread after the tick in progress."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=max(grace, 0.0) + 30)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self.tick()
            except Exception as exc:  # the database is away, or a bug: log it once, keep ticking
                if not self._failing:
                    self._failing = True
                    log.warning("retrain policies are not run until this works again: %s", one_line(exc),
                                exc_info=not isinstance(exc, Unavailable))
            else:
                if self._failing:
                    self._failing = False
                    log.info("retrain policies run again")
            self._stopping.wait(self.interval)

    # -- one round ---------------------------------------------------------------------------------------------------
    def tick(self) -> TickReport:
        """Record the ends of earlier jobs, then skip or start every due policy (see the module docstring)."""
        with self._lock:
            now = self.clock()
            report = TickReport()
            self._retry_releases(now)
            for policy in store.awaiting_outcome(self.engine):
                job = self.jobs.get(policy.last_job_id)
                if job is None or job.final:
                    self._record_end(policy, job, now, report)
            self._run_due(now, report)
            return report

    def _run_due(self, now: int, report: TickReport) -> None:
        room = self.scheduler.room()
        for policy in store.due(self.engine, now):
            if self._stopping.is_set():
                return
            request, skip = self._decide(policy, now, report)
            if request is not None and room <= 0:
                report.waiting += 1  # stays due: the next tick queues it when the queue has room
                continue
            claimed = store.claim(self.engine, policy, self.owner, now, self.lease_ms)
            if claimed is None:
                continue  # another replica claimed this due time, or the policy changed meanwhile
            if skip is not None or request is None:
                self._release(claimed, now, last_outcome=skip or "")
                report.skipped += 1
                log.info("retrain policy %s %s: %s", policy.symbol, policy.timeframe, skip)
                self._emit(SKIPPED, policy)
                continue
            try:
                job = self.scheduler.submit(request)
            except (ResourceExhausted, Unavailable) as exc:
                # not queued: hand the due time back, the next tick tries again
                log.info("retrain policy %s %s waits for the next tick: %s", policy.symbol, policy.timeframe,
                         one_line(exc))
                self._release(claimed, now, next_run_at_ms=policy.next_run_at_ms)
                report.waiting += 1
                room = 0
                continue
            except Exception as exc:
                outcome = f"failed: the job could not be queued: {one_line(exc, with_type=True)}"
                log.exception("retrain policy %s %s: %s", policy.symbol, policy.timeframe, outcome)
                self._release(claimed, now, last_outcome=outcome)
                report.failed += 1
                self._emit(FAILURE, policy)
                continue
            room -= 1
            outcome = (f"started: job {job.job_id} on {ms_to_iso(request.start_ms or 0)} .. "
                       f"{ms_to_iso(request.end_ms or 0)}")
            self._release(claimed, now, last_job_id=job.job_id, last_job_state=job.state, last_outcome=outcome)
            report.started.append(job.job_id)
            log.info("retrain policy %s %s: %s (next due %s)", policy.symbol, policy.timeframe, outcome,
                     ms_to_iso(claimed.next_run_at_ms))
            self._emit(STARTED, policy)

    def _decide(self, policy: RetrainPolicy, now: int,
                report: TickReport) -> tuple[TrainingRequest | None, str | None]:
        """(the job to start, None) or (None, why the policy is skipped)."""
        if policy.last_job_state in JOB_ACTIVE:
            job = self.jobs.get(policy.last_job_id)
            if job is not None and not job.final:
                return None, f"skipped: job {job.job_id} of the previous run is still {job.state}"
            self._record_end(policy, job, now, report)  # it ended since this tick began
        newest = store.newest_closed_candle(self.engine, policy.symbol, policy.timeframe, now)
        if newest is None:
            return None, f"skipped: no closed {policy.timeframe} candle of {policy.symbol} is stored"
        model = registry.newest_production_model(self.engine, policy.symbol, policy.timeframe)
        if model is not None and newest <= model.train_end_ms:
            return None, f"skipped: no candle after {ms_to_iso(model.train_end_ms)}, the end of model {model.model_id}"
        end = newest + timeframe_ms(policy.timeframe)
        return TrainingRequest(symbol=policy.symbol, timeframe=policy.timeframe, start_ms=end - policy.window_ms,
                               end_ms=end, label=policy.label, params=policy.params,
                               cv_folds=DEFAULT_CV_FOLDS if policy.cross_validate else 0), None

    def _record_end(self, policy: RetrainPolicy, job: Job | None, now: int, report: TickReport) -> None:
        """Record in `last_outcome` how the policy's last job ended (once, whichever replica sees it first)."""
        job_id = policy.last_job_id
        if job is None:
            state, outcome = FAILED, f"failed: job {job_id} is not in the database; the next due time retries"
        elif job.state == SUCCEEDED:
            state, outcome = SUCCEEDED, self._success(job)
        else:
            state = job.state if job.state in (FAILED, CANCELLED) else FAILED
            outcome = f"failed: job {job_id} {job.state}: {job.error or '(no message)'}; the next due time retries"
        if not store.record_outcome(self.engine, policy, state, outcome, now):
            return
        if state == SUCCEEDED:
            report.succeeded += 1
            log.info("retrain policy %s %s: %s", policy.symbol, policy.timeframe, outcome)
        else:
            report.failed += 1
            log.warning("retrain policy %s %s: %s", policy.symbol, policy.timeframe, outcome)
            self._emit(FAILURE, policy)

    def _success(self, job: Job) -> str:
        model = registry.get_model(self.engine, job.model_id) if job.model_id else None
        if model is None:
            return f"succeeded: job {job.job_id} registered model {job.model_id or '(none)'}"
        reason = f" ({model.stage_reason})" if model.stage_reason else ""
        return f"succeeded: job {job.job_id} registered model {model.model_id} as {model.stage}{reason}"

    # -- claims ------------------------------------------------------------------------------------------------------
    def _release(self, claimed: RetrainPolicy, now: int, **values) -> None:
        try:
            if not store.release(self.engine, claimed, self.owner, now, **values):
                log.warning("retrain policy %s %s was deleted, or its lease expired, before this outcome was "
                            "recorded: %s", claimed.symbol, claimed.timeframe, values.get("last_outcome", ""))
        except Unavailable:
            self._unreleased[claimed.key] = (claimed, values)
            raise

    def _retry_releases(self, now: int) -> None:
        for key, (claimed, values) in list(self._unreleased.items()):
            store.release(self.engine, claimed, self.owner, now, **values)
            del self._unreleased[key]

    def _emit(self, kind: str, policy: RetrainPolicy) -> None:
        if self.on_outcome is None:
            return
        try:
            self.on_outcome(kind, policy.symbol, policy.timeframe)
        except Exception:  # metrics must never disturb the runner
            log.debug("retrain policy metrics failed", exc_info=True)
