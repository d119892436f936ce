"""Inference replicas behind one client target: two real inference servers on one database and model directory, a
model trained by the real training service, and clients that balance over both with gRPC's round_robin policy.

Each server counts the calls it handled in its own Prometheus registry (`running.handle.metrics`), which shows which
replica served what.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import _free_port
from mlsignal.client import InferenceClient
from mlsignal.v1 import common_pb2
from service_fixtures import load_market, train
from shared.settings import Settings

SERVICE = "mlsignal.v1.InferenceService"
SYMBOL, TF = "BTC/USD", "1h"
CALLS = 40
PROB_COLUMNS = ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY", "ML_IN_SAMPLE", "ML_MODEL_ID"]


def handled(running, method: str, kind: str = "unary") -> int:
    value = running.handle.metrics.registry.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_type": kind, "grpc_service": SERVICE, "grpc_method": method, "grpc_code": "OK"})
    return int(value or 0)


def received(running, method: str) -> int:
    value = running.handle.metrics.registry.get_sample_value(
        "grpc_server_msg_received_total", {"grpc_type": "bidi_stream", "grpc_service": SERVICE, "grpc_method": method})
    return int(value or 0)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, sample_frame):
    from inference_service.server import start as start_inference
    from service_fixtures import start_services, stop_services

    root = tmp_path_factory.mktemp("replicas")
    url = f"sqlite:///{root}/mlsignal.db"
    load_market(url, sample_frame)
    services = start_services(url, root / "models")  # training + a first inference server
    model = train(services.train_stub, start="2018-01-01", end="2018-07-01",
                  params=common_pb2.ModelParams(n_estimators=10))
    servers = []
    try:
        for _ in range(2):
            settings = Settings(database_url=url, model_dir=root / "models", model_poll_seconds=0.2,
                                metrics_port=_free_port())
            servers.append(start_inference(settings, "127.0.0.1:0"))
        yield services, servers, model.model_id
    finally:
        for s in servers:
            s.stop(0.5)
        stop_services(services)


@pytest.fixture(scope="module")
def candles(sample_frame) -> pd.DataFrame:
    part = sample_frame[(sample_frame.open_time_ms >= 1546300800000)].iloc[:300]  # 2019-01-01, out of sample
    frame = part[["open", "high", "low", "close", "volume"]].copy()
    frame.index = pd.DatetimeIndex(pd.to_datetime(part["open_time_ms"].to_numpy(), unit="ms", utc=True))
    return frame


def test_unary_calls_are_spread_over_both_replicas_with_identical_results(replicas, candles):
    _, (a, b), model_id = replicas
    with InferenceClient(f"127.0.0.1:{a.port}") as single:
        expected = single.predict(candles, SYMBOL, TF)
    assert (model_id == expected.ML_MODEL_ID).all() and expected.ML_READY.sum() > 200
    before = handled(a, "Predict"), handled(b, "Predict")
    with InferenceClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as both:
        for _ in range(CALLS):
            got = both.predict(candles, SYMBOL, TF)
            pd.testing.assert_frame_equal(got[PROB_COLUMNS], expected[PROB_COLUMNS])
    served = handled(a, "Predict") - before[0], handled(b, "Predict") - before[1]
    print(f"Predict calls served per replica: {served}")
    assert sum(served) == CALLS, served
    assert min(served) >= CALLS // 4, f"round robin should split the calls, got {served}"


def test_a_dns_target_reaches_the_service(replicas, candles):
    _, (a, _), model_id = replicas
    with InferenceClient(f"dns:///127.0.0.1:{a.port}") as client:
        assert client.get_model(SYMBOL, TF).model_id == model_id


def test_a_stream_stays_on_one_replica(replicas, candles):
    _, (a, b), model_id = replicas
    streams_before = handled(a, "StreamPredict", "bidi_stream"), handled(b, "StreamPredict", "bidi_stream")
    messages_before = received(a, "StreamPredict"), received(b, "StreamPredict")
    with InferenceClient(f"127.0.0.1:{a.port}") as single:
        expected = single.predict(candles, SYMBOL, TF)
    rows = candles.iloc[:150]
    with InferenceClient(f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}") as both:
        live = list(both.stream(rows.iterrows(), SYMBOL, TF))
    assert len(live) == len(rows) and all(p.model_id == model_id for p in live)
    # one candle at a time gives exactly the probabilities of one Predict over the series
    ready = [p for p in live if p.ready]
    got = np.array([[p.up, p.down, p.range] for p in ready])
    want = expected.iloc[:150][expected.iloc[:150].ML_READY][["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]]
    assert len(ready) == len(want) and np.array_equal(got, want.to_numpy())
    streams = (handled(a, "StreamPredict", "bidi_stream") - streams_before[0],
               handled(b, "StreamPredict", "bidi_stream") - streams_before[1])
    messages = received(a, "StreamPredict") - messages_before[0], received(b, "StreamPredict") - messages_before[1]
    assert sorted(streams) == [0, 1], streams
    assert sorted(messages) == [0, len(rows)], messages  # every message of the stream went to the same replica


def test_the_cli_accepts_a_list_of_replicas(replicas, candles, tmp_path, capsys):
    from mlsignal.cli import main

    _, (a, b), model_id = replicas
    csv = tmp_path / "candles.csv"
    out = tmp_path / "signals.csv"
    frame = candles.iloc[:200].copy()
    frame.insert(0, "timestamp", frame.index.strftime("%Y-%m-%dT%H:%M:%SZ"))
    frame.to_csv(csv, index=False)
    before = handled(a, "Predict") + handled(b, "Predict")
    assert main(["predict", "--symbol", SYMBOL, "--timeframe", TF, "--csv", str(csv), "--out", str(out),
                 "--target", f"ipv4:127.0.0.1:{a.port},127.0.0.1:{b.port}"]) == 0
    written = pd.read_csv(out)
    assert len(written) == 200 and set(written.ML_MODEL_ID) == {model_id}
    assert handled(a, "Predict") + handled(b, "Predict") == before + 1
