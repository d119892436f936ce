"""The database refuses writes while a training job runs, then takes them again: a real training service through
gRPC, on a SQLite file made immutable (`chattr +i`) and on a PostgreSQL server that is stopped and started again.

The running job ends FAILED with the database's cause as soon as the database takes writes again, the scheduler
reports itself unhealthy meanwhile and healthy after, its worker threads live on, and the next job trains and
registers a model, all without restarting the service.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from postgres import started_cluster
from service_fixtures import load_market, train, ts, wait_job
from shared.settings import Settings

# Long enough that the job is still fitting when the database stops taking writes.
SLOW = common_pb2.ModelParams(n_estimators=150)
QUICK = common_pb2.ModelParams(n_estimators=20)


def _wait_until(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting until {what}"
        time.sleep(interval)


def _workers_alive() -> list[str]:
    return sorted(t.name for t in threading.enumerate() if t.name.startswith("training-worker-") and t.is_alive())


def _outage_during_a_job(url: str, model_dir: Path, refuse_writes: Callable[[], AbstractContextManager[None]]) -> None:
    from training_service.server import start as start_training

    running = start_training(Settings(database_url=url, model_dir=model_dir), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        scheduler = running.scheduler
        workers = _workers_alive()
        assert workers and scheduler.healthy
        health: list[bool] = []
        wired = scheduler.on_health_change  # keep whatever the server reports health with

        def record(ok: bool) -> None:
            health.append(ok)
            if wired is not None:
                wired(ok)

        scheduler.on_health_change = record

        job = stub.StartTraining(training_pb2.StartTrainingRequest(
            symbol="BTC/USD", timeframe="1h", start_time=ts("2018-01-01"), end_time=ts("2019-01-01"),
            params=SLOW), timeout=30)
        get = lambda: stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id), timeout=10)  # noqa: E731
        _wait_until(lambda: get().stage == "fitting", 120, "the job is fitting")

        with refuse_writes():
            # the run ends, its result cannot be registered, and the worker retries recording the job's end
            _wait_until(lambda: job.job_id in scheduler.unrecorded_job_ids(), 180, "the job's end waits")
            assert not scheduler.healthy
            time.sleep(1.5)  # a few retries fail meanwhile
            assert job.job_id in scheduler.unrecorded_job_ids() and not scheduler.healthy
            assert _workers_alive() == workers
            check = health_pb2_grpc.HealthStub(channel).Check
            for name in ("", "mlsignal.v1.TrainingService"):  # the service says it cannot run jobs now
                status = check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert status == health_pb2.HealthCheckResponse.NOT_SERVING, name

        done = wait_job(stub, job.job_id, timeout=60)
        assert done.state == training_pb2.JOB_STATE_FAILED, done
        assert "database" in done.error and not done.model_id, done.error
        _wait_until(lambda: scheduler.healthy, 10, "the scheduler is healthy again")
        assert scheduler.unrecorded_job_ids() == []
        assert health[0] is False and health[-1] is True, health
        assert not [p for p in model_dir.iterdir() if p.name.startswith(job.job_id) or p.suffix == ".partial"]

        # the next job runs on the same service, without a restart
        nxt = train(stub, start="2018-03-01", end="2018-09-01", params=QUICK)
        assert nxt.state == training_pb2.JOB_STATE_SUCCEEDED and nxt.model_id
        assert (model_dir / f"{nxt.model_id}.onnx").exists()
        assert get().state == training_pb2.JOB_STATE_FAILED  # the failed job stays as recorded
        assert _workers_alive() == workers and scheduler.healthy
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        running.stop(0.5)


# --------------------------------------------------------------------------------------------------------------------
# SQLite: the database files become immutable


def _can_chattr(directory: Path) -> bool:
    if os.geteuid() != 0 or shutil.which("chattr") is None:
        return False
    probe = directory / ".chattr-probe"
    probe.write_text("x")
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        return ok
    finally:
        probe.unlink(missing_ok=True)


def test_sqlite_refusing_writes_fails_the_running_job_and_the_next_one_runs(tmp_path, sample_frame):
    if not _can_chattr(tmp_path):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    db = tmp_path / "mlsignal.db"
    url = f"sqlite:///{db}"
    load_market(url, sample_frame)

    @contextlib.contextmanager
    def immutable() -> Iterator[None]:
        files = [str(p) for p in (db, *(db.with_name(db.name + s) for s in ("-wal", "-shm", "-journal")))
                 if p.exists()]
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)

    _outage_during_a_job(url, tmp_path / "models", immutable)


def test_sqlite_job_that_cannot_be_recorded_before_a_stop_is_interrupted_at_the_next_start(tmp_path, sample_frame):
    from training_service.jobs import FAILED, INTERRUPTED, RUNNING, JobStore
    from training_service.server import start as start_training

    if not _can_chattr(tmp_path):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    db = tmp_path / "mlsignal.db"
    url = f"sqlite:///{db}"
    load_market(url, sample_frame)
    settings = Settings(database_url=url, model_dir=tmp_path / "models")
    running = start_training(settings, "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    stopped = False
    try:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = stub.StartTraining(training_pb2.StartTrainingRequest(
            symbol="BTC/USD", timeframe="1h", start_time=ts("2018-01-01"), end_time=ts("2019-01-01"),
            params=SLOW), timeout=30)
        get = lambda: stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id), timeout=10)  # noqa: E731
        _wait_until(lambda: get().stage == "fitting", 120, "the job is fitting")
        # the database and its write-ahead log; the shared-memory index stays writable, since closing the last
        # connection writes into its memory mapping (an immutable one faults the process)
        files = [str(p) for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            _wait_until(lambda: not running.scheduler.healthy, 30, "a progress write failed")
            channel.close()
            running.stop(0.5)  # the job's interruption cannot be written
            stopped = True
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
    finally:
        channel.close()
        if not stopped:
            running.stop(0.5)

    from shared.store.db import make_engine

    engine = make_engine(url)
    try:
        assert JobStore(engine).get_existing(job.job_id).state == RUNNING  # as the database last had it
        again = start_training(settings, "127.0.0.1:0")
        try:
            recovered = JobStore(engine).get_existing(job.job_id)
            assert recovered.state == FAILED and recovered.error == INTERRUPTED, recovered
            assert not list((tmp_path / "models").iterdir())
        finally:
            again.stop(0.5)
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------------------------------
# PostgreSQL: the server stops and starts again


@pytest.fixture
def own_pg_url() -> Iterator[tuple[str, Callable[[], AbstractContextManager[None]]]]:
    """A PostgreSQL cluster of this test's own (stopping it disturbs no other test): its URL, and a context manager
    that keeps the server stopped while it is entered."""
    with started_cluster("mlsignal-pg-faults-") as cluster:
        yield cluster.url(), cluster.stopped


@pytest.mark.postgres
def test_postgres_stopping_fails_the_running_job_and_the_next_one_runs(own_pg_url, tmp_path, sample_frame):
    url, stopped = own_pg_url
    load_market(url, sample_frame)
    _outage_during_a_job(url, tmp_path / "models", stopped)


def test_a_sqlite_connection_opened_while_the_file_refused_writes_is_not_reused_read_only(tmp_path, sample_frame):
    """SQLite opens a write-protected file read-only (even with mode=rw) and such a connection stays read-only: a
    pool that kept it would refuse writes after the file takes them again."""
    import sqlalchemy as sa

    from shared.store.db import make_engine

    if not _can_chattr(tmp_path):
        pytest.skip("needs root and a filesystem with the immutable attribute (chattr +i)")
    db = tmp_path / "mlsignal.db"
    url = f"sqlite:///{db}"
    load_market(url, sample_frame.iloc[:10])
    engine = make_engine(url)
    try:
        files = [str(p) for p in (db, db.with_name(db.name + "-wal")) if p.exists()]
        subprocess.run(["chattr", "+i", *files], check=True)
        try:
            with engine.connect() as conn:  # a reader during the outage opens (and pools) its connection
                assert conn.execute(sa.text("SELECT count(*) FROM candles")).scalar() == 10
        finally:
            subprocess.run(["chattr", "-i", *files], check=True)
        with engine.begin() as conn:  # the file takes writes again: so does the engine, at once
            conn.execute(sa.text("DELETE FROM candles WHERE open_time = (SELECT min(open_time) FROM candles)"))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM candles")).scalar() == 9
    finally:
        engine.dispose()
