"""What runs inside a training worker process: load candles, train, write the artifacts as partial files.

The process never touches the registry or the jobs table. It reports progress and its result over a queue, and
the service registers the model. Killing this process therefore can never leave a half-registered model; the
service removes the partial files of a job it cancelled or that died.
"""

from __future__ import annotations

import os
import traceback
from pathlib import Path


def partial_paths(model_dir: Path, job_id: str) -> tuple[Path, Path]:
    return model_dir / f".{job_id}.onnx.partial", model_dir / f".{job_id}.joblib.partial"


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _exit_with_parent(parent_pid: int) -> None:
    """If the service dies (even by SIGKILL), nobody can register this job's result: stop at once."""
    import threading
    import time

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_job(job_id: str, request_json: str, database_url: str, model_dir: str, n_jobs: int, queue,
            parent_pid: int | None = None) -> None:
    """Process entry point. Sends ("progress", stage, frac), then ("result", dict) or ("error", message)."""
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    try:
        from shared.artifacts import sha256_bytes
        from shared.db import make_engine
        from shared.errors import MlsignalError
        from shared.marketdata import load_candles
        from training_service.jobs import TrainingRequest
        from training_service.pipeline import train

        req = TrainingRequest.from_json(request_json)
        queue.put(("progress", "loading", 0.01))
        engine = make_engine(database_url)
        try:
            frame = load_candles(engine, req.symbol, req.timeframe, req.start_ms, req.end_ms)
        finally:
            engine.dispose()
        if frame.empty:
            raise MlsignalError(f"no candles for {req.symbol} {req.timeframe} in the requested range")
        queue.put(("progress", "loading", 0.05))
        trained = train(frame, req.label, req.params, lambda s, f: queue.put(("progress", s, f)), n_jobs=n_jobs)
        onnx_path, skl_path = partial_paths(Path(model_dir), job_id)
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        _write(onnx_path, trained.onnx_bytes)
        _write(skl_path, trained.sklearn_bytes)
        queue.put(
            (
                "result",
                {
                    "spec": trained.spec.to_dict(),
                    "prior": [float(p) for p in trained.prior],
                    "shrink_weight": trained.shrink_weight,
                    "metrics": trained.metrics,
                    "train_start_ms": trained.train_start_ms,
                    "train_end_ms": trained.train_end_ms,
                    "sha256": sha256_bytes(trained.onnx_bytes),
                    "sklearn_sha256": sha256_bytes(trained.sklearn_bytes),
                    "versions": trained.versions,
                },
            )
        )
    except BaseException as exc:  # report everything: the parent turns it into a FAILED job
        from shared.errors import MlsignalError

        if isinstance(exc, MlsignalError):
            queue.put(("error", str(exc)))
        else:
            queue.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=8)}"))
