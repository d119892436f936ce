"""Security rules end to end: a bearer token only travels over TLS or to this machine (Python and Node.js clients),
a server refuses to serve a token in plaintext on the network, a request whose bytes are not a message is
authenticated, counted and logged like any other, out-of-range times are INVALID_ARGUMENT naming the field, and error
messages do not show server paths.

Servers are in-process on 127.0.0.1:0 over their own SQLite database, except where process behaviour (exit status,
stderr) is the point.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from test_model_store_faults import BTC, Registry
from test_model_store_faults import predict as predict_btc
from test_production import _env, tls_files  # noqa: F401 - the module fixture with a test CA

from conftest import _free_port
from mlsignal import client as mc
from mlsignal.client.channel import is_local_target
from mlsignal.v1 import inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from shared.settings import Settings
from shared.store.migrate import upgrade

REPO = Path(__file__).resolve().parents[2]
TOKEN = "t0ken-for-security-tests"
REMOTE = ["10.1.2.3:50052", "dns:///inference.internal:50052", "inference.internal:50052", "[2001:db8::1]:50052",
          "ipv4:127.0.0.1:50052,10.0.0.1:50052", "dns://8.8.8.8/localhost.example:50052", "example.com"]
LOCAL = ["127.0.0.1:50052", "127.1.2.3:1", "localhost:50052", "localhost", "[::1]:50052", "dns:///localhost:50052",
         "ipv4:127.0.0.1:1,127.0.0.2:2", "ipv6:[::1]:50052", "unix:/run/mlsignal.sock", "unix-abstract:mlsignal"]


@pytest.fixture
def channel_spy(monkeypatch):
    """Counts the channels gRPC is asked to create (a spy: the real functions still run)."""
    calls: list[str] = []
    for name in ("insecure_channel", "secure_channel", "intercept_channel"):
        real = getattr(grpc, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(grpc, name, spy)
    return calls


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Training and inference with a bearer token, plaintext on 127.0.0.1, an empty registry."""
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    root = tmp_path_factory.mktemp("security")
    url = f"sqlite:///{root}/mlsignal.db"
    upgrade(url)
    settings = Settings(database_url=url, model_dir=root / "models", auth_token=TOKEN, model_poll_seconds=0.2)
    training = start_training(settings, "127.0.0.1:0")
    inference = start_inference(settings, "127.0.0.1:0")
    yield settings, training, inference
    inference.stop(0.5)
    training.stop(0.5)


def test_target_locality():
    for target in LOCAL:
        assert is_local_target(target), target
    for target in REMOTE:
        assert not is_local_target(target), target


def test_a_token_for_a_remote_plaintext_target_is_refused_before_any_channel_exists(channel_spy, capsys):
    for target in REMOTE:
        with pytest.raises(ValueError, match="refusing to send the bearer token in clear text"):
            mc.connect_channel(target, token=TOKEN)
        with pytest.raises(ValueError, match="allow_insecure_token=True"):
            mc.TrainingClient(target, token=TOKEN)
        with pytest.raises(ValueError, match="--insecure-token"):
            mc.InferenceClient(target, token=TOKEN)
    assert channel_spy == []
    # the CLI says so on one line, exit 2, without dialling
    from mlsignal.cli import main as cli

    assert cli(["jobs", "--target", "10.1.2.3:50051", "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "clear text" in err and "--insecure-token" in err
    assert channel_spy == []
    # without a token, or with TLS, or with the explicit opt-in, a channel is made (lazily: nothing is dialled)
    mc.connect_channel("10.1.2.3:50052").close()
    mc.connect_channel("10.1.2.3:50052", token=TOKEN, tls=True).close()
    mc.connect_channel("10.1.2.3:50052", token=TOKEN, allow_insecure_token=True).close()
    mc.TrainingClient("10.1.2.3:50052", token=TOKEN, allow_insecure_token=True).close()
    assert channel_spy == ["insecure_channel", "secure_channel", "insecure_channel", "intercept_channel",
                           "insecure_channel", "intercept_channel"]


def test_cli_insecure_token_flag_is_passed_through():
    from mlsignal.cli import build_parser
    from mlsignal.cli.security import security_kwargs

    args = build_parser().parse_args(["jobs", "--target", "10.1.2.3:1", "--token", TOKEN, "--insecure-token"])
    kwargs = security_kwargs(args)
    assert kwargs["allow_insecure_token"] is True and kwargs["token"] == TOKEN
    with mc.TrainingClient(args.target, **kwargs):
        pass


def test_a_loopback_plaintext_target_works_with_a_token_over_local_credentials(secured, channel_spy):
    _settings, training, inference = secured
    for target in (f"127.0.0.1:{inference.port}", f"localhost:{inference.port}", f"dns:///localhost:{inference.port}",
                   f"ipv4:127.0.0.1:{inference.port}"):
        with mc.InferenceClient(target, token=TOKEN, timeout=10) as c, \
                pytest.raises(mc.NotFoundError):  # authenticated: the registry is just empty
            c.get_model(BTC, "1h")
        with mc.InferenceClient(target, token="wrong-token", timeout=10) as c, \
                pytest.raises(mc.UnauthenticatedError):
            c.get_model(BTC, "1h")
    with mc.TrainingClient(f"127.0.0.1:{training.port}", token=TOKEN, timeout=10) as t:
        assert t.list_models(BTC, "1h") == []
        stub = training_pb2_grpc.TrainingServiceStub(t.channel)
        assert list(stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10).jobs) == []
    assert "insecure_channel" not in channel_spy and "intercept_channel" not in channel_spy  # local credentials


def test_tls_with_a_test_ca_end_to_end(secured, tls_files):  # noqa: F811
    from inference_service.server import start as start_inference

    settings, _training, _inference = secured
    tls = Settings(database_url=settings.database_url, model_dir=settings.model_dir, auth_token=TOKEN,
                   tls_cert=tls_files["cert"], tls_key=tls_files["key"])
    running = start_inference(tls, "127.0.0.1:0")
    ca = tls_files["ca"].read_bytes()
    try:
        for host in ("127.0.0.1", "localhost"):
            with mc.InferenceClient(f"{host}:{running.port}", tls=True, root_certificates=ca, token=TOKEN,
                                    timeout=10) as c, pytest.raises(mc.NotFoundError):
                c.get_model(BTC, "1h")
        with mc.InferenceClient(f"127.0.0.1:{running.port}", tls=True, root_certificates=ca, token="nope",
                                timeout=10) as c, pytest.raises(mc.UnauthenticatedError):
            c.get_model(BTC, "1h")
    finally:
        running.stop(0.5)


def test_a_server_refuses_a_plaintext_token_on_the_network(tmp_path):
    from shared.server.builder import plaintext_token_problem

    s = Settings(auth_token=TOKEN)
    for address in ("0.0.0.0:50052", "[::]:50052", "10.1.2.3:50052", ":50052"):
        assert "MLSIGNAL_ALLOW_PLAINTEXT_TOKEN=1" in plaintext_token_problem(s, address), address
    for address in ("127.0.0.1:0", "localhost:50052", "[::1]:50052", "unix:/tmp/x.sock"):
        assert plaintext_token_problem(s, address) is None, address
    assert plaintext_token_problem(Settings(), "0.0.0.0:50052") is None  # no token, nothing to leak
    assert plaintext_token_problem(Settings(auth_token=TOKEN, allow_plaintext_token=True), "0.0.0.0:1") is None

    url = f"sqlite:///{tmp_path}/x.db"
    upgrade(url)
    env = _env(MLSIGNAL_DATABASE_URL=url, MLSIGNAL_MODEL_DIR=tmp_path / "models", MLSIGNAL_INFERENCE_ADDR="0.0.0.0:0",
               MLSIGNAL_AUTH_TOKEN=TOKEN)
    proc = subprocess.run([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("mlsignal-inference: refusing to serve a bearer token (MLSIGNAL_AUTH_TOKEN) over "
                           "plaintext on 0.0.0.0:0"), proc.stderr
    assert "WARNING" in proc.stderr or "warning" in proc.stderr  # logged as well
    # the explicit opt-in starts it
    env["MLSIGNAL_ALLOW_PLAINTEXT_TOKEN"] = "1"
    proc2 = subprocess.Popen([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = proc2.stdout.readline()
        assert line.startswith("mlsignal-inference listening on port"), (line, proc2.stderr.read())
    finally:
        proc2.terminate()
        proc2.wait(30)


UNDECODABLE = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length-delimited, longer than the message: never decodes


def test_an_undecodable_request_is_authenticated_counted_and_logged(secured, caplog):
    """Garbage bytes without the token are UNAUTHENTICATED (not INVALID_ARGUMENT, which would tell a caller without
    the token how the server parses); with the token INVALID_ARGUMENT. Either way the call is counted in the RPC
    metrics and has its access-log line, for a unary, a server-streaming and a bidirectional method."""
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    settings, _training, _inference = secured
    settings = replace(settings, metrics_port=_free_port())
    training = start_training(settings, "127.0.0.1:0")
    inference = start_inference(replace(settings, metrics_port=_free_port()), "127.0.0.1:0")
    caplog.set_level(logging.INFO, logger="mlsignal.access")
    cases = [(inference, "mlsignal.v1.InferenceService", "Predict", "unary_unary"),
             (inference, "mlsignal.v1.InferenceService", "StreamPredict", "stream_stream"),
             (training, "mlsignal.v1.TrainingService", "WatchTrainingJob", "unary_stream"),
             (training, "mlsignal.v1.TrainingService", "GetTrainingJob", "unary_unary")]
    try:
        for running, service, method, shape in cases:
            registry = running.handle.metrics.registry

            def handled(code: str, service=service, method=method, registry=registry) -> float:
                return registry.get_sample_value("grpc_server_handled_total", {
                    "grpc_service": service, "grpc_method": method, "grpc_code": code,
                    "grpc_type": "bidi_stream" if method == "StreamPredict" else
                    "server_stream" if method == "WatchTrainingJob" else "unary"}) or 0.0

            before = {code: handled(code) for code in ("UNAUTHENTICATED", "INVALID_ARGUMENT")}
            with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                call = getattr(channel, shape)(f"/{service}/{method}")
                for metadata, expected in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                           ([("authorization", "Bearer wrong")], grpc.StatusCode.UNAUTHENTICATED),
                                           ([("authorization", f"Bearer {TOKEN}")],
                                            grpc.StatusCode.INVALID_ARGUMENT)):
                    request = iter([UNDECODABLE]) if shape.startswith("stream") else UNDECODABLE
                    with pytest.raises(grpc.RpcError) as err:
                        answer = call(request, timeout=10, metadata=metadata)
                        if shape.endswith("stream"):
                            list(answer)
                    assert err.value.code() == expected, (method, metadata, err.value)

            def counted(method=method, service=service, handled=handled, before=before) -> tuple:
                logged = [r.status for r in caplog.records
                          if r.name == "mlsignal.access" and r.method == f"/{service}/{method}"]
                return (handled("UNAUTHENTICATED") - before["UNAUTHENTICATED"],
                        handled("INVALID_ARGUMENT") - before["INVALID_ARGUMENT"],
                        logged.count("UNAUTHENTICATED"), logged.count("INVALID_ARGUMENT"))

            # an aborted call's status reaches the client before the server has finished its bookkeeping
            deadline = time.monotonic() + 10
            while counted() != (2, 1, 2, 1) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert counted() == (2, 1, 2, 1), (method, counted())
    finally:
        inference.stop(0.5)
        training.stop(0.5)


def _bad_request_fields(err: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(err)
    fields = []
    for detail in status.details if status else ():
        br = error_details_pb2.BadRequest()
        if detail.Unpack(br):
            fields += [v.field for v in br.field_violations]
    return fields


def test_out_of_range_timestamps_are_invalid_argument_naming_the_field(secured):
    _settings, training, _inference = secured
    from google.protobuf.timestamp_pb2 import Timestamp

    with grpc.insecure_channel(f"127.0.0.1:{training.port}") as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        md = [("authorization", f"Bearer {TOKEN}")]
        cases = [
            ("start_time", {"start_time": Timestamp(seconds=2**40)}),
            ("end_time", {"end_time": Timestamp(seconds=-(2**40))}),
            ("start_time", {"start_time": Timestamp(seconds=1_600_000_000, nanos=-1)}),
            ("end_time", {"end_time": Timestamp(seconds=1_600_000_000, nanos=10**9)}),
            ("start_time", {"start_time": Timestamp(seconds=0)}),  # 1970: before any candle
            ("end_time", {"end_time": Timestamp(seconds=253_402_300_799)}),  # 9999-12-31: valid proto, absurd
        ]
        for field, times in cases:
            req = training_pb2.StartTrainingRequest(symbol=BTC, timeframe="1h", **times)
            with pytest.raises(grpc.RpcError) as err:
                stub.StartTraining(req, timeout=10, metadata=md)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (times, err.value)
            assert err.value.details().startswith(f"{field}: "), err.value.details()
            assert _bad_request_fields(err.value) == [field]
        assert not stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(), timeout=10, metadata=md).jobs


def test_the_only_model_failing_its_sha256_is_data_loss_without_the_server_path(tmp_path):
    from inference_service.server import start

    url = f"sqlite:///{tmp_path}/mlsignal.db"
    upgrade(url)
    model_dir = tmp_path / "models"
    registry = Registry(url, model_dir)
    only = registry.register(BTC, sha256="0" * 64)
    running = start(Settings(database_url=url, model_dir=model_dir, model_poll_seconds=0.2), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            for call in (lambda: predict_btc(stub, BTC), lambda: predict_btc(stub, BTC, model_id=only),
                         lambda: stub.GetModel(inference_pb2.GetModelRequest(symbol=BTC, timeframe="1h"),
                                               timeout=10)):
                with pytest.raises(grpc.RpcError) as err:
                    call()
                details = err.value.details()
                assert err.value.code() in (grpc.StatusCode.DATA_LOSS, grpc.StatusCode.NOT_FOUND), details
                for path in {str(model_dir), str(model_dir.resolve()), str(tmp_path), os.sep + "tmp" + os.sep}:
                    assert path not in details, details
            with pytest.raises(grpc.RpcError) as err:
                predict_btc(stub, BTC)
            assert err.value.code() == grpc.StatusCode.DATA_LOSS and "sha256" in err.value.details()
    finally:
        running.stop(0.5)
        registry.engine.dispose()


def test_node_client_refuses_a_token_for_a_remote_plaintext_target(tmp_path):
    from test_node_client import CLIENT_JS, require_node

    node = require_node()
    candles = tmp_path / "c.json"
    candles.write_text('[{"open_time_ms": 1, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}]')
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    t0 = time.monotonic()
    proc = subprocess.run([node, str(CLIENT_JS), "--target", "10.1.2.3:50052", "--candles", str(candles), "--token",
                           TOKEN], env=env, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 1 and "refusing to send the bearer token in clear text" in proc.stderr
    assert time.monotonic() - t0 < 30 and not proc.stdout  # no call was made
    # to a loopback target the token is allowed: the call is made (and fails: nothing listens on port 1)
    proc = subprocess.run([node, str(CLIENT_JS), "--target", "127.0.0.1:1", "--candles", str(candles), "--token",
                           TOKEN, "--deadline", "3"], env=env, text=True, capture_output=True, timeout=60)
    assert proc.returncode == 1 and '"code_name":"UNAVAILABLE"' in proc.stdout, (proc.stdout, proc.stderr)
    proc = subprocess.run([node, str(CLIENT_JS), "--target", "10.1.2.3:50052", "--candles", str(candles), "--token",
                           TOKEN, "--insecure-token", "--deadline", "1"], env=env, text=True, capture_output=True,
                          timeout=60)
    assert "refusing" not in proc.stderr and '"rpc":"Predict"' in proc.stdout, (proc.stdout, proc.stderr)
