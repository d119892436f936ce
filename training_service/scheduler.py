"""Runs queued training jobs through an executor, so the gRPC threads stay free and cancel is real.

`MLSIGNAL_TRAINING_WORKERS` jobs run at once; further jobs wait in a bounded queue. Where a job runs is the
executor's business (training_service/executors.py): a local spawned process by default, or one task on a Dask
cluster with MLSIGNAL_DASK_SCHEDULER. The scheduler keeps the queue, the jobs table and the state transitions, and
registers every model itself: the executor hands back the artifact bytes, which are written to partial files, renamed
into place and recorded with their sha256 in one transaction. Cancelling a running job stops it through the executor;
nothing of it is written.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from shared.artifacts import sha256_bytes
from shared.errors import FailedPrecondition, NotFound, ResourceExhausted
from shared.features import FeatureSpec
from shared.labels import CLASSES
from shared.store.registry import ModelRecord, insert_model
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


def partial_paths(model_dir: Path, job_id: str) -> tuple[Path, Path]:
    return model_dir / f".{job_id}.onnx.partial", model_dir / f".{job_id}.joblib.partial"


def new_model_id(symbol: str, timeframe: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', symbol)}_{timeframe}_{stamp}_{uuid.uuid4().hex[:8]}"


class Scheduler:
    def __init__(self, store: JobStore, database_url: str, model_dir: Path, workers: int = 1,
                 queue_size: int = 16, fit_jobs: int = -1, executor: Executor | None = None):
        self.store = store
        self.database_url = database_url
        self.model_dir = Path(model_dir)
        self.workers = workers
        self.queue_size = queue_size
        self.fit_jobs = fit_jobs
        self.executor = executor if executor is not None else LocalProcessExecutor(database_url, fit_jobs)
        self._lock = threading.Lock()
        self._pending: list[str] = []  # queued job ids, oldest first
        self._cancel: set[str] = set()
        self._runs: dict[str, Run] = {}  # running job id -> its run in the executor
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        # metrics hook: on_job_finished(job) once a worker is done with a job
        self.on_job_finished: Callable[[Job], None] | None = None

    @property
    def _procs(self) -> dict[str, Run]:
        """The running jobs (job id -> Run); empty once every job's process or task is gone."""
        return self._runs

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
        """Stop taking jobs; running jobs get `grace` seconds to finish, then are killed and marked interrupted."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
        deadline = time.monotonic() + grace
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        with self._lock:
            runs = dict(self._runs)
        for job_id, run in runs.items():
            run.cancel()
            self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage="interrupted",
                              error="interrupted: the training service stopped", finished_at=now_ms())
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
        return job

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self.store.get(job_id)
            if job is None:
                raise NotFound(f"no training job with job_id {job_id!r}", field="job_id")
            if job.state in FINAL_STATES:
                raise FailedPrecondition(
                    f"job {job_id} already finished ({job.state}); only queued or running jobs can be cancelled",
                    field="job_id",
                )
            self._cancel.add(job_id)
            if job_id in self._pending:
                self._pending.remove(job_id)
            run = self._runs.get(job_id)
            self.store.update(job_id, only_from=(QUEUED, RUNNING), state=CANCELLED, stage="cancelled",
                              error="cancelled on request", finished_at=now_ms())
        if run is not None:
            run.cancel()  # returns at once; the worker loop sees the run end
        return self.store.get_existing(job_id)

    # -- workers -----------------------------------------------------------------------------------------
    def _next_job(self) -> str | None:
        with self._lock:
            while not self._pending and not self._stopping:
                self._wakeup.wait()
            if self._stopping:
                return None
            return self._pending.pop(0)

    def _worker_loop(self) -> None:
        while True:
            job_id = self._next_job()
            if job_id is None:
                return
            try:
                self._run(job_id)
            except Exception as exc:  # never lose a job silently: record why it failed
                log.exception("job %s failed in the scheduler", job_id)
                self._cleanup_partials(job_id)
                self.store.update(job_id, only_from=(QUEUED, RUNNING), state=FAILED, stage="failed",
                                  error=f"{type(exc).__name__}: {exc}", finished_at=now_ms())
            self._report_finished(job_id)

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
            if job_id in self._cancel or self._stopping:
                self._cancel.discard(job_id)
                return
            if not self.store.update(job_id, only_from=(QUEUED,), state=RUNNING, stage="starting",
                                     progress=0.0, started_at=now_ms()):
                return
            run = self.executor.submit(job_id, job.request.to_json())
            self._runs[job_id] = run
        written_at, written_stage = 0.0, ""

        def on_progress(stage: str, frac: float) -> None:
            nonlocal written_at, written_stage
            t = time.monotonic()
            if stage != written_stage or t - written_at >= PROGRESS_WRITE_INTERVAL:
                self.store.update(job_id, only_from=(RUNNING,), stage=stage, progress=float(frac))
                written_at, written_stage = t, stage

        try:
            outcome = run.wait(on_progress)
        finally:
            with self._lock:
                self._runs.pop(job_id, None)

        with self._lock:
            cancelled = job_id in self._cancel
            self._cancel.discard(job_id)
            if cancelled:
                return
            if outcome.kind == RESULT and outcome.result is not None:
                self._register(job, outcome.result)
                return
            if outcome.kind == RUN_CANCELLED or (outcome.kind == DIED and self._stopping):
                error, stage = "interrupted: the training service stopped", "interrupted"
            elif outcome.kind in (ERROR, DIED):
                error, stage = outcome.message, "failed"
            else:
                error, stage = f"unexpected outcome {outcome.kind!r}: {outcome.message}", "failed"
            self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage=stage, error=error,
                              finished_at=now_ms())

    def _register(self, job: Job, result: dict) -> None:
        """Write the artifact bytes to partial files, rename them into place, and insert the model row and the job's
        success in one transaction. On any failure nothing of the job stays behind."""
        req = job.request
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
        )
        try:
            _write(onnx_tmp, onnx_bytes)
            _write(skl_tmp, skl_bytes)
            os.replace(onnx_tmp, self.model_dir / onnx_name)
            os.replace(skl_tmp, self.model_dir / skl_name)
            _fsync_dir(self.model_dir)
            with self.store.engine.begin() as conn:
                insert_model(conn, record)
                self.store.update(job.job_id, only_from=(RUNNING,), conn=conn, state=SUCCEEDED, stage="done",
                                  progress=1.0, model_id=model_id, metrics=result["metrics"],
                                  finished_at=now_ms())
        except BaseException:
            self._cleanup_partials(job.job_id)
            (self.model_dir / onnx_name).unlink(missing_ok=True)
            (self.model_dir / skl_name).unlink(missing_ok=True)
            raise
        self.store._notify()
        log.info("job %s registered model %s", job.job_id, model_id)

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
