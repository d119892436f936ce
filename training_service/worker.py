"""What runs where a training job runs: load the candles, train, and hand the artifacts back as bytes.

Two entry points share `train_job`:

- `serve_jobs`: the entry point of a local worker process (LocalProcessExecutor). The process imports what training
  needs once (`warm_up`), then takes one job at a time over its pipe, reporting progress and the result over the same
  pipe, until the service closes the pipe or dies.
- `run_job_on_dask`: the one Dask task of a job (DaskExecutor). It reports progress over a `distributed.Queue`,
  stops when the job's `distributed.Event` is set, and returns its result.

Neither writes a file or touches the registry or the jobs table: the result carries the ONNX and joblib bytes, and
the service writes them atomically into MLSIGNAL_MODEL_DIR and registers the model in one place. Killing a worker
therefore can never leave a half-written file or a half-registered model behind.
"""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable

#: Messages a job sends while it runs (lists, because they may travel as msgpack):
#:   ["started", worker address, pid]   (Dask only) the task began executing on this worker
#:   ["progress", stage, fraction]
#:   ["exit"]                           (Dask only) the task is leaving, whatever the reason
#: and, for a local worker process only, ["ready", pid, seconds] once it is warm, and for each job finally
#: ["result", dict] or ["error", message].
PROGRESS_INTERVAL = 0.2  # seconds between two progress messages of the same stage (Dask)
LOCAL_PROGRESS_INTERVAL = 0.1  # the same for a local worker process
STOP_POLL_INTERVAL = 0.1  # seconds a should_stop answer is reused (Dask)
RPC_TIMEOUT = 5.0  # seconds any one call to the Dask scheduler may take from inside a task


def progress_queue_name(job_id: str) -> str:
    return f"mlsignal-progress-{job_id}"


def cancel_event_name(job_id: str) -> str:
    return f"mlsignal-cancel-{job_id}"


def task_key(job_id: str) -> str:
    return f"mlsignal-train-{job_id}"


def train_job(request_json: str, database_url: str, n_jobs: int, progress: Callable[[str, float], None],
              should_stop: Callable[[], bool] | None = None, fit_context=None) -> dict:
    """Load the job's candles and train; the result dict holds the metadata and the artifact bytes.

    Raises MlsignalError (or a subclass) for a request the data cannot satisfy, TrainingStopped when `should_stop`
    answered True.
    """
    from shared.artifacts import sha256_bytes
    from shared.errors import MlsignalError
    from shared.features import TRAINING_SPECS
    from shared.store.db import make_engine
    from shared.store.marketdata import load_candles
    from shared.timeframes import timeframe_ms
    from training_service.jobs import TrainingRequest
    from training_service.pipeline import train

    req = TrainingRequest.from_json(request_json)
    progress("loading", 0.01)
    engine = make_engine(database_url)
    try:
        frame = load_candles(engine, req.symbol, req.timeframe, req.start_ms, req.end_ms)
    finally:
        engine.dispose()
    if frame.empty:
        raise MlsignalError(f"no candles for {req.symbol} {req.timeframe} in the requested range")
    progress("loading", 0.05)
    trained = train(frame, req.label, req.params, progress, n_jobs=n_jobs, should_stop=should_stop,
                    fit_context=fit_context, timeframe_ms=timeframe_ms(req.timeframe), cv_folds=req.cv_folds,
                    base_spec=TRAINING_SPECS[req.feature_set])
    return {
        "spec": trained.spec.to_dict(),
        "prior": [float(p) for p in trained.prior],
        "shrink_weight": trained.shrink_weight,
        "ood": trained.ood.to_dict() if trained.ood is not None else None,
        "drift": trained.drift.to_dict() if trained.drift is not None else None,
        "metrics": trained.metrics,
        "train_start_ms": trained.train_start_ms,
        "train_end_ms": trained.train_end_ms,
        "versions": trained.versions,
        "onnx_bytes": trained.onnx_bytes,
        "sklearn_bytes": trained.sklearn_bytes,
        "sha256": sha256_bytes(trained.onnx_bytes),  # lets the service check the bytes arrived intact
        "sklearn_sha256": sha256_bytes(trained.sklearn_bytes),
    }


def error_message(exc: BaseException) -> str:
    """A domain error's own message; anything else with its type and a short traceback."""
    from shared.errors import MlsignalError

    if isinstance(exc, MlsignalError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"


# ----------------------------------------------------------------------------------------------------------------------
# local worker process


def _exit_with_parent(parent_pid: int) -> None:
    """If the service dies (even by SIGKILL), nobody can register this job's result: stop at once."""
    import threading

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


#: What a job imports, imported by a local worker process once, before its first job.
WARM_MODULES = (
    "numpy", "pandas", "joblib", "sklearn.ensemble", "sklearn.inspection", "skl2onnx",
    "skl2onnx.common.data_types", "onnxruntime", "sqlalchemy", "shared.onnxmodel", "shared.store.db",
    "shared.store.marketdata", "training_service.jobs", "training_service.pipeline",
)


def warm_up(database_url: str) -> None:
    """Import everything a job uses (numpy, pandas, scikit-learn, skl2onnx, ONNX Runtime, SQLAlchemy and the
    database driver), so that a job in this process pays none of it: seconds of work, done once per process.

    Never raises: whatever fails here fails again inside the job, which reports it as the job's error."""
    import importlib

    try:
        for name in WARM_MODULES:
            importlib.import_module(name)
        from shared.store.db import make_engine

        make_engine(database_url).dispose()  # loads the SQLAlchemy dialect and the driver
    except Exception:
        pass


def serve_jobs(conn, database_url: str, n_jobs: int, parent_pid: int | None = None) -> None:
    """Process entry point of a long-lived local worker: warm up, then run the jobs sent over `conn` one at a time.

    Receives (job_id, request_json) per job; sends ["ready", pid, seconds] once warm, then per job
    ["progress", stage, frac] messages and finally ["result", dict] or ["error", message]. Returns when the service
    closes its end of the pipe (or sends None). SIGINT is ignored: a Ctrl-C reaches the whole process group, and the
    service decides what happens to its jobs when it stops (it kills their processes).
    """
    import gc
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    t0 = time.monotonic()
    warm_up(database_url)
    conn.send(["ready", os.getpid(), time.monotonic() - t0])
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):  # the service closed the pipe (or is gone)
            return
        if task is None:
            return
        _job_id, request_json = task
        sent_stage, sent_at = "", 0.0

        def progress(stage: str, frac: float) -> None:
            nonlocal sent_stage, sent_at
            now = time.monotonic()
            if stage != sent_stage or now - sent_at >= LOCAL_PROGRESS_INTERVAL:
                sent_stage, sent_at = stage, now
                conn.send(["progress", stage, float(frac)])

        message: list
        try:
            message = ["result", train_job(request_json, database_url, n_jobs, progress)]
        except Exception as exc:  # report it: the service turns it into a FAILED job, and this process goes on
            message = ["error", error_message(exc)]
        conn.send(message)
        del message
        gc.collect()  # the job's frames and forests go before the next job arrives


# ----------------------------------------------------------------------------------------------------------------------
# Dask task


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def spreads_fit(n_jobs: int, spread_fit: bool, cores: int | None = None) -> bool:
    """Whether a Dask task grows its trees across the cluster: on request, or when n_jobs exceeds the worker's cores."""
    return spread_fit or n_jobs > (cores if cores is not None else _cores())


def run_job_on_dask(job_id: str, request_json: str, database_url: str | None, n_jobs: int,
                    spread_fit: bool = False) -> dict:
    """The Dask task of one job. Returns {"result": dict} or {"error": message}; {"stopped": reason} on cancel.

    The database URL is the worker's own MLSIGNAL_DATABASE_URL when set, else the one the service sent (it sends
    none that carries a password). With `spreads_fit`, the forests are fitted inside joblib's dask backend, so
    their trees run as tasks on all workers of the cluster. The task stops at its next check (about every half
    second) when the job's cancel event is set or when the cluster dropped the task (its future was cancelled, or
    the service that submitted it is gone).
    """
    from distributed import Queue, get_client, get_worker

    from training_service.pipeline import TrainingStopped

    worker = get_worker()
    client = get_client()  # the worker's own client, connected to the scheduler
    queue = Queue(progress_queue_name(job_id), client=client)
    event = cancel_event_name(job_id)

    def send(message: list) -> None:
        try:
            queue.put(message, callback_timeout=RPC_TIMEOUT)
        except Exception:  # progress is best effort; the result does not depend on it
            pass

    sent_stage, sent_at, checked_at, stop = "", 0.0, 0.0, False

    def progress(stage: str, frac: float) -> None:
        nonlocal sent_stage, sent_at
        now = time.monotonic()
        if stage != sent_stage or now - sent_at >= PROGRESS_INTERVAL:
            sent_stage, sent_at = stage, now
            send(["progress", stage, float(frac)])

    key = worker.get_current_task()

    def abandoned() -> bool:
        """Whether the cluster no longer wants this task (its future was cancelled, or its client is gone)."""
        try:
            ts = worker.state.tasks.get(key)
            return ts is None or ts.state == "cancelled"
        except Exception:  # internal worker state: never fail a job over it
            return False

    def should_stop() -> bool:
        nonlocal checked_at, stop
        now = time.monotonic()
        if not stop and now - checked_at >= STOP_POLL_INTERVAL:
            checked_at = now
            try:
                stop = abandoned() or bool(client.sync(client.scheduler.event_is_set, name=event,
                                                       callback_timeout=RPC_TIMEOUT))
            except Exception:  # an unreachable scheduler will cancel nothing; keep going
                pass
        return stop

    send(["started", worker.address, os.getpid()])
    try:
        url = os.environ.get("MLSIGNAL_DATABASE_URL") or database_url
        if not url:
            return {"error": f"the Dask worker {worker.address} has no MLSIGNAL_DATABASE_URL, and the training "
                             "service does not send a database URL that carries a password; set "
                             "MLSIGNAL_DATABASE_URL on the workers"}
        fit_context = None
        if spreads_fit(n_jobs, spread_fit):
            import joblib

            def fit_context():
                return joblib.parallel_config(backend="dask")

        return {"result": train_job(request_json, url, n_jobs, progress, should_stop, fit_context)}
    except TrainingStopped as exc:
        return {"stopped": str(exc)}
    except Exception as exc:
        return {"error": error_message(exc)}
    finally:
        send(["exit"])
        try:
            queue.close()
        except Exception:
            pass
