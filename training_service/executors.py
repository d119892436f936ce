"""Where a training job's pipeline runs: a pool of warm local worker processes (the default) or one task on a Dask
cluster.

The scheduler owns everything durable: the queue, the jobs table, state transitions, and registration (atomic
rename of the artifact files plus one database transaction with their sha256). An executor only runs the pipeline:

    run = executor.submit(job_id, request_json)     # quick; called under the scheduler's lock
    outcome = run.wait(on_progress)                 # blocks the scheduler's worker thread until the job ends
    run.cancel()                                    # from any thread; wait() then returns a "cancelled" outcome

Both executors hand back the artifacts as bytes in the outcome, and the service writes them. Neither a worker
process nor a Dask worker writes into MLSIGNAL_MODEL_DIR, so

- Dask workers need no shared writable volume: only the mlsignal package and read access to the database;
- a worker that dies mid-job cannot leave a half-written file, and cancelling needs no clean-up of partial files;
- registration happens in one place, the service, whatever ran the job.

Every wait is bounded: a local worker's pipe is polled every 0.1 s (a worker that dies closes it); a Dask job is
polled every 0.1 s with a timeout on each call to the Dask scheduler, the worker running it is watched, and a cluster
without workers or a lost scheduler connection fails the job after a bounded time instead of leaving it RUNNING
forever.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from shared.errors import one_line
from shared.settings import Settings, check_dask_address, check_dask_security, read_pem
from training_service.worker import (
    cancel_event_name,
    progress_queue_name,
    run_job_on_dask,
    serve_jobs,
    task_key,
)

log = logging.getLogger(__name__)

ProgressFn = Callable[[str, float], None]

RESULT, ERROR, DIED, CANCELLED = "result", "error", "died", "cancelled"


@dataclass(frozen=True)
class Outcome:
    """How a job's run ended: RESULT (with `result`), ERROR or DIED (with `message`), or CANCELLED."""

    kind: str
    result: dict | None = None
    message: str = ""


class Run(ABC):
    """One job handed to an executor."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @abstractmethod
    def wait(self, on_progress: ProgressFn) -> Outcome:
        """Block until the job ends, calling on_progress(stage, fraction) as it reports; never waits unboundedly
        once the job's worker is gone."""

    def cancel(self) -> None:
        """Stop the job as soon as possible; returns at once. wait() then returns a CANCELLED outcome."""
        self._cancelled.set()


class Executor(ABC):
    """Runs jobs; see the module docstring."""

    description = ""

    def start(self) -> None:  # noqa: B027 -- an optional hook, not an abstract method
        """Called once when the scheduler starts."""

    @abstractmethod
    def submit(self, job_id: str, request_json: str) -> Run:
        """Start running a job (quickly: this is called under the scheduler's lock)."""

    def close(self) -> None:  # noqa: B027 -- an optional hook, not an abstract method
        """Called once when the scheduler has stopped; runs were cancelled before."""


# ----------------------------------------------------------------------------------------------------------------------
# local processes


WORKER_POLL_INTERVAL = 0.1  # seconds between two looks at a running job's pipe


class _Worker:
    """One long-lived worker process and the service's end of its pipe."""

    def __init__(self, ctx, database_url: str, fit_jobs: int, number: int):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=serve_jobs, args=(child, database_url, fit_jobs, os.getpid()),
                                name=f"mlsignal-train-worker-{number}", daemon=True)
        self.proc.start()
        child.close()  # only the worker holds its end: when the worker dies, reading this end ends at once
        self.jobs = 0  # jobs handed to this worker so far

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        """Kill the process (whatever it is doing) and release its pipe; returns once it is gone."""
        try:
            self.proc.kill()
        except Exception:  # already reaped
            pass
        self.proc.join(timeout=10)
        self.conn.close()


class LocalProcessExecutor(Executor):
    """A pool of `workers` long-lived spawned processes on this machine (the default), each running one job at a
    time.

    A worker imports numpy, pandas, scikit-learn, skl2onnx and the database layer once, when it starts (the pool is
    started with the scheduler), so a job pays only for its own work: a fresh process would add seconds to every job.
    Cancelling a job kills its worker: the job stops within milliseconds, whatever scikit-learn is doing, and a new
    worker is started in the background in its place; so is one for a worker that died. Every worker exits by itself
    when its service dies (it watches its parent, and its pipe closes).
    """

    def __init__(self, database_url: str, fit_jobs: int = -1, workers: int = 1):
        self.database_url = database_url
        self.fit_jobs = fit_jobs
        self.size = max(1, workers)
        self._ctx = mp.get_context("spawn")
        self.description = f"{self.size} local worker process{'es' if self.size != 1 else ''}"
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []  # warm (or warming) workers without a job, oldest first
        self._busy: set[_Worker] = set()
        self._closed = False
        self._spawned = 0

    # -- the pool -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the pool's workers; they warm up in the background."""
        with self._lock:
            self._top_up()

    def _spawn(self) -> _Worker:
        self._spawned += 1
        worker = _Worker(self._ctx, self.database_url, self.fit_jobs, self._spawned)
        log.debug("training worker process %s started", worker.pid)
        return worker

    def _top_up(self) -> None:
        """Under the lock: start workers until the pool has its size again."""
        while not self._closed and len(self._idle) + len(self._busy) < self.size:
            self._idle.append(self._spawn())

    def _top_up_in_background(self) -> None:
        def top_up() -> None:
            try:
                with self._lock:
                    self._top_up()
            except Exception as exc:  # the next submit starts a worker itself
                log.warning("cannot start a training worker process: %s", one_line(exc, with_type=True))

        threading.Thread(target=top_up, name="training-pool-top-up", daemon=True).start()

    def worker_pids(self) -> list[int]:
        """Pids of the pool's worker processes now (idle and busy)."""
        with self._lock:
            return sorted(w.pid for w in [*self._idle, *self._busy] if w.pid is not None)

    def submit(self, job_id: str, request_json: str) -> LocalRun:
        """Hand the job to an idle worker (the one idle longest, so every worker warms up), or to a new one when
        none is idle."""
        while True:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the local training workers are closed")
                worker = None
                while self._idle:
                    candidate = self._idle.pop(0)
                    if candidate.alive():
                        worker = candidate
                        break
                    log.warning("training worker process %s died while idle (exit code %s); replaced",
                                candidate.pid, candidate.proc.exitcode)
                    candidate.kill()
                if worker is None:
                    worker = self._spawn()
                self._busy.add(worker)
                worker.jobs += 1
            try:
                worker.conn.send((job_id, request_json))
            except OSError:  # it died after the check: try the next one
                self._release(worker, reusable=False)
                continue
            log.info("job %s runs in training worker process %s (its job %d)", job_id, worker.pid, worker.jobs)
            return LocalRun(self, worker, job_id)

    def _release(self, worker: _Worker, reusable: bool) -> None:
        """A run is done with its worker: back to the idle workers, or killed and replaced in the background."""
        with self._lock:
            self._busy.discard(worker)
            if reusable and not self._closed and worker.alive():
                self._idle.append(worker)
                return
        worker.kill()
        if not self._closed:
            self._top_up_in_background()

    def close(self) -> None:
        """Kill every worker at once: an idle one holds nothing worth waiting for (it may still be importing), and a
        busy one's run was cancelled before."""
        with self._lock:
            self._closed = True
            workers = [*self._idle, *self._busy]
            self._idle = []
        for worker in workers:
            worker.kill()


class LocalRun(Run):
    """One job on one worker of a LocalProcessExecutor."""

    def __init__(self, executor: LocalProcessExecutor, worker: _Worker, job_id: str):
        super().__init__(job_id)
        self.executor = executor
        self.worker = worker
        self._owns_worker = True  # until wait() gives the worker back; cancel() kills it only before that
        self._owner_lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        """The pid of the worker process running this job."""
        return self.worker.pid

    def cancel(self) -> None:
        super().cancel()
        with self._owner_lock:
            if self._owns_worker:
                self.worker.proc.kill()  # wait() sees the pipe close at once

    def wait(self, on_progress: ProgressFn) -> Outcome:
        worker = self.worker
        outcome: Outcome | None = None
        try:
            while outcome is None:
                try:
                    if not worker.conn.poll(WORKER_POLL_INTERVAL):
                        if not worker.alive():  # it died without closing the pipe (it always does, but be sure)
                            outcome = self._died()
                        continue
                    msg = worker.conn.recv()
                except (EOFError, OSError):  # the worker died (or was killed by cancel)
                    outcome = self._died()
                    continue
                kind = msg[0]
                if kind == "progress":
                    on_progress(msg[1], float(msg[2]))
                elif kind == "result":
                    outcome = Outcome(RESULT, result=msg[1])
                elif kind == "error":
                    outcome = Outcome(ERROR, message=msg[1])
                elif kind == "ready":
                    log.debug("training worker process %s warmed up in %.2f s", msg[1], msg[2])
        finally:
            with self._owner_lock:
                self._owns_worker = False
                reusable = outcome is not None and outcome.kind in (RESULT, ERROR) and not self.cancelled
            self.executor._release(worker, reusable)
        return Outcome(CANCELLED) if self.cancelled else outcome

    def _died(self) -> Outcome:
        self.worker.proc.join(timeout=1)
        return Outcome(DIED, message=f"the worker process exited with code {self.worker.proc.exitcode}")


# ----------------------------------------------------------------------------------------------------------------------
# Dask


POLL_INTERVAL = 0.1  # seconds between two looks at a Dask job's progress queue and future
WORKER_CHECK_INTERVAL = 0.5  # seconds between two checks that the worker running a job is still there
RPC_TIMEOUT = 5.0  # seconds any one call to the Dask scheduler may take
CONNECT_TIMEOUT = 10.0  # seconds to connect to the Dask scheduler
NO_WORKER_TIMEOUT = 60.0  # a job fails when no worker at all is connected for this long before it starts
SCHEDULER_LOST_TIMEOUT = 30.0  # a job fails when the Dask scheduler cannot be reached for this long
STOP_WAIT = 3.0  # seconds a stopped job's task gets to confirm it left (then its cancel event is removed)
FINISH_GRACE = 2.0  # seconds a task that left its worker gets for its result to arrive before it counts as lost


def shareable_database_url(database_url: str) -> str | None:
    """The URL a Dask task may carry: None when it holds a password (workers then use their own setting); a
    relative SQLite path is made absolute, since a worker's working directory may differ."""
    url = sa.engine.make_url(database_url)
    if url.password:
        return None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not os.path.isabs(url.database):
        url = url.set(database=os.path.abspath(url.database))
    return url.render_as_string(hide_password=False)


def dask_security(tls_files: tuple[Path, Path, Path] | None) -> Any:
    """`distributed.Security` for mutual TLS with the cluster from (CA, certificate, key) PEM files, or None (plain
    tcp://). The service presents its certificate and accepts only a scheduler whose certificate the CA signed;
    encryption is required on every connection. ValueError names an unreadable file."""
    if tls_files is None:
        return None
    from distributed import Security

    ca, cert, key = tls_files
    for name, path in zip(("MLSIGNAL_DASK_TLS_CA", "MLSIGNAL_DASK_TLS_CERT", "MLSIGNAL_DASK_TLS_KEY"), tls_files,
                          strict=True):
        read_pem(name, path)  # readable PEM files, named in the error otherwise
    return Security(tls_ca_file=str(ca), tls_client_cert=str(cert), tls_client_key=str(key),
                    require_encryption=True)


def _dask_settings_from_env() -> tuple[tuple[Path, Path, Path] | None, bool]:
    """The Dask TLS files and MLSIGNAL_DASK_ALLOW_PLAINTEXT from the environment (for callers that pass neither)."""
    settings = Settings(dask_tls_ca=_env_path("MLSIGNAL_DASK_TLS_CA"),
                        dask_tls_cert=_env_path("MLSIGNAL_DASK_TLS_CERT"),
                        dask_tls_key=_env_path("MLSIGNAL_DASK_TLS_KEY"))
    allow = os.environ.get("MLSIGNAL_DASK_ALLOW_PLAINTEXT", "").strip().lower() in ("1", "true", "yes", "on")
    return settings.dask_tls_files(), allow


def _env_path(name: str) -> Path | None:
    raw = os.environ.get(name)
    return Path(raw) if raw else None


class DaskExecutor(Executor):
    """Each job's whole pipeline as one task on a Dask distributed cluster.

    Security: `tls_files` (CA, certificate, key) make every connection to the cluster mutual TLS (a ``tls://``
    address); a ``tcp://`` address off this machine is refused here, before anything connects, unless
    `allow_plaintext`. When neither is given they come from MLSIGNAL_DASK_TLS_CA/_CERT/_KEY and
    MLSIGNAL_DASK_ALLOW_PLAINTEXT. The cluster's workers are trusted: the service deserialises their results.

    Progress comes back over ``distributed.Queue("mlsignal-progress-<job_id>")``; cancelling sets
    ``distributed.Event("mlsignal-cancel-<job_id>")``, which the task checks between chunks of trees (about every
    half second), and cancels the future. A worker that dies while running a job fails the job ("the Dask worker
    running this job died: ..."): the job is not retried on another worker, because the commonest cause of a
    dying training worker is running out of memory, and a retry would take down the next worker the same way.
    """

    def __init__(self, address: str, database_url: str, fit_jobs: int = -1, spread_fit: bool = False, *,
                 tls_files: tuple[Path, Path, Path] | None = None, allow_plaintext: bool | None = None):
        if tls_files is None and allow_plaintext is None:
            tls_files, allow_plaintext = _dask_settings_from_env()
        check_dask_address(address)
        check_dask_security(address, tls_files is not None, bool(allow_plaintext))
        self.security = dask_security(tls_files)
        self.address = address
        self.database_url = shareable_database_url(database_url)
        self.fit_jobs = fit_jobs
        self.spread_fit = spread_fit
        self.description = f"the Dask cluster at {address}{' (mutual TLS)' if self.security else ''}"
        self._client = None
        self._client_lock = threading.Lock()

    def start(self) -> None:
        try:
            self.client()
        except Exception as exc:  # jobs connect again and fail with the reason when the cluster is still away
            log.warning("cannot reach the Dask scheduler at %s yet: %s", self.address,
                        one_line(exc, with_type=True))

    def client(self):
        """The connected distributed.Client, (re)connecting when needed; raises when the scheduler is unreachable."""
        from distributed import Client

        with self._client_lock:
            if self._client is not None and self._client.status not in ("running", "connecting"):
                _close_quietly(self._client)
                self._client = None
            if self._client is None:
                self._client = Client(self.address, timeout=CONNECT_TIMEOUT, set_as_default=False,
                                      name="mlsignal-training", security=self.security)
                log.info("connected to the Dask scheduler at %s", self.address)
            return self._client

    def submit(self, job_id: str, request_json: str) -> DaskRun:
        return DaskRun(self, job_id, request_json)

    def close(self) -> None:
        with self._client_lock:
            if self._client is not None:
                _close_quietly(self._client)
                self._client = None


class _Lost(Exception):
    """The job's task can no longer finish; the message says why."""


class DaskRun(Run):
    def __init__(self, executor: DaskExecutor, job_id: str, request_json: str):
        super().__init__(job_id)
        self.executor = executor
        self.request_json = request_json
        self.key = task_key(job_id)
        self.worker: str | None = None  # address of the worker that runs the task, once it said so
        self.pid: int | None = None
        self._started = 0  # "started" messages seen (a task restarted by Dask sends another)
        self._exited = 0
        self._dead = 0  # attempts known to have died without an "exit"
        self._queue: Any = None  # the job's distributed.Queue (an untyped library), once submitted

    # -- scheduler calls, each bounded ----------------------------------------------------------------------
    def _rpc(self, client, op: str, **kwargs):
        return client.sync(getattr(client.scheduler, op), callback_timeout=RPC_TIMEOUT, **kwargs)

    def _drain(self, client, on_progress: ProgressFn | None, watch: bool = True) -> None:
        """Read the job's messages. With `watch`, a second "started" raises _Lost: Dask only starts a running task
        again after the worker running it died."""
        for msg in self._queue.get(batch=True, callback_timeout=RPC_TIMEOUT):
            if not msg:
                continue
            if msg[0] == "progress" and on_progress is not None:
                on_progress(str(msg[1]), float(msg[2]))
            elif msg[0] == "started":
                self._started += 1
                previous = (self.worker, self.pid)
                self.worker, self.pid = str(msg[1]), int(msg[2])
                if self._started > 1 and watch:
                    self._dead += 1
                    raise _Lost(self._died_message(*previous, f"Dask restarted the task on {self.worker}"))
                log.info("job %s runs on Dask worker %s (pid %s)", self.job_id, self.worker, self.pid)
            elif msg[0] == "exit":
                self._exited += 1

    def _died_message(self, worker: str | None, pid: int | None, what: str) -> str:
        return (f"the Dask worker running this job died: {worker} (pid {pid}) was lost while the job was running "
                f"({what}); the job is not retried. A worker that runs out of memory dies this way: check the "
                "workers' memory limit against the job's size")

    # -- the run --------------------------------------------------------------------------------------------
    def wait(self, on_progress: ProgressFn) -> Outcome:
        ex = self.executor
        try:
            client = ex.client()
        except Exception as exc:
            return Outcome(ERROR, message=f"cannot reach the Dask scheduler at {ex.address}: "
                                          f"{one_line(exc, with_type=True)}")
        if self.cancelled:
            return Outcome(CANCELLED)
        from distributed import Queue

        try:
            # created before the task, so that no message is lost; the task opens the same queue by name
            self._queue = Queue(progress_queue_name(self.job_id), client=client)
            future = client.submit(run_job_on_dask, self.job_id, self.request_json, ex.database_url, ex.fit_jobs,
                                   ex.spread_fit, key=self.key, pure=False, retries=0)
        except Exception as exc:
            return Outcome(ERROR, message=f"cannot submit the job to the Dask scheduler at {ex.address}: "
                                          f"{one_line(exc, with_type=True)}")
        on_progress("waiting for a Dask worker", 0.0)
        outcome = Outcome(CANCELLED)
        try:
            outcome = self._follow(client, future, on_progress)
            return outcome
        finally:
            self._finish(client, future, stop_task=outcome.kind in (CANCELLED, DIED) or not future.done())

    def _follow(self, client, future, on_progress: ProgressFn) -> Outcome:
        last_worker_check = 0.0
        no_workers_since: float | None = None
        unreachable_since: float | None = None
        while True:
            if self._cancelled.wait(POLL_INTERVAL):
                return Outcome(CANCELLED)
            try:
                self._drain(client, on_progress)
                if future.done():
                    return self._outcome(future)
                now = time.monotonic()
                if self.worker is not None and now - last_worker_check >= WORKER_CHECK_INTERVAL:
                    last_worker_check = now
                    self._check_worker(client, future)
                elif self.worker is None and now - last_worker_check >= 2.0:
                    last_worker_check = now
                    if self._rpc(client, "ncores"):
                        no_workers_since = None
                    elif no_workers_since is None:
                        no_workers_since = now
                    elif now - no_workers_since > NO_WORKER_TIMEOUT:
                        return Outcome(ERROR, message=f"no Dask worker was connected to the scheduler at "
                                                      f"{self.executor.address} for {NO_WORKER_TIMEOUT:.0f} s")
                unreachable_since = None
            except _Lost as lost:
                return Outcome(DIED, message=str(lost))
            except Exception as exc:  # the scheduler is unreachable or restarting: retry for a bounded time
                now = time.monotonic()
                if client.status in ("closing", "closed"):  # the client gave up reconnecting
                    return Outcome(ERROR, message=f"lost the connection to the Dask scheduler at "
                                                  f"{self.executor.address}; the job's task is lost with it")
                if unreachable_since is None:
                    unreachable_since = now
                    log.warning("job %s: the Dask scheduler does not answer: %s", self.job_id,
                                one_line(exc, with_type=True))
                elif now - unreachable_since > SCHEDULER_LOST_TIMEOUT:
                    return Outcome(ERROR, message=f"lost the connection to the Dask scheduler at "
                                                  f"{self.executor.address} for {SCHEDULER_LOST_TIMEOUT:.0f} s: "
                                                  f"{one_line(exc, with_type=True)}")

    def _check_worker(self, client, future) -> None:
        """Raise _Lost when the task is no longer running on the worker that started it (that worker died)."""
        processing = self._rpc(client, "processing")
        if self.key in processing.get(self.worker, ()):
            return
        deadline = time.monotonic() + FINISH_GRACE  # it may just have finished: its result is on its way
        while time.monotonic() < deadline:
            if future.done():
                return
            time.sleep(0.05)
        self._dead += 1
        gone = self.worker not in processing
        raise _Lost(self._died_message(self.worker, self.pid, "it left the cluster" if gone
                                       else "it no longer runs the task"))

    def _outcome(self, future) -> Outcome:
        status = future.status
        if status == "finished":
            value = future.result(timeout=RPC_TIMEOUT * 6)
            if "result" in value:
                return Outcome(RESULT, result=value["result"])
            if "stopped" in value:
                return Outcome(CANCELLED)
            return Outcome(ERROR, message=value.get("error", "the Dask task returned no result"))
        if status == "cancelled":
            return Outcome(ERROR, message="the Dask task was cancelled on the cluster (a client or the scheduler "
                                          "dropped it)")
        exc = future.exception(timeout=RPC_TIMEOUT)
        if type(exc).__name__ == "KilledWorker":
            return Outcome(DIED, message=f"the Dask worker running this job died: {one_line(exc, with_type=True)}")
        return Outcome(ERROR, message=f"the Dask task failed: {one_line(exc, with_type=True)}")

    def _finish(self, client, future, stop_task: bool) -> None:
        """Stop the task if it may still run, and release the queue, the event and the future; never raises."""
        event = cancel_event_name(self.job_id)
        try:
            if client.status in ("closing", "closed"):
                return  # the scheduler is gone, and the queue and event with it
            if stop_task:
                self._rpc(client, "event_set", name=event)
                future.cancel()
                deadline = time.monotonic() + STOP_WAIT
                while self._started - self._dead > self._exited and time.monotonic() < deadline:
                    time.sleep(POLL_INTERVAL)
                    self._drain(client, None, watch=False)
                if self._started - self._dead > self._exited:
                    log.warning("job %s: its Dask task did not confirm that it stopped within %.0f s; it stops at "
                                "its next check", self.job_id, STOP_WAIT)
                else:
                    self._rpc(client, "event_clear", name=event)
            for _ in range(1 + self._dead):  # a dead attempt never released its reference to the queue
                self._queue.close()
        except Exception as exc:
            log.warning("job %s: cleaning up on the Dask cluster failed: %s", self.job_id,
                        one_line(exc, with_type=True))
        finally:
            try:
                future.release()
            except Exception:
                pass


def _close_quietly(client) -> None:
    try:
        client.close(timeout=RPC_TIMEOUT)
    except Exception:
        pass
