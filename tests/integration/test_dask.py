"""Training on a real Dask cluster: a LocalCluster of two worker processes, the training service in-process with the
Dask executor (MLSIGNAL_DASK_SCHEDULER), a SQLite database holding the bundled sample.

Covers a registered model written by the service, progress and cancel while fitting (the task stops on the worker),
a worker killed mid-job, and the joblib dask backend. The whole file runs in well under a minute.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time

import grpc
import pytest
import sqlalchemy as sa

from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from service_fixtures import load_market, train, wait_job
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.registry import get_model, list_models
from training_service import executors
from training_service.executors import ERROR, RESULT, DaskExecutor
from training_service.jobs import TrainingRequest
from training_service.worker import spreads_fit, task_key

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed (the [dask] extra)")

R = training_pb2.StartTrainingRequest
BIG = common_pb2.ModelParams(n_estimators=3000)  # minutes of fitting: only ever cancelled or killed


class Cluster:
    def __init__(self, tmp_path_factory, sample_frame):
        from distributed import Client, LocalCluster

        from training_service.server import start as start_training

        root = tmp_path_factory.mktemp("dask")
        self.url = f"sqlite:///{root}/mlsignal.db"
        self.model_dir = root / "models"
        load_market(self.url, sample_frame)
        self.cluster = LocalCluster(n_workers=2, processes=True, threads_per_worker=1, dashboard_address=None,
                                    local_directory=str(root / "dask-scratch"))
        self.client = Client(self.cluster)
        self.settings = Settings(database_url=self.url, model_dir=self.model_dir, training_workers=2,
                                 training_fit_jobs=1, dask_scheduler=self.cluster.scheduler_address)
        self.training = start_training(self.settings, "127.0.0.1:0")
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.training.port}")
        self.stub = training_pb2_grpc.TrainingServiceStub(self.channel)
        self.engine = make_engine(self.url)

    def close(self):
        self.channel.close()
        self.training.stop(0.5)
        self.engine.dispose()
        self.client.close()
        self.cluster.close()

    def running_keys(self) -> list[str]:
        """Keys of the tasks that are executing on any worker right now (including cancelled ones still running)."""
        active = self.client.run(lambda dask_worker: list(dask_worker.active_threads.values()))
        return [str(k) for keys in active.values() for k in keys]

    def start_fitting(self, params=BIG) -> training_pb2.TrainingJob:
        """Start a job and return once it is fitting and progress has moved during fitting."""
        job = self.stub.StartTraining(R(symbol="BTC/USD", timeframe="1h", params=params), timeout=10)
        seen = []
        for update in self.stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id), timeout=60):
            seen.append((update.stage, update.progress))
            if len({p for s, p in seen if s == "fitting"}) >= 3:
                break
        assert [p for _, p in seen] == sorted(p for _, p in seen), seen
        return job

    def model_rows(self, job_id: str):
        with self.engine.connect() as conn:
            return conn.execute(sa.text("SELECT model_id FROM models WHERE job_id = :j"), {"j": job_id}).all()


@pytest.fixture(scope="module")
def dask_services(tmp_path_factory, sample_frame):
    with pytest.MonkeyPatch.context() as env:
        # Workers take the database URL the service sends; a caller's own MLSIGNAL_DATABASE_URL must not leak into
        # the worker processes, which inherit this environment.
        env.delenv("MLSIGNAL_DATABASE_URL", raising=False)
        c = Cluster(tmp_path_factory, sample_frame)
        try:
            yield c
        finally:
            c.close()


def _wait_until(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_a_job_runs_as_one_dask_task_and_the_service_registers_its_artifacts(dask_services):
    c = dask_services
    with distributed.get_task_stream(c.client) as stream:
        job = train(c.stub)
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.model_id and job.progress == 1.0
    ran = [t for t in stream.data if str(t["key"]) == task_key(job.job_id)]
    assert ran and ran[0]["worker"] in c.client.scheduler_info()["workers"]  # it ran on a worker of the cluster
    models = c.stub.ListModels(training_pb2.ListModelsRequest(symbol="BTC/USD", timeframe="1h"), timeout=10).models
    info = next(m for m in models if m.model_id == job.model_id)
    record = get_model(c.engine, job.model_id)
    onnx = (c.model_dir / record.artifact).read_bytes()
    assert hashlib.sha256(onnx).hexdigest() == info.sha256 == record.sha256
    skl = (c.model_dir / record.sklearn_artifact).read_bytes()
    assert hashlib.sha256(skl).hexdigest() == record.sklearn_sha256
    assert not list(c.model_dir.glob(".*"))  # no partial file left
    assert info.metrics["log_loss"] > 0 and info.metrics["prior_log_loss"] > 0


def test_progress_moves_and_cancel_stops_the_task_on_the_worker(dask_services):
    c = dask_services
    files_before = set(os.listdir(c.model_dir))
    job = c.start_fitting()
    assert task_key(job.job_id) in c.running_keys()
    t0 = time.monotonic()
    cancelled = c.stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job.job_id), timeout=5)
    assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
    final = wait_job(c.stub, job.job_id, timeout=5)
    assert final.state == training_pb2.JOB_STATE_CANCELLED and time.monotonic() - t0 < 2.0
    # the worker stops fitting at its next check (about every half second), and the service lets go of the job
    assert _wait_until(lambda: task_key(job.job_id) not in c.running_keys(), timeout=3), c.running_keys()
    assert _wait_until(lambda: not c.training.scheduler.running_job_ids(), timeout=5)
    assert time.monotonic() - t0 < 5
    assert not c.model_rows(job.job_id)
    assert set(os.listdir(c.model_dir)) == files_before
    with pytest.raises(grpc.RpcError) as err:
        c.stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job.job_id), timeout=5)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_joblib_dask_backend_spreads_the_trees_and_builds_the_same_model(dask_services):
    c = dask_services
    assert spreads_fit(4, False, cores=2) and spreads_fit(1, True, cores=2)
    assert not spreads_fit(-1, False, cores=2) and not spreads_fit(2, False, cores=2)
    first = list_models(c.engine, "BTC/USD", "1h")[-1]  # the model of the first test
    request = c.training.scheduler.store.get(first.job_id).request
    executor = DaskExecutor(c.cluster.scheduler_address, c.url, fit_jobs=-1, spread_fit=True)
    try:
        with distributed.get_task_stream(c.client) as stream:
            outcome = executor.submit("spread-check", request.to_json()).wait(lambda stage, frac: None)
    finally:
        executor.close()
    assert outcome.kind == RESULT, outcome.message
    trees = [t for t in stream.data if "_parallel_build_trees" in str(t["key"])]
    assert len(trees) >= 3 * first.params.n_estimators // 10  # the three forests' trees ran as cluster tasks
    # the same seeds in the same order: byte for byte the model the service trained in one task
    assert hashlib.sha256(outcome.result["onnx_bytes"]).hexdigest() == first.sha256


def test_unreachable_scheduler_fails_the_run_quickly_with_the_reason(monkeypatch, dask_services):
    from conftest import _free_port

    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 1.0)
    executor = DaskExecutor(f"tcp://127.0.0.1:{_free_port()}", dask_services.url)
    t0 = time.monotonic()
    outcome = executor.submit("nowhere", TrainingRequest("BTC/USD", "1h", None, None).to_json()).wait(
        lambda stage, frac: None)
    executor.close()
    assert outcome.kind == ERROR and "cannot reach the Dask scheduler at tcp://127.0.0.1:" in outcome.message
    assert time.monotonic() - t0 < 10


def test_a_killed_worker_fails_the_job_without_a_model_and_the_cluster_recovers(dask_services):
    c = dask_services
    files_before = set(os.listdir(c.model_dir))
    job = c.start_fitting()
    key = task_key(job.job_id)
    worker = next(w for w, keys in c.client.processing().items() if key in keys)
    pid = c.client.run(os.getpid, workers=[worker])[worker]
    t0 = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    final = wait_job(c.stub, job.job_id, timeout=30)
    assert time.monotonic() - t0 < 15
    assert final.state == training_pb2.JOB_STATE_FAILED, final
    assert final.error.startswith("the Dask worker running this job died: ") and worker in final.error, final.error
    assert not c.model_rows(job.job_id)
    assert set(os.listdir(c.model_dir)) == files_before
    # the nanny restarts the worker; no attempt of the job keeps running anywhere
    c.client.wait_for_workers(2, timeout=30)
    assert _wait_until(lambda: key not in c.running_keys(), timeout=5), c.running_keys()
    # and the cluster trains the next job as before
    done = train(c.stub, params=common_pb2.ModelParams(n_estimators=10))
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED


def test_dask_settings_are_validated(monkeypatch):
    monkeypatch.setenv("MLSIGNAL_DASK_ALLOW_PLAINTEXT", "1")  # a tcp:// scheduler on another host is opt-in
    monkeypatch.setenv("MLSIGNAL_DASK_SCHEDULER", "tcp://dask-scheduler:8786")
    monkeypatch.setenv("MLSIGNAL_DASK_SPREAD_FIT", "1")
    s = Settings.from_env()
    assert s.dask_scheduler == "tcp://dask-scheduler:8786" and s.dask_spread_fit is True
    for bad in ("dask-scheduler:8786", "http://x:8786", "tcp://x", "tcp://x:0"):
        monkeypatch.setenv("MLSIGNAL_DASK_SCHEDULER", bad)
        with pytest.raises(ValueError, match="MLSIGNAL_DASK_SCHEDULER"):
            Settings.from_env()
    monkeypatch.setenv("MLSIGNAL_DASK_SCHEDULER", "tcp://x:8786")
    monkeypatch.setenv("MLSIGNAL_DASK_SPREAD_FIT", "maybe")
    with pytest.raises(ValueError, match="MLSIGNAL_DASK_SPREAD_FIT"):
        Settings.from_env()


def test_database_passwords_never_travel_with_a_task():
    from training_service.executors import shareable_database_url

    assert shareable_database_url("postgresql+psycopg://u:secret@db/m") is None
    assert shareable_database_url("postgresql+psycopg://u@db/m") == "postgresql+psycopg://u@db/m"
    assert shareable_database_url("sqlite:///var/x.db") == f"sqlite:///{os.path.abspath('var/x.db')}"
    assert shareable_database_url("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
