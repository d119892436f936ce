"""Runs queued training jobs, each in its own worker process, so the gRPC threads stay free and cancel is real.

`MLSIGNAL_TRAINING_WORKERS` jobs run at once; further jobs wait in a bounded queue. Cancelling a running job
kills its process (it stops within milliseconds, whatever scikit-learn is doing) and removes its partial files.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue as queue_mod
import re
import threading
import time
import uuid
from pathlib import Path

from shared.errors import FailedPrecondition, NotFound, ResourceExhausted
from shared.features import FeatureSpec
from shared.labels import CLASSES
from shared.registry import ModelRecord, insert_model
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
from training_service.worker import partial_paths, run_job

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL = 0.2  # seconds between progress writes of the same stage


def new_model_id(symbol: str, timeframe: str) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{re.sub(r'[^A-Za-z0-9]+', '-', symbol)}_{timeframe}_{stamp}_{uuid.uuid4().hex[:8]}"


class Scheduler:
    def __init__(self, store: JobStore, database_url: str, model_dir: Path, workers: int = 1,
                 queue_size: int = 16, fit_jobs: int = -1):
        self.store = store
        self.database_url = database_url
        self.model_dir = Path(model_dir)
        self.workers = workers
        self.queue_size = queue_size
        self.fit_jobs = fit_jobs
        self._lock = threading.Lock()
        self._pending: list[str] = []  # queued job ids, oldest first
        self._cancel: set[str] = set()
        self._procs: dict[str, mp.Process] = {}
        self._wakeup = threading.Condition(self._lock)
        self._stopping = False
        self._threads: list[threading.Thread] = []
        self._ctx = mp.get_context("spawn")
        self.on_job_finished = None  # metrics hook: on_job_finished(job) once a worker is done with a job

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
            procs = dict(self._procs)
        for job_id, proc in procs.items():
            proc.kill()
            proc.join(5)
            self._cleanup_partials(job_id)
            self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage="interrupted",
                              error="interrupted: the training service stopped", finished_at=now_ms())
        for t in self._threads:
            t.join(timeout=5)

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
            proc = self._procs.get(job_id)
            self.store.update(job_id, only_from=(QUEUED, RUNNING), state=CANCELLED, stage="cancelled",
                              error="cancelled on request", finished_at=now_ms())
        if proc is not None:
            proc.kill()  # the worker loop sees the dead process and cleans up
        return self.store.get(job_id)

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
        q = self._ctx.Queue()
        proc = self._ctx.Process(
            target=run_job,
            args=(job_id, job.request.to_json(), self.database_url, str(self.model_dir), self.fit_jobs, q, os.getpid()),
            name=f"mlsignal-train-{job_id[:8]}",
            daemon=True,
        )
        with self._lock:
            if job_id in self._cancel or self._stopping:
                self._cancel.discard(job_id)
                return
            if not self.store.update(job_id, only_from=(QUEUED,), state=RUNNING, stage="starting",
                                     progress=0.0, started_at=now_ms()):
                return
            proc.start()
            self._procs[job_id] = proc
        log.info("job %s started in pid %s", job_id, proc.pid)
        outcome = None
        last_write = 0.0
        last_stage = ""
        try:
            while outcome is None:
                try:
                    msg = q.get(timeout=0.1)
                except queue_mod.Empty:
                    if not proc.is_alive():
                        # Drain what the process sent just before it exited.
                        try:
                            msg = q.get(timeout=0.5)
                        except queue_mod.Empty:
                            outcome = ("died", proc.exitcode)
                            break
                    else:
                        continue
                kind = msg[0]
                if kind == "progress":
                    _, stage, frac = msg
                    t = time.monotonic()
                    if stage != last_stage or t - last_write >= PROGRESS_WRITE_INTERVAL:
                        self.store.update(job_id, only_from=(RUNNING,), stage=stage, progress=float(frac))
                        last_write, last_stage = t, stage
                else:
                    outcome = msg
        finally:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            with self._lock:
                self._procs.pop(job_id, None)
            q.close()

        with self._lock:
            cancelled = job_id in self._cancel
            self._cancel.discard(job_id)
            if cancelled or outcome[0] != "result":
                self._cleanup_partials(job_id)
            if cancelled:
                return
            if outcome[0] == "error":
                self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage="failed",
                                  error=outcome[1], finished_at=now_ms())
                return
            if outcome[0] == "died":
                self.store.update(job_id, only_from=(RUNNING,), state=FAILED, stage="failed",
                                  error=f"the worker process exited with code {outcome[1]}", finished_at=now_ms())
                return
            self._register(job, outcome[1])

    def _register(self, job: Job, result: dict) -> None:
        """Move the partial files into place and insert the model row and the job's success in one transaction."""
        req = job.request
        model_id = new_model_id(req.symbol, req.timeframe)
        onnx_tmp, skl_tmp = partial_paths(self.model_dir, job.job_id)
        onnx_name, skl_name = f"{model_id}.onnx", f"{model_id}.joblib"
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
            sha256=result["sha256"],
            sklearn_artifact=skl_name,
            sklearn_sha256=result["sklearn_sha256"],
            job_id=job.job_id,
            versions=result["versions"],
        )
        os.replace(onnx_tmp, self.model_dir / onnx_name)
        os.replace(skl_tmp, self.model_dir / skl_name)
        _fsync_dir(self.model_dir)
        try:
            with self.store.engine.begin() as conn:
                insert_model(conn, record)
                self.store.update(job.job_id, only_from=(RUNNING,), conn=conn, state=SUCCEEDED, stage="done",
                                  progress=1.0, model_id=model_id, metrics=result["metrics"],
                                  finished_at=now_ms())
        except BaseException:
            (self.model_dir / onnx_name).unlink(missing_ok=True)
            (self.model_dir / skl_name).unlink(missing_ok=True)
            raise
        self.store._notify()
        log.info("job %s registered model %s", job.job_id, model_id)

    def _cleanup_partials(self, job_id: str) -> None:
        for p in partial_paths(self.model_dir, job_id):
            p.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
