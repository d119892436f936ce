"""Runs queued training jobs through an executor, so the gRPC threads stay free and cancel is real.

`MLSIGNAL_TRAINING_WORKERS` jobs run at once; further jobs wait in a bounded queue. Where a job runs is the
executor's business (training_service/executors.py): a local spawned process by default, or one task on a Dask
cluster with MLSIGNAL_DASK_SCHEDULER. The scheduler keeps the queue, the jobs table and the state transitions, and
registers every model itself: the executor hands back the artifact bytes, which are written to partial files, renamed
into place and recorded with their sha256 in one transaction. Cancelling a running job stops it through the executor;
nothing of it is written.

The database may refuse writes for a while (a read-only or locked SQLite file, PostgreSQL down or restarting). Nothing
ends a worker thread: a progress write that fails is skipped, and a job whose database write fails is recorded FAILED
with the cause as soon as the database takes writes again (that final write is retried with backoff until it succeeds
or the scheduler stops; a job left RUNNING that way is marked interrupted at the next start). Meanwhile `healthy` is
False and `on_health_change` reports each change, so the server can report the service NOT_SERVING.

A model row and its job's SUCCEEDED state are one transaction that only succeeds while the job is still RUNNING, and
cancel() and stop() change a job only while it is QUEUED or RUNNING: whichever commits first wins, so a registered
model's job is always SUCCEEDED and a cancelled or interrupted job never leaves a model or artifact files behind.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from shared.artifacts import sha256_bytes
from shared.drift import DriftModel
from shared.errors import FailedPrecondition, MlsignalError, NotFound, ResourceExhausted, Unavailable, one_line
from shared.features import FeatureSpec
from shared.labels import CLASSES
from shared.ood import OodModel
from shared.store.registry import (
    PROMOTION_MODES,
    RESEARCH_PURPOSE,
    ModelRecord,
    insert_model,
    registration_stage,
    retire_old_research,
)
from training_service.executors import CANCELLED as RUN_CANCELLED
from training_service.executors import DIED, ERROR, RESULT, Executor, LocalProcessExecutor, Run
from training_service.jobs import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobStore,
    TrainingRequest,
    now_ms,
)

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.2  # seconds between progress writes of the same stage
PROGRESS_RETRY_INTERVAL = 1.0  # seconds progress writes are skipped after one failed
RETRY_FIRST_DELAY = 0.2  # seconds before the first retry of a job's final write; doubles up to RETRY_MAX_DELAY
RETRY_MAX_DELAY = 5.0
# Research retention spares models younger than this, so a long walk-forward keeps every model it still predicts with.
RESEARCH_GRACE_MS = 24 * 3_600_000


def partial_paths(model_dir: Path, job_id: str) -> tuple[Path, Path]:
    return model_dir / f".{job_id}.onnx.partial", model_dir / f".{job_id}.joblib.partial"


def new_model_id(symbol: str, timeframe: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', symbol)}_{timeframe}_{stamp}_{uuid.uuid4().hex[:8]}"


def _cause(exc: BaseException) -> str:
    """An error as a job's `error` and in logs: a domain error's own message, anything else with its type."""
    return one_line(exc, with_type=not isinstance(exc, MlsignalError))


class _NotRunning(Exception):
    """The job left RUNNING (cancelled, or interrupted by stop) before its model was committed."""


class Scheduler:
    def __init__(self, store: JobStore, database_url: str, model_dir: Path, workers: int = 1,
                 queue_size: int = 16, fit_jobs: int = -1, executor: Executor | None = None,
                 promotion: str = "shadow", promotion_tolerance: float = 0.0, research_keep: int = 50):
        if promotion not in PROMOTION_MODES:
            raise ValueError(f"MLSIGNAL_PROMOTION={promotion!r}: expected one of {', '.join(PROMOTION_MODES)}")
        if not (math.isfinite(promotion_tolerance) and promotion_tolerance > -1):
            raise ValueError(f"MLSIGNAL_PROMOTION_TOLERANCE={promotion_tolerance!r}: expected a number above -1")
        if research_keep < 1:
            raise ValueError(f"MLSIGNAL_RESEARCH_KEEP={research_keep!r}: expected an integer >= 1")
        # The promotion gate and research retention applied at registration (shared.store.registry).
        self.promotion = promotion
        self.promotion_tolerance = promotion_tolerance
        self.research_keep = research_keep
        self.research_grace_ms = RESEARCH_GRACE_MS  # research models younger than this are never retired
        self.store = store
        self.database_url = database_url
        self.model_dir = Path(model_dir)
        self.workers = workers
        self.queue_size = queue_size
        self.fit_jobs = fit_jobs
        self.executor = executor if executor is not None else LocalProcessExecutor(database_url, fit_jobs, workers)
        self._lock = threading.Lock()
        self._pending: list[str] = []  # queued job ids, oldest first
        self._runs: dict[str, Run] = {}  # running job id -> its run in the executor
        self._active: set[str] = set()  # jobs a worker took from the queue and has not finished with
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._halt = threading.Event()  # set by stop(): retries of final writes give up
        self._threads: list[threading.Thread] = []
        self._health_lock = threading.RLock()
        self._write_failing = False  # a worker's database write failed and none has succeeded since
        self._unrecorded: set[str] = set()  # jobs whose final state waits for the database
        self._healthy = True
        # metrics hook: on_job_finished(job) once a worker is done with a job
        self.on_job_finished: Callable[[Job], None] | None = None
        # health hook: on_health_change(healthy) on every change of `healthy`; called from the thread that saw the
        # change, in order, so it must return quickly
        self.on_health_change: Callable[[bool], None] | None = None
        # Hooks for tests of the registration race, None in production. Both get the job id of a run that ended with
        # a result: `before_register` once its artifact files are in place, before the registering transaction;
        # `before_register_commit` inside that transaction, after its writes, just before the commit.
        self.before_register: Callable[[str], None] | None = None
        self.before_register_commit: Callable[[str], None] | None = None

    def room(self) -> int:
        """Jobs `submit` accepts now: the free places of the queue (retrain policies queue only that many)."""
        with self._lock:
            return max(0, self.queue_size - len(self._pending))

    def running_job_ids(self) -> list[str]:
        """Ids of the jobs whose process or task is running now; empty once every one of them is gone."""
        with self._lock:
            return list(self._runs)

    # -- health ------------------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False while jobs cannot run: a worker's database write failed and none has succeeded since, or a
        finished job's final state is waiting for the database."""
        with self._health_lock:
            return self._healthy

    def unrecorded_job_ids(self) -> list[str]:
        """Jobs that ended but whose final state the database has not taken yet (a worker is retrying it)."""
        with self._health_lock:
            return sorted(self._unrecorded)

    def _note_write(self, ok: bool) -> None:
        with self._health_lock:
            self._write_failing = not ok
            self._publish_health()

    def _mark_unrecorded(self, job_id: str, waiting: bool) -> None:
        with self._health_lock:
            if waiting:
                self._unrecorded.add(job_id)
            else:
                self._unrecorded.discard(job_id)
            self._publish_health()

    def _publish_health(self) -> None:
        """Under _health_lock: report a change of `healthy` (in order, so the last report is the current state)."""
        healthy = not self._write_failing and not self._unrecorded
        if healthy == self._healthy:
            return
        self._healthy = healthy
        if healthy:
            log.info("the database takes writes again: training jobs run")
        else:
            log.warning("training jobs cannot run until the database takes writes again")
        callback = self.on_health_change
        if callback is not None:
            try:
                callback(healthy)
            except Exception:  # reporting health must never disturb a job
                log.warning("reporting the training service's health failed", exc_info=True)

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        """Recover persisted state (running jobs were interrupted, queued ones still run) and start the workers."""
        self.model_dir.mkdir(parents=True, exist_ok=True)
        n = self.store.fail_interrupted()
        if n:
            log.warning("marked %d interrupted job(s) as FAILED", n)
        for stale in self.model_dir.glob(".*.partial"):
            stale.unlink(missing_ok=True)
        with self._lock:
            self._pending = [j.job_id for j in self.store.queued_oldest_first()]
        self.executor.start()
        log.info("training jobs run on %s", self.executor.description)
        for i in range(self.workers):
            t = threading.Thread(target=self._worker_loop, name=f"training-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, grace: float = 0.0) -> None:
        """Stop taking jobs; running jobs get `grace` seconds to finish, then are killed and marked interrupted.

        A job whose interruption the database does not take stays RUNNING there; the next start marks it
        interrupted. A job whose model commits first stays SUCCEEDED.
        """
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        self._halt.set()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            runs = dict(self._runs)
            active = sorted(self._active | set(runs))
        for run in runs.values():
            run.cancel()
        for job_id in active:
            try:
                self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage="interrupted",
                                  error="interrupted: the training service stopped", finished_at=now_ms())
            except Exception as exc:
                log.warning("job %s stays RUNNING until the next start marks it interrupted: %s", job_id,
                            _cause(exc))
        for t in self._threads:
            t.join(timeout=5)
        self.executor.close()

    # -- API ---------------------------------------------------------------------------------------------
    def submit(self, request: TrainingRequest) -> Job:
        with self._lock:
            if len(self._pending) >= self.queue_size:
                raise ResourceExhausted(
                    f"the training queue is full ({self.queue_size} jobs waiting); retry later"
                )
            job = self.store.create(request)
            self._pending.append(job.job_id)
            self._wakeup.notify()
        self._note_write(True)
        return job

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued or running job. The database decides a race with the job's end: a job whose model
        committed first is SUCCEEDED, and cancelling it is FAILED_PRECONDITION."""
        job = self.store.get(job_id)
        if job is None:
            raise NotFound(f"no training job with job_id {job_id!r}", field="job_id")
        if job.state not in FINAL_STATES:
            if self.store.update(job_id, only_from=(QUEUED, RUNNING), state=CANCELLED, stage="cancelled",
                                 error="cancelled on request", finished_at=now_ms()):
                self._note_write(True)
                with self._lock:  # a worker that marked it RUNNING has registered its run before releasing this
                    if job_id in self._pending:
                        self._pending.remove(job_id)
                    run = self._runs.get(job_id)
                if run is not None:
                    run.cancel()  # returns at once; the worker loop sees the run end
                return self.store.get_existing(job_id)
            job = self.store.get_existing(job_id)
        raise FailedPrecondition(
            f"job {job_id} already finished ({job.state}); only queued or running jobs can be cancelled",
            field="job_id",
        )

    # -- workers -----------------------------------------------------------------------------------------
    def _next_job(self) -> str | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            job_id = self._pending.pop(0)
            self._active.add(job_id)
            return job_id

    def _worker_loop(self) -> None:
        """Run jobs until stop(). No error ends this loop: each job ends recorded, or stays for the next start."""
        while True:
            job_id = self._next_job()
            if job_id is None:
                return
            try:
                self._work(job_id)
            except Exception:  # an error in the error handling itself: the worker still goes on
                log.exception("job %s: unexpected error in the training worker", job_id)
            finally:
                with self._lock:
                    self._active.discard(job_id)
            self._report_finished(job_id)

    def _work(self, job_id: str) -> None:
        """Run one job; any error fails it with the cause, recorded once the database takes the write."""
        try:
            self._run(job_id)
        except Exception as exc:
            self._cleanup_partials(job_id)
            cause = _cause(exc)
            if isinstance(exc, Unavailable):
                self._note_write(False)
            if isinstance(exc, MlsignalError):
                log.error("job %s failed: %s", job_id, cause)
            else:
                log.exception("job %s failed in the scheduler: %s", job_id, cause)
            self._record_final(job_id, (QUEUED, RUNNING), logged=cause, state=FAILED, stage="failed", error=cause,
                               finished_at=now_ms())

    def _record_final(self, job_id: str, only_from: tuple[str, ...], logged: str = "", **values) -> bool | None:
        """Write a job's final state, retrying with backoff while the database refuses it. Returns whether the job
        changed, or None when the scheduler stopped first: the job then stays as the database has it (the next start
        marks a RUNNING job interrupted). `logged` is a cause already logged for this job, not repeated."""
        delay = RETRY_FIRST_DELAY
        failing = False
        while True:
            try:
                changed = self.store.update(job_id, only_from=only_from, **values)
            except Exception as exc:
                if self._halt.is_set():  # stopping: stop() records the job, or says why it cannot
                    if failing:
                        self._mark_unrecorded(job_id, False)
                    return None
                if not failing:
                    failing = True
                    self._note_write(False)
                    self._mark_unrecorded(job_id, True)
                    cause = _cause(exc)
                    if cause == logged:
                        log.warning("job %s is recorded %s once the database takes writes again", job_id,
                                    values.get("state"))
                    else:
                        log.error("job %s: cannot record it %s: %s; retrying until the database takes writes again",
                                  job_id, values.get("state"), cause)
                if self._halt.wait(delay):
                    self._mark_unrecorded(job_id, False)
                    log.info("job %s: no more retries of recording its end: the training service is stopping",
                             job_id)
                    return None
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            self._note_write(True)
            if failing:
                self._mark_unrecorded(job_id, False)
                log.info("job %s recorded %s", job_id, values.get("state"))
            return changed

    def _report_finished(self, job_id: str) -> None:
        if self.on_job_finished is None:
            return
        try:
            job = self.store.get(job_id)
            if job is not None and job.state in FINAL_STATES:
                self.on_job_finished(job)
        except Exception:  # metrics must never disturb a job
            log.debug("job %s: reporting metrics failed", job_id, exc_info=True)

    def _run(self, job_id: str) -> None:
        job = self.store.get(job_id)
        if job is None or job.state != QUEUED:
            return
        with self._lock:
            if self._stopping:
                return
            # conditional: a cancel that committed first leaves the job CANCELLED and it never starts
            if not self.store.update(job_id, only_from=(QUEUED,), state=RUNNING, stage="starting",
                                     progress=0.0, started_at=now_ms()):
                return
            run = self.executor.submit(job_id, job.request.to_json())
            self._runs[job_id] = run
        self._note_write(True)
        try:
            outcome = run.wait(self._progress_writer(job_id))
        finally:
            with self._lock:
                self._runs.pop(job_id, None)

        if outcome.kind == RESULT and outcome.result is not None:
            try:
                self._register(job, outcome.result)
            except _NotRunning:
                self._note_write(True)  # the database answered: the job had already left RUNNING
                log.info("job %s was cancelled or interrupted before its model was committed; the model was "
                         "discarded", job_id)
            return
        if outcome.kind == RUN_CANCELLED and not self._stopping:
            return  # cancelled on request: cancel() recorded it
        if outcome.kind == RUN_CANCELLED or (outcome.kind == DIED and self._stopping):
            error, stage = "interrupted: the training service stopped", "interrupted"
        elif outcome.kind in (ERROR, DIED):
            error, stage = outcome.message, "failed"
        else:
            error, stage = f"unexpected outcome {outcome.kind!r}: {outcome.message}", "failed"
        self._record_final(job_id, (RUNNING,), state=FAILED, stage=stage, error=error, finished_at=now_ms())

    def _progress_writer(self, job_id: str) -> Callable[[str, float], None]:
        """on_progress for a run: writes at most every PROGRESS_WRITE_INTERVAL per stage. A write that fails is
        skipped (and so are the next ones for PROGRESS_RETRY_INTERVAL); it is logged once until writes work again."""
        written_at, written_stage = 0.0, ""
        failing, retry_at = False, 0.0

        def on_progress(stage: str, frac: float) -> None:
            nonlocal written_at, written_stage, failing, retry_at
            t = time.monotonic()
            if t < retry_at or (stage == written_stage and t - written_at < PROGRESS_WRITE_INTERVAL):
                return
            try:
                self.store.update(job_id, only_from=(RUNNING,), stage=stage, progress=float(frac))
            except Exception as exc:  # progress is best effort: never let it end the run
                retry_at = t + PROGRESS_RETRY_INTERVAL
                self._note_write(False)
                if not failing:
                    failing = True
                    log.warning("job %s: progress is not recorded while the database refuses writes: %s", job_id,
                                _cause(exc))
                return
            written_at, written_stage = t, stage
            self._note_write(True)
            if failing:
                failing = False
                log.info("job %s: progress is recorded again", job_id)

        return on_progress

    def _register(self, job: Job, result: dict) -> None:
        """Write the artifact bytes to partial files, rename them into place, and record the job's success and the
        model row in one transaction, only if the job is still RUNNING (else `_NotRunning`). On any failure nothing
        of the job stays behind: the transaction rolls back and the files are removed.

        The same transaction gives the model its stage: the promotion gate for a production model (past it: SERVING,
        which retires the model serving before it, or with MLSIGNAL_PROMOTION=shadow SHADOW where a model serves;
        else REJECTED; CANDIDATE with MLSIGNAL_PROMOTION=manual), RESEARCH for a
        research model, and then retires research models beyond the newest `research_keep` of the market, whose
        files are deleted once the transaction has committed."""
        req = job.request
        stage, stage_reason = registration_stage(req.purpose, result["metrics"], self.promotion,
                                                 self.promotion_tolerance)
        model_id = new_model_id(req.symbol, req.timeframe)
        onnx_tmp, skl_tmp = partial_paths(self.model_dir, job.job_id)
        onnx_name, skl_name = f"{model_id}.onnx", f"{model_id}.joblib"
        onnx_bytes, skl_bytes = result["onnx_bytes"], result["sklearn_bytes"]
        sha, skl_sha = sha256_bytes(onnx_bytes), sha256_bytes(skl_bytes)
        if (result.get("sha256"), result.get("sklearn_sha256")) not in ((sha, skl_sha), (None, None)):
            raise RuntimeError("the model artifacts were corrupted on their way from the worker (sha256 mismatch)")
        record = ModelRecord(
            model_id=model_id,
            symbol=req.symbol,
            timeframe=req.timeframe,
            created_at_ms=now_ms(),
            train_start_ms=result["train_start_ms"],
            train_end_ms=result["train_end_ms"],
            label=req.label,
            feature_spec=FeatureSpec.from_dict(result["spec"]),
            params=req.params,
            classes=CLASSES,
            prior=tuple(result["prior"]),
            shrink_weight=result["shrink_weight"],
            metrics=result["metrics"],
            artifact=onnx_name,
            sha256=sha,
            sklearn_artifact=skl_name,
            sklearn_sha256=skl_sha,
            job_id=job.job_id,
            versions=result["versions"],
            stage=stage,
            stage_reason=stage_reason,
            ood=OodModel.from_dict(result["ood"]) if result.get("ood") is not None else None,
            drift=DriftModel.from_dict(result["drift"]) if result.get("drift") is not None else None,
        )
        retired_files: list[str] = []
        try:
            _write(onnx_tmp, onnx_bytes)
            _write(skl_tmp, skl_bytes)
            os.replace(onnx_tmp, self.model_dir / onnx_name)
            os.replace(skl_tmp, self.model_dir / skl_name)
            _fsync_dir(self.model_dir)
            if self.before_register is not None:
                self.before_register(job.job_id)
            with self.store.engine.begin() as conn:
                if not self.store.update(job.job_id, only_from=(RUNNING,), conn=conn, state=SUCCEEDED, stage="done",
                                         progress=1.0, model_id=model_id, metrics=result["metrics"],
                                         finished_at=now_ms()):
                    raise _NotRunning(job.job_id)  # rolls the transaction back
                record = insert_model(conn, record, shadow=self.promotion == "shadow")
                if req.purpose == RESEARCH_PURPOSE:
                    retired_files = retire_old_research(conn, req.symbol, req.timeframe, self.research_keep,
                                                         record.created_at_ms - self.research_grace_ms)
                if self.before_register_commit is not None:
                    self.before_register_commit(job.job_id)
        except BaseException:
            self._cleanup_partials(job.job_id)
            (self.model_dir / onnx_name).unlink(missing_ok=True)
            (self.model_dir / skl_name).unlink(missing_ok=True)
            raise
        self.store._notify()
        self._note_write(True)
        log.info("job %s registered model %s as %s (%s)", job.job_id, model_id, record.stage, record.stage_reason)
        for name in retired_files:  # research retention: the rows are RETIRED, their files go
            try:
                (self.model_dir / name).unlink(missing_ok=True)
            except OSError as exc:
                log.warning("research retention: cannot delete %s: %s", name, one_line(exc))

    def _cleanup_partials(self, job_id: str) -> None:
        for p in partial_paths(self.model_dir, job_id):
            p.unlink(missing_ok=True)


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
