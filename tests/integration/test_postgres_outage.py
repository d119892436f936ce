"""PostgreSQL going away and coming back under both services, and PostgreSQL down when they start.

A cluster of this module's own (initdb/pg_ctl, as the postgres user when the tests run as root), so stopping it
disturbs no other test.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from postgres import Cluster, started_cluster
from service_fixtures import load_market, wait_job
from shared.settings import Settings

pytestmark = pytest.mark.postgres

REPO = Path(__file__).resolve().parents[2]
SYMBOL, TF = "BTC/USD", "1h"
TINY = common_pb2.ModelParams(n_estimators=8)
INFERENCE = "mlsignal.v1.InferenceService"
TRAINING = "mlsignal.v1.TrainingService"


@pytest.fixture(scope="module")
def cluster(sample_frame) -> Iterator[Cluster]:
    """A running cluster with a migrated database `mlsignal` holding 3,000 BTC/USD candles; `postgres` has no schema."""
    with started_cluster("mlsignal-pg-restart-") as c:
        engine = sa.create_engine(c.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE mlsignal"))
        engine.dispose()
        load_market(c.url("mlsignal"), sample_frame.iloc[:3000])
        yield c


@pytest.fixture
def running_cluster(cluster: Cluster) -> Iterator[Cluster]:
    if not cluster.running:
        cluster.start()
    yield cluster
    if not cluster.running:
        cluster.start()


def _call(fn: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _statuses(channel: grpc.Channel, service: str) -> set[int]:
    stub = health_pb2_grpc.HealthStub(channel)
    return {stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status for name in ("", service)}


def _record(monkeypatch, name: str) -> list[str]:
    """The messages logged on `name` from now on (warnings and above)."""
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    logger = logging.getLogger(name)
    monkeypatch.setattr(logger, "handlers", [*logger.handlers, Keep(logging.WARNING)])  # undone afterwards
    monkeypatch.setattr(logger, "level", min(logger.level or logging.WARNING, logging.WARNING))
    return messages


def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.1)


class Both:
    """Training and inference started in this process on `url`, with channels and stubs."""

    def __init__(self, url: str, model_dir: Path, **overrides):
        from inference_service.server import start as start_inference
        from training_service.server import start as start_training

        settings = Settings(database_url=url, model_dir=model_dir, model_poll_seconds=0.2, training_fit_jobs=1,
                            **overrides)
        self.training = start_training(settings, "127.0.0.1:0")
        self.inference = start_inference(settings, "127.0.0.1:0")
        self.tch = grpc.insecure_channel(f"127.0.0.1:{self.training.port}")
        self.ich = grpc.insecure_channel(f"127.0.0.1:{self.inference.port}")
        self.train = training_pb2_grpc.TrainingServiceStub(self.tch)
        self.infer = inference_pb2_grpc.InferenceServiceStub(self.ich)

    def train_tiny(self) -> training_pb2.TrainingJob:
        job = self.train.StartTraining(training_pb2.StartTrainingRequest(symbol=SYMBOL, timeframe=TF, params=TINY),
                                       timeout=30)
        done = wait_job(self.train, job.job_id, timeout=120)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        return done

    def get_model(self) -> inference_pb2.ModelInfo:
        return self.infer.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=10)

    def list_jobs(self) -> training_pb2.ListTrainingJobsResponse:
        return self.train.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10)

    def close(self) -> None:
        self.tch.close()
        self.ich.close()
        self.inference.stop(0.5)
        self.training.stop(0.5)


def test_postgres_restart_under_both_services_costs_unavailable_then_works_without_restart(
        running_cluster, tmp_path, monkeypatch):
    # MLSIGNAL_PROMOTION=auto: the model trained after the outage replaces the serving one, which shows inference
    # follows the registry again
    both = Both(running_cluster.url("mlsignal"), tmp_path / "models", promotion="auto")
    try:
        first = both.train_tiny()
        logged = _record(monkeypatch, "shared.store.db")
        running_cluster.stop()
        for _ in range(3):
            for call in (both.list_jobs, both.get_model,
                         lambda: both.train.StartTraining(training_pb2.StartTrainingRequest(
                             symbol=SYMBOL, timeframe=TF, params=TINY), timeout=10)):
                code, details = _call(call)
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert details.startswith("the database is unavailable: "), details
                assert str(running_cluster.port) in details or "terminat" in details or "closed" in details, details
        outage_logs = [m for m in logged if "(logged once until it works again)" in m]
        assert 1 <= len(outage_logs) <= 2, [r.getMessage() for r in outage_logs]  # once per server, not per call

        running_cluster.start()
        ok = grpc.StatusCode.OK
        _until(lambda: _call(both.list_jobs)[0] == ok and _call(both.get_model)[0] == ok, 20,
               "both services answer again")
        assert both.get_model().model_id == first.model_id
        second = both.train_tiny()  # the scheduler and its workers survived the outage
        _until(lambda: both.get_model().model_id == second.model_id, 20, "inference serves the new model")
        assert _statuses(both.tch, TRAINING) == _statuses(both.ich, INFERENCE) == {
            health_pb2.HealthCheckResponse.SERVING}
        assert any(m.endswith("works again") for m in logged)
    finally:
        both.close()


def test_unreachable_postgres_at_start_is_not_serving_until_it_answers(running_cluster, tmp_path, monkeypatch):
    import shared.server.startup as startup

    monkeypatch.setattr(startup, "RETRY_FIRST_SECONDS", 0.2)
    monkeypatch.setattr(startup, "RETRY_MAX_SECONDS", 0.5)
    running_cluster.stop()
    # MLSIGNAL_PROMOTION=auto: the model trained here serves, whatever an earlier test left serving in this database
    both = Both(running_cluster.url("mlsignal"), tmp_path / "models", promotion="auto")
    try:
        not_serving = {health_pb2.HealthCheckResponse.NOT_SERVING}
        assert _statuses(both.tch, TRAINING) == not_serving
        assert _statuses(both.ich, INFERENCE) == not_serving
        code, details = _call(both.list_jobs)
        assert code == grpc.StatusCode.UNAVAILABLE and "the database is unavailable" in details, details
        time.sleep(1.0)  # still retrying, still not serving
        assert _statuses(both.ich, INFERENCE) == not_serving

        running_cluster.start()
        serving = {health_pb2.HealthCheckResponse.SERVING}
        _until(lambda: _statuses(both.tch, TRAINING) == serving and _statuses(both.ich, INFERENCE) == serving, 20,
               "both services turn SERVING")
        done = both.train_tiny()
        _until(lambda: _call(both.get_model)[0] == grpc.StatusCode.OK, 20, "inference finds the model")
        assert both.get_model().model_id == done.model_id
    finally:
        both.close()


def test_a_database_without_the_schema_once_reachable_stops_the_server(running_cluster, tmp_path):
    """PostgreSQL down at start-up: the server listens NOT_SERVING; when it answers without the mlsignal schema (the
    `postgres` database here), the server exits 1 with the one-line reason."""
    running_cluster.stop()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    env.update({"MLSIGNAL_DATABASE_URL": running_cluster.url("postgres"), "MLSIGNAL_INFERENCE_ADDR": "127.0.0.1:0",
                "MLSIGNAL_MODEL_DIR": str(tmp_path / "models")})
    proc = subprocess.Popen([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("mlsignal-inference listening on port"), line
        port = int(line.split()[-1])
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert _statuses(channel, INFERENCE) == {health_pb2.HealthCheckResponse.NOT_SERVING}
        running_cluster.start()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("mlsignal-inference: cannot use the database "), err
        assert "it has no mlsignal schema; create it with `mlsignal db upgrade`" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
