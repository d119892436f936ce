"""The Dask cluster over mutual TLS: a LocalCluster whose scheduler and workers present certificates of a test CA,
the training service with MLSIGNAL_DASK_TLS_CA/_CERT/_KEY trains a model on it; a client with a certificate of
another CA is refused; and a tcp:// scheduler on another machine is refused at start-up without connecting.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from certificates import make_ca
from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from service_fixtures import load_market, train
from shared.settings import Settings
from shared.store.migrate import upgrade
from training_service.executors import DaskExecutor

distributed = pytest.importorskip("distributed", reason="dask[distributed] is not installed (the [dask] extra)")

REPO = Path(__file__).resolve().parents[2]


def security(files: dict[str, Path]) -> distributed.Security:
    ca, cert, key = (str(files[k]) for k in ("ca", "cert", "key"))
    return distributed.Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, tls_scheduler_cert=cert,
                                tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key,
                                require_encryption=True)


@pytest.fixture(scope="module")
def tls_cluster(tmp_path_factory, sample_frame):
    from distributed import LocalCluster

    from training_service.server import start as start_training

    root = tmp_path_factory.mktemp("dask-tls")
    files = make_ca(root / "pki", "cluster")
    url = f"sqlite:///{root}/mlsignal.db"
    load_market(url, sample_frame)
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLSIGNAL_DATABASE_URL", raising=False)
        for key in ("ca", "cert", "key"):
            env.setenv(f"MLSIGNAL_DASK_TLS_{key.upper()}", str(files[key]))
        env.delenv("MLSIGNAL_DASK_ALLOW_PLAINTEXT", raising=False)
        cluster = LocalCluster(n_workers=1, processes=True, threads_per_worker=1, dashboard_address=None,
                               protocol="tls", security=security(files), host="127.0.0.1",
                               local_directory=str(root / "dask-scratch"))
        try:
            assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
            settings = Settings(database_url=url, model_dir=root / "models", training_workers=1, training_fit_jobs=1,
                                dask_scheduler=cluster.scheduler_address, dask_tls_ca=files["ca"],
                                dask_tls_cert=files["cert"], dask_tls_key=files["key"])
            settings.validate()
            training = start_training(settings, "127.0.0.1:0")
            try:
                yield cluster, training, files, root, url
            finally:
                training.stop(0.5)
        finally:
            cluster.close()


def test_a_tls_cluster_trains_a_model(tls_cluster):
    _cluster, training, _files, _root, _url = tls_cluster
    assert "mutual TLS" in training.scheduler.executor.description
    with grpc.insecure_channel(f"127.0.0.1:{training.port}") as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        job = train(stub, params=common_pb2.ModelParams(n_estimators=5))
        assert job.state == training_pb2.JOB_STATE_SUCCEEDED, job.error
        assert job.model_id
        models = stub.ListModels(training_pb2.ListModelsRequest(symbol="BTC/USD", timeframe="1h"), timeout=10).models
        assert job.model_id in [m.model_id for m in models]


def test_a_client_without_a_certificate_of_the_cluster_ca_is_refused(tls_cluster, tmp_path):
    cluster, _training, _files, _root, url = tls_cluster
    other = make_ca(tmp_path / "other", "intruder")
    with pytest.raises((OSError, TimeoutError)):
        distributed.Client(cluster.scheduler_address, security=security(other), timeout=3, set_as_default=False)
    # and the service's executor needs the TLS files for a tls:// scheduler
    with pytest.raises(ValueError, match="tls:// scheduler needs MLSIGNAL_DASK_TLS_CA"):
        DaskExecutor(cluster.scheduler_address, url, tls_files=None, allow_plaintext=False)


def test_a_plaintext_remote_scheduler_is_refused_at_start_up_without_connecting(monkeypatch, tmp_path):
    connects: list[tuple] = []

    class NoClient:
        def __init__(self, *args, **kwargs):
            connects.append(args)
            raise AssertionError("must not connect")

    monkeypatch.setattr(distributed, "Client", NoClient)
    for key in [k for k in os.environ if k.startswith("MLSIGNAL_")]:
        monkeypatch.delenv(key)
    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(url)
    for address in ("tcp://10.1.2.3:8786", "tcp://dask-scheduler:8786", "tcp://[2001:db8::1]:8786"):
        with pytest.raises(ValueError, match="MLSIGNAL_DASK_ALLOW_PLAINTEXT=1"):
            DaskExecutor(address, url)
        monkeypatch.setenv("MLSIGNAL_DASK_SCHEDULER", address)
        with pytest.raises(ValueError, match="refusing an unencrypted, unauthenticated Dask scheduler"):
            Settings.from_env()
    # in-process start: refused before any connection, quickly
    from training_service.server import start as start_training

    t0 = time.monotonic()
    with pytest.raises(ValueError, match=re.escape("MLSIGNAL_DASK_SCHEDULER='tcp://10.1.2.3:8786'")):
        start_training(Settings(database_url=url, model_dir=tmp_path / "m", dask_scheduler="tcp://10.1.2.3:8786"),
                       "127.0.0.1:0")
    assert time.monotonic() - t0 < 10 and connects == []
    # loopback, or the explicit opt-in, are accepted (nothing connects until a job runs)
    DaskExecutor("tcp://127.0.0.1:8786", url).close()
    monkeypatch.setenv("MLSIGNAL_DASK_ALLOW_PLAINTEXT", "1")
    monkeypatch.setenv("MLSIGNAL_DASK_SCHEDULER", "tcp://10.1.2.3:8786")
    assert Settings.from_env().dask_allow_plaintext
    DaskExecutor("tcp://10.1.2.3:8786", url).close()
    assert connects == []
    # TLS files with a tcp:// address, or only some of them, are configuration errors too
    monkeypatch.setenv("MLSIGNAL_DASK_TLS_CA", str(tmp_path / "ca.pem"))
    with pytest.raises(ValueError, match="must be set together"):
        Settings.from_env()
    monkeypatch.setenv("MLSIGNAL_DASK_TLS_CERT", str(tmp_path / "c.pem"))
    monkeypatch.setenv("MLSIGNAL_DASK_TLS_KEY", str(tmp_path / "k.pem"))
    with pytest.raises(ValueError, match=re.escape("must be tls://10.1.2.3:8786")):
        Settings.from_env()


def test_the_training_server_exits_with_one_line_for_a_plaintext_remote_scheduler(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    upgrade(f"sqlite:///{tmp_path}/x.db")
    env.update(MLSIGNAL_DATABASE_URL=f"sqlite:///{tmp_path}/x.db", MLSIGNAL_TRAINING_ADDR="127.0.0.1:0",
               MLSIGNAL_DASK_SCHEDULER="tcp://10.1.2.3:8786")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "training_service.server"], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().startswith("mlsignal-training: configuration error: MLSIGNAL_DASK_SCHEDULER="
                                          "'tcp://10.1.2.3:8786': refusing an unencrypted"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and time.monotonic() - t0 < 30
