"""Production behaviour: SIGTERM draining, database outages, bearer tokens, TLS, metrics, access logs, absurd input.

Real server processes where process behaviour matters (signals, exit codes, stderr); in-process servers elsewhere.
Models are tiny (5 trees on 4,000 candles), so the whole file runs in about a minute.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from test_inference_service import candles_of

from certificates import make_ca
from conftest import _free_port
from mlsignal.client import connect_channel
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from postgres import started_cluster
from service_fixtures import load_market, ts, wait_job
from shared.settings import Settings, client_security
from shared.store.db import make_engine, training_jobs

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cr3t-token-for-tests"
AUTH = [("authorization", f"Bearer {TOKEN}")]
TINY = common_pb2.ModelParams(n_estimators=5)
SYMBOL, TF = "BTC/USD", "1h"
N_CANDLES = 4000
MAX_BATCH = 2000
TRAINING_SERVICE = "mlsignal.v1.TrainingService"
INFERENCE_SERVICE = "mlsignal.v1.InferenceService"
FINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}


def _env(**values) -> dict:
    """The test's environment without any MLSIGNAL_* variable of the caller, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    env.update({k: str(v) for k, v in values.items()})
    return env


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _predict_request(frame, n=None, **kw):
    rows = frame if n is None else frame.iloc[:n]
    return inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=candles_of(rows), **kw)


# ----------------------------------------------------------------------------------------------------------------------
# fixtures


class Secured:
    """Both services in-process with a bearer token and metrics, over one SQLite database with one tiny model."""

    def __init__(self, root: Path, frame):
        self.url = f"sqlite:///{root}/mlsignal.db"
        self.model_dir = root / "models"
        self.frame = frame.iloc[:N_CANDLES].reset_index(drop=True)
        load_market(self.url, self.frame)
        from inference_service.server import start as start_inference
        from training_service.server import start as start_training

        base = Settings(database_url=self.url, model_dir=self.model_dir, model_poll_seconds=0.2, auth_token=TOKEN,
                        max_batch=MAX_BATCH)
        self.training = start_training(replace(base, metrics_port=_free_port()), "127.0.0.1:0")
        self.inference = start_inference(replace(base, metrics_port=_free_port()), "127.0.0.1:0")
        self.train_target = f"127.0.0.1:{self.training.port}"
        self.infer_target = f"127.0.0.1:{self.inference.port}"
        self.train_channel = grpc.insecure_channel(self.train_target)
        self.infer_channel = grpc.insecure_channel(self.infer_target)
        self.train_stub = training_pb2_grpc.TrainingServiceStub(self.train_channel)
        self.infer_stub = inference_pb2_grpc.InferenceServiceStub(self.infer_channel)
        job = self.train_stub.StartTraining(
            training_pb2.StartTrainingRequest(symbol=SYMBOL, timeframe=TF, params=TINY), timeout=30, metadata=AUTH)
        done = _wait_job(self.train_stub, job.job_id)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        self.model_id = done.model_id
        self.job_id = done.job_id
        # a tiny forest may not pass the promotion gate; these tests are about the servers, so it serves regardless
        self.train_stub.PromoteModel(training_pb2.PromoteModelRequest(model_id=self.model_id, reason="test"),
                                     timeout=30, metadata=AUTH)

    def close(self) -> None:
        self.train_channel.close()
        self.infer_channel.close()
        self.inference.stop(0.5)
        self.training.stop(0.5)


def _wait_job(stub, job_id: str, timeout: float = 120, metadata=AUTH) -> training_pb2.TrainingJob:
    for job in stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=timeout,
                                     metadata=metadata):
        if job.state in FINAL:
            return job
    raise AssertionError(f"job {job_id} ended its watch without a final state")


@pytest.fixture(scope="module")
def secured(tmp_path_factory, sample_frame):
    s = Secured(tmp_path_factory.mktemp("secured"), sample_frame)
    yield s
    s.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A CA and a server certificate for 127.0.0.1 and localhost signed by it (PEM files)."""
    return make_ca(tmp_path_factory.mktemp("tls"), "mlsignal")


def _spawn(module: str, env: dict, tag: str, stderr_path: Path):
    """A server as a real process; returns (process, port). stderr goes to a file, stdout is drained."""
    with open(stderr_path, "w") as err:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO, stdout=subprocess.PIPE,
                                stderr=err, text=True)
    for line in proc.stdout:
        if line.startswith(f"{tag} listening on port"):
            port = int(line.split()[-1])
            break
    else:
        proc.wait(10)
        raise AssertionError(f"{tag} did not start: {stderr_path.read_text()}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, port


class Feed:
    """A request iterator the test feeds one message at a time."""

    def __init__(self):
        self.q: queue.Queue = queue.Queue()

    def send(self, msg) -> None:
        self.q.put(msg)

    def close(self) -> None:
        self.q.put(None)

    def __iter__(self):
        while (msg := self.q.get()) is not None:
            yield msg


# ----------------------------------------------------------------------------------------------------------------------
# SIGTERM


def test_sigterm_drains_an_open_stream_refuses_new_calls_and_exits_0(secured, tmp_path):
    grace = 6.0
    log_path = tmp_path / "inference.stderr"
    env = _env(MLSIGNAL_DATABASE_URL=secured.url, MLSIGNAL_MODEL_DIR=secured.model_dir,
               MLSIGNAL_INFERENCE_ADDR="127.0.0.1:0", MLSIGNAL_GRACE_SECONDS=grace, MLSIGNAL_LOG_FORMAT="json")
    proc, port = _spawn("inference_service.server", env, "mlsignal-inference", log_path)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    try:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        statuses: queue.Queue = queue.Queue()
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=INFERENCE_SERVICE))

        def follow():
            try:
                for reply in watch:
                    statuses.put(reply.status)
            except grpc.RpcError:  # cancelled at the end of the test
                pass

        threading.Thread(target=follow, daemon=True).start()
        assert statuses.get(timeout=10) == health_pb2.HealthCheckResponse.SERVING

        frame = secured.frame
        feed = Feed()
        responses = stub.StreamPredict(iter(feed), timeout=60)
        feed.send(_predict_request(frame.iloc[:300]))
        first = next(responses)
        assert first.model_id == secured.model_id and len(first.predictions) == 300

        # a message is in flight when the signal arrives
        feed.send(inference_pb2.PredictRequest(candles=candles_of(frame.iloc[300:1300])))
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        in_flight = next(responses)
        assert len(in_flight.predictions) == 1000 and in_flight.predictions[-1].ready

        # health flips to NOT_SERVING, and new calls are refused
        assert statuses.get(timeout=5) == health_pb2.HealthCheckResponse.NOT_SERVING
        deadline = time.monotonic() + 3
        with grpc.insecure_channel(target) as fresh:
            fresh_stub = inference_pb2_grpc.InferenceServiceStub(fresh)
            while True:
                try:
                    fresh_stub.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=1)
                except grpc.RpcError as exc:
                    assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc
                    break
                assert time.monotonic() < deadline, "a new call was still accepted after SIGTERM"
                time.sleep(0.05)

        # the open stream still answers within the grace period, then ends normally
        feed.send(inference_pb2.PredictRequest(candles=candles_of(frame.iloc[1300:1301])))
        last = next(responses)
        assert len(last.predictions) == 1 and last.predictions[0].ready
        feed.close()
        assert list(responses) == []
        watch.cancel()
        assert proc.wait(grace + 5) == 0
        assert time.monotonic() - t0 < grace, "the process outlived its grace period"
    finally:
        channel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)

    # structured access log: one JSON object per line, method/status/duration/model_id, never candle data
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    access = [r for r in lines if r["logger"] == "mlsignal.access"]
    stream = [r for r in access if r["method"].endswith("/StreamPredict")]
    assert stream and stream[0]["status"] == "OK" and stream[0]["model_id"] == secured.model_id
    assert stream[0]["messages_in"] == 3 and stream[0]["messages_out"] == 3 and stream[0]["duration_ms"] > 0
    text = log_path.read_text()
    for value in frame.close.iloc[:1301:97]:
        assert repr(float(value)) not in text and f"{value:.2f}" not in text


def test_sigterm_with_a_running_job_exits_0_and_leaves_no_partial_files(tmp_path, sample_frame):
    url = f"sqlite:///{tmp_path}/t.db"
    models = tmp_path / "models"
    load_market(url, sample_frame.iloc[:3000])
    env = _env(MLSIGNAL_DATABASE_URL=url, MLSIGNAL_MODEL_DIR=models, MLSIGNAL_TRAINING_ADDR="127.0.0.1:0",
               MLSIGNAL_GRACE_SECONDS=1)
    proc, port = _spawn("training_service.server", env, "mlsignal-training", tmp_path / "training.stderr")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            job = stub.StartTraining(training_pb2.StartTrainingRequest(
                symbol=SYMBOL, timeframe=TF, params=common_pb2.ModelParams(n_estimators=4000)), timeout=10)
            watch = stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id), timeout=60)
            for update in watch:
                if update.stage == "fitting":
                    break
            watch.cancel()
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    engine = make_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.select(training_jobs).where(training_jobs.c.job_id == job.job_id)).one()
    engine.dispose()
    assert (row.state == "FAILED" and "interrupted" in row.error) or row.state == "SUCCEEDED", (row.state, row.error)
    assert not [p.name for p in models.iterdir() if p.name.endswith(".partial")]
    assert "Traceback" not in (tmp_path / "training.stderr").read_text()


# ----------------------------------------------------------------------------------------------------------------------
# the database


def test_unusable_database_at_start_is_one_clear_line(tmp_path):
    # (an unreachable PostgreSQL is an outage, not a start-up error: tests/integration/test_postgres_outage.py)
    urls = {"sqlite": "sqlite:////proc/mlsignal-does-not-exist/mlsignal.db"}
    procs = {}
    for kind, url in urls.items():
        for module, tag in (("training_service.server", "mlsignal-training"),
                            ("inference_service.server", "mlsignal-inference")):
            env = _env(MLSIGNAL_DATABASE_URL=url, MLSIGNAL_MODEL_DIR=tmp_path / "models",
                       MLSIGNAL_TRAINING_ADDR="127.0.0.1:0", MLSIGNAL_INFERENCE_ADDR="127.0.0.1:0")
            procs[(kind, tag)] = subprocess.Popen([sys.executable, "-m", module], env=env, cwd=REPO, text=True,
                                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for (kind, tag), proc in procs.items():
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, (kind, tag, proc.returncode, err)
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, (kind, tag, err)
        assert lines[0].startswith(f"{tag}: cannot use the database "), lines[0]
        assert "listening" not in out
        assert "/proc/mlsignal-does-not-exist" in lines[0] and "mlsignal db upgrade" in lines[0], lines[0]


@pytest.fixture(scope="module")
def own_pg():
    """A PostgreSQL cluster of this module's own, so stopping it disturbs no other test."""
    with started_cluster("mlsignal-pg-outage-") as cluster:
        yield cluster


@pytest.mark.postgres
def test_database_outage_gives_unavailable_and_calls_recover(own_pg, tmp_path, sample_frame):
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    load_market(own_pg.url(), sample_frame.iloc[:3000])
    settings = Settings(database_url=own_pg.url(), model_dir=tmp_path / "models", model_poll_seconds=0.2)
    training = start_training(settings, "127.0.0.1:0")
    inference = start_inference(settings, "127.0.0.1:0")
    tch = grpc.insecure_channel(f"127.0.0.1:{training.port}")
    ich = grpc.insecure_channel(f"127.0.0.1:{inference.port}")
    try:
        tstub, istub = training_pb2_grpc.TrainingServiceStub(tch), inference_pb2_grpc.InferenceServiceStub(ich)
        job = tstub.StartTraining(training_pb2.StartTrainingRequest(symbol=SYMBOL, timeframe=TF, params=TINY),
                                  timeout=30)
        done = wait_job(tstub, job.job_id, timeout=120)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        request = _predict_request(sample_frame, 300)
        get_job = lambda: tstub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job.job_id), timeout=10)  # noqa: E731
        get_model = lambda: istub.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=10)  # noqa: E731

        own_pg.stop()
        assert _code(get_job) == grpc.StatusCode.UNAVAILABLE
        assert _code(lambda: tstub.ListModels(training_pb2.ListModelsRequest(), timeout=10)) == \
            grpc.StatusCode.UNAVAILABLE
        assert _code(get_model) == grpc.StatusCode.UNAVAILABLE  # the model is not loaded yet: it needs the registry
        with pytest.raises(grpc.RpcError) as err:
            istub.Predict(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "database" in err.value.details()
        health = health_pb2_grpc.HealthStub(ich).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING  # the process itself is fine

        own_pg.start()
        deadline = time.monotonic() + 20
        while True:
            try:
                assert get_model().model_id == done.model_id
                assert get_job().state == training_pb2.JOB_STATE_SUCCEEDED
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, exc
                time.sleep(0.2)
        assert istub.Predict(request, timeout=10).model_id == done.model_id

        # a loaded model keeps serving through an outage: Predict needs no database once it is in memory
        own_pg.stop()
        assert len(istub.Predict(request, timeout=10).predictions) == 300
        own_pg.start()
    finally:
        tch.close()
        ich.close()
        inference.stop(0.5)
        training.stop(0.5)


# ----------------------------------------------------------------------------------------------------------------------
# bearer token and TLS


def test_bearer_token_is_required_except_for_health(secured, capsys, monkeypatch):
    istub, tstub = secured.infer_stub, secured.train_stub
    request = _predict_request(secured.frame, 200)
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", TOKEN)],
                     [("authorization", f"Basic {TOKEN}")], [("x-token", TOKEN)]):
        assert _code(lambda md=metadata: istub.Predict(request, timeout=10, metadata=md)) == \
            grpc.StatusCode.UNAUTHENTICATED, metadata
    assert _code(lambda: list(istub.StreamPredict(iter([request]), timeout=10))) == grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: tstub.ListModels(training_pb2.ListModelsRequest(), timeout=10)) == \
        grpc.StatusCode.UNAUTHENTICATED
    assert _code(lambda: list(tstub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=secured.job_id),
                                                     timeout=10))) == grpc.StatusCode.UNAUTHENTICATED
    reflection = reflection_pb2_grpc.ServerReflectionStub(secured.infer_channel)
    assert _code(lambda: list(reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))) == \
        grpc.StatusCode.UNAUTHENTICATED

    # the right token works: raw metadata, the client SDK, and MLSIGNAL_AUTH_TOKEN through client_security()
    assert istub.Predict(request, timeout=10, metadata=AUTH).model_id == secured.model_id
    assert istub.Predict(request, timeout=10, metadata=[("authorization", f"bearer  {TOKEN} ")]).model_id
    assert [m.model_id for m in tstub.ListModels(training_pb2.ListModelsRequest(), timeout=10,
                                                 metadata=AUTH).models] == [secured.model_id]
    monkeypatch.setenv("MLSIGNAL_AUTH_TOKEN", TOKEN)
    monkeypatch.delenv("MLSIGNAL_TLS_CA", raising=False)
    security = client_security()
    assert security == {"tls": False, "root_certificates": None, "token": TOKEN}
    with connect_channel(secured.infer_target, **security) as channel:
        got = inference_pb2_grpc.InferenceServiceStub(channel).GetModel(
            inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=10)
        assert got.model_id == secured.model_id
        assert len(list(inference_pb2_grpc.InferenceServiceStub(channel).StreamPredict(iter([request]),
                                                                                       timeout=10))) == 1

    # health needs no token
    monkeypatch.delenv("MLSIGNAL_AUTH_TOKEN")
    for channel, service in ((secured.infer_channel, INFERENCE_SERVICE), (secured.train_channel, TRAINING_SERVICE)):
        for name in ("", service):
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    from mlsignal.cli import main as cli

    capsys.readouterr()
    assert cli(["health", "--target", secured.infer_target, "--service", INFERENCE_SERVICE]) == 0
    assert capsys.readouterr().out.strip() == "SERVING"
    assert cli(["health", "--target", secured.train_target, "--service", "no.such.Service"]) == 1
    assert cli(["health", "--target", f"127.0.0.1:{_free_port()}", "--timeout", "0.5"]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_tls_server_accepts_clients_with_the_ca_and_refuses_plaintext(secured, tls_files, capsys, monkeypatch):
    from inference_service.server import start as start_inference

    settings = Settings(database_url=secured.url, model_dir=secured.model_dir, tls_cert=tls_files["cert"],
                        tls_key=tls_files["key"], auth_token=TOKEN)
    running = start_inference(settings, "127.0.0.1:0")
    target = f"127.0.0.1:{running.port}"
    ca = tls_files["ca"].read_bytes()
    get = inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF)
    try:
        with connect_channel(target, tls=True, root_certificates=ca, token=TOKEN) as channel:
            assert inference_pb2_grpc.InferenceServiceStub(channel).GetModel(get, timeout=10).model_id == \
                secured.model_id
        with connect_channel(target, tls=True, root_certificates=ca) as channel:  # TLS but no token
            assert _code(lambda: inference_pb2_grpc.InferenceServiceStub(channel).GetModel(get, timeout=10)) == \
                grpc.StatusCode.UNAUTHENTICATED
        with grpc.insecure_channel(target) as channel:  # plaintext against TLS
            assert _code(lambda: inference_pb2_grpc.InferenceServiceStub(channel).GetModel(
                get, timeout=3, metadata=AUTH)) == grpc.StatusCode.UNAVAILABLE
        with connect_channel(target, tls=True, token=TOKEN) as channel:  # system roots do not trust the test CA
            assert _code(lambda: inference_pb2_grpc.InferenceServiceStub(channel).GetModel(get, timeout=3)) == \
                grpc.StatusCode.UNAVAILABLE

        # the client security settings from the environment: MLSIGNAL_TLS_CA turns TLS on
        monkeypatch.setenv("MLSIGNAL_TLS_CA", str(tls_files["ca"]))
        monkeypatch.setenv("MLSIGNAL_AUTH_TOKEN", TOKEN)
        security = client_security()
        assert security["tls"] and security["root_certificates"] == ca and security["token"] == TOKEN
        with connect_channel(target, **security) as channel:
            assert inference_pb2_grpc.InferenceServiceStub(channel).GetModel(get, timeout=10).model_id
        from mlsignal.cli import main as cli

        capsys.readouterr()
        assert cli(["health", "--target", target]) == 0  # TLS from MLSIGNAL_TLS_CA
        monkeypatch.delenv("MLSIGNAL_TLS_CA")
        assert cli(["health", "--target", target, "--timeout", "2"]) == 1  # plaintext is refused
        assert cli(["health", "--target", f"localhost:{running.port}", "--ca-cert", str(tls_files["ca"])]) == 0
        assert cli(["health", "--target", target, "--ca-cert", str(tls_files["ca"]), "--server-name",
                    "elsewhere.example", "--timeout", "2"]) == 1  # the certificate does not name that host
        with pytest.raises(ValueError, match="MLSIGNAL_TLS_CA"):
            monkeypatch.setenv("MLSIGNAL_TLS_CA", str(tls_files["ca"].parent / "missing.pem"))
            client_security()
    finally:
        running.stop(0.5)


def test_tls_settings_are_checked(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("MLSIGNAL_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLSIGNAL_TLS_CERT", str(tmp_path / "cert.pem"))
    with pytest.raises(ValueError, match="MLSIGNAL_TLS_CERT and MLSIGNAL_TLS_KEY"):
        Settings.from_env()
    monkeypatch.setenv("MLSIGNAL_TLS_KEY", str(tmp_path / "key.pem"))
    with pytest.raises(ValueError, match=r"MLSIGNAL_TLS_CERT=.*cannot read"):
        Settings.from_env().server_tls_pair()
    monkeypatch.delenv("MLSIGNAL_TLS_CERT")
    monkeypatch.delenv("MLSIGNAL_TLS_KEY")
    monkeypatch.setenv("MLSIGNAL_AUTH_TOKEN", "has a space")
    with pytest.raises(ValueError, match="MLSIGNAL_AUTH_TOKEN"):
        Settings.from_env()
    monkeypatch.setenv("MLSIGNAL_AUTH_TOKEN", TOKEN)
    assert TOKEN not in repr(Settings.from_env())
    # a server whose TLS files cannot be read says so on one line and exits 2
    env = _env(MLSIGNAL_DATABASE_URL=f"sqlite:///{tmp_path}/x.db", MLSIGNAL_INFERENCE_ADDR="127.0.0.1:0",
               MLSIGNAL_TLS_CERT=tmp_path / "cert.pem", MLSIGNAL_TLS_KEY=tmp_path / "key.pem")
    proc = subprocess.run([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("mlsignal-inference: configuration error: MLSIGNAL_TLS_CERT=")


# ----------------------------------------------------------------------------------------------------------------------
# metrics and access logs


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples, name: str, **labels) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def test_metrics_count_rpcs_by_method_and_code_and_candles_predicted(secured):
    iport = secured.inference.handle.metrics.port
    tport = secured.training.handle.metrics.port
    assert iport and tport and iport != tport
    before = _scrape(iport)
    istub = secured.infer_stub
    frame = secured.frame
    for _ in range(3):
        istub.Predict(_predict_request(frame, 250), timeout=10, metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        istub.GetModel(inference_pb2.GetModelRequest(symbol="ETH/USD", timeframe=TF), timeout=10, metadata=AUTH)
    with pytest.raises(grpc.RpcError):
        istub.Predict(_predict_request(frame, 10), timeout=10)  # no token
    chunks = [frame.iloc[:200], frame.iloc[200:201], frame.iloc[201:205]]
    reqs = [inference_pb2.PredictRequest(symbol=SYMBOL if i == 0 else "", timeframe=TF if i == 0 else "",
                                         candles=candles_of(c)) for i, c in enumerate(chunks)]
    assert len(list(istub.StreamPredict(iter(reqs), timeout=10, metadata=AUTH))) == 3
    after = _scrape(iport)

    def delta(name, **labels):
        return _value(after, name, **labels) - _value(before, name, **labels)

    svc = {"grpc_service": INFERENCE_SERVICE}
    assert delta("grpc_server_handled_total", **svc, grpc_method="Predict", grpc_code="OK") == 3
    assert delta("grpc_server_handled_total", **svc, grpc_method="Predict", grpc_code="UNAUTHENTICATED") == 1
    assert delta("grpc_server_handled_total", **svc, grpc_method="GetModel", grpc_code="NOT_FOUND") == 1
    assert delta("grpc_server_handled_total", **svc, grpc_method="StreamPredict", grpc_code="OK",
                 grpc_type="bidi_stream") == 1
    assert delta("grpc_server_started_total", **svc, grpc_method="Predict") == 4
    assert delta("grpc_server_msg_received_total", **svc, grpc_method="StreamPredict") == 3
    assert delta("grpc_server_msg_sent_total", **svc, grpc_method="StreamPredict") == 3
    assert delta("mlsignal_stream_message_seconds_count", **svc, grpc_method="StreamPredict") == 3
    assert delta("grpc_server_handling_seconds_count", **svc, grpc_method="Predict") == 4
    assert delta("mlsignal_candles_predicted_total", symbol=SYMBOL, timeframe=TF) == 3 * 250 + 205
    assert _value(after, "mlsignal_models_loaded", symbol=SYMBOL, timeframe=TF, model_id=secured.model_id,
                  role="serving") == 1
    assert _value(after, "mlsignal_build_info", service="inference") == 1
    assert _value(after, "process_resident_memory_bytes") > 0

    training = _scrape(tport)
    assert _value(training, "mlsignal_training_jobs", state="SUCCEEDED") >= 1
    assert _value(training, "mlsignal_database_up") == 1
    assert _value(training, "mlsignal_training_job_duration_seconds_count", state="SUCCEEDED") >= 1
    assert _value(training, "grpc_server_handled_total", grpc_service=TRAINING_SERVICE,
                  grpc_method="StartTraining", grpc_code="OK") >= 1
    assert not any(n.startswith("mlsignal_candles") for n, _ in training)  # separate registries per server


def test_access_log_has_the_structured_fields(secured, caplog):
    from shared.server.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="mlsignal.access")
    secured.infer_stub.Predict(_predict_request(secured.frame, 150), timeout=10, metadata=AUTH)
    secured.train_stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=secured.job_id), timeout=10,
                                      metadata=AUTH)
    health_pb2_grpc.HealthStub(secured.infer_channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    records = [r for r in caplog.records if r.name == "mlsignal.access"]
    predict = next(r for r in records if r.method.endswith("InferenceService/Predict"))
    assert predict.status == "OK" and predict.model_id == secured.model_id and predict.duration_ms > 0
    job = next(r for r in records if r.method.endswith("TrainingService/GetTrainingJob"))
    assert job.job_id == secured.job_id and job.model_id == secured.model_id
    assert not any(r.method.startswith("/grpc.health") for r in records)  # health checks log at DEBUG
    line = json.loads(JsonFormatter().format(predict))
    assert {"ts", "level", "logger", "message", "method", "status", "duration_ms", "model_id"} <= set(line)
    assert line["logger"] == "mlsignal.access" and line["status"] == "OK"


# ----------------------------------------------------------------------------------------------------------------------
# absurd input


def test_absurd_parameters_are_refused_and_the_services_keep_answering(secured):
    tstub, istub = secured.train_stub, secured.infer_stub
    start = training_pb2.StartTrainingRequest
    absurd = [
        start(symbol=SYMBOL, timeframe=TF, params=common_pb2.ModelParams(n_estimators=10**9)),
        start(symbol=SYMBOL, timeframe=TF, label=common_pb2.LabelSpec(horizon_bars=10**9)),
        start(symbol=SYMBOL, timeframe=TF, params=common_pb2.ModelParams(max_depth=10**9)),
        start(symbol=SYMBOL, timeframe=TF, start_time=ts("1950-01-01"), end_time=ts("2050-01-01")),
        start(symbol=SYMBOL, timeframe=TF, start_time=ts("0001-01-01"), end_time=ts("9999-12-31")),
        start(symbol=SYMBOL, timeframe=TF, label=common_pb2.LabelSpec(threshold=1e300)),
    ]
    jobs_before = len(tstub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10,
                                             metadata=AUTH).jobs)
    for req in absurd:
        code = _code(lambda r=req: tstub.StartTraining(r, timeout=10, metadata=AUTH))
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                        grpc.StatusCode.FAILED_PRECONDITION), (req, code)
    assert len(tstub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10,
                                      metadata=AUTH).jobs) == jobs_before
    frame = secured.frame
    # more candles than MLSIGNAL_MAX_BATCH, in a message that fits
    assert _code(lambda: istub.Predict(_predict_request(frame, MAX_BATCH + 1), timeout=10, metadata=AUTH)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    # messages bigger than the servers accept
    huge = "X" * (20 * 1024 * 1024)
    assert _code(lambda: istub.Predict(inference_pb2.PredictRequest(symbol=huge, timeframe=TF), timeout=30,
                                       metadata=AUTH)) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(lambda: list(istub.StreamPredict(iter([inference_pb2.PredictRequest(symbol=huge, timeframe=TF)]),
                                                  timeout=30, metadata=AUTH))) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _code(lambda: tstub.StartTraining(start(symbol=huge, timeframe=TF), timeout=30, metadata=AUTH)) == \
        grpc.StatusCode.RESOURCE_EXHAUSTED
    # absurd times inside an otherwise valid request
    bad = candles_of(frame.iloc[:3])
    bad[1].open_time_ms = 2**62
    assert _code(lambda: istub.Predict(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=bad),
                                       timeout=10, metadata=AUTH)) == grpc.StatusCode.INVALID_ARGUMENT
    # still serving
    for channel in (secured.infer_channel, secured.train_channel):
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING
    assert istub.Predict(_predict_request(frame, MAX_BATCH), timeout=30, metadata=AUTH).model_id == secured.model_id
    assert tstub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=secured.job_id), timeout=10,
                                metadata=AUTH).state == training_pb2.JOB_STATE_SUCCEEDED
