"""Unusable models through the real inference server (127.0.0.1:0, SQLite registry, tiny ONNX forests).

A registry row this version cannot read (as a newer version could write during a rolling upgrade) must not stop
hot reload: the market keeps its previous model, other markets switch to their new models, a cold load answers
with the previous model (never UNKNOWN), a pinned request for it is DATA_LOSS, and once the row is fixed the model
serves without a restart.
"""

from __future__ import annotations

import json
import logging
import time

import grpc
import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.ensemble import RandomForestClassifier

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from shared.artifacts import write_atomic
from shared.features import FeatureSpec
from shared.labels import CLASSES, LabelSpec
from shared.params import ForestParams
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.db import models as models_table
from shared.store.migrate import upgrade
from shared.store.registry import CANDIDATE, SERVING, ModelRecord, insert_model
from training_service.pipeline import export_onnx

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
BTC, ETH, SOL = "BTC/USDT", "ETH/USDT", "SOL/USDT"


class Registry:
    def __init__(self, url: str, model_dir):
        self.engine = make_engine(url)
        self.model_dir = model_dir
        self.created_ms = 1_000
        rng = np.random.default_rng(0)
        n = len(FeatureSpec().feature_names)
        forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0).fit(
            rng.normal(size=(300, n)), rng.integers(0, 3, 300))
        self.onnx = export_onnx(forest, n)

    def register(self, symbol: str, sha256: str = "", stage: str = SERVING) -> str:
        self.created_ms += 1
        model_id = f"{symbol.replace('/', '-')}_1h_{self.created_ms}"
        sha = write_atomic(self.model_dir / f"{model_id}.onnx", self.onnx)
        record = ModelRecord(
            model_id=model_id, symbol=symbol, timeframe="1h", created_at_ms=self.created_ms, train_start_ms=T0,
            train_end_ms=T0 + 100 * H, label=LabelSpec(), feature_spec=FeatureSpec(),
            params=ForestParams(n_estimators=5, max_depth=3), classes=CLASSES, prior=(0.3, 0.4, 0.3),
            shrink_weight=0.6, metrics={}, artifact=f"{model_id}.onnx", sha256=sha256 or sha,
            stage=stage,
        )
        with self.engine.begin() as conn:
            insert_model(conn, record)
        return model_id

    def set_manifest(self, model_id: str, change) -> None:
        where = models_table.c.model_id == model_id
        with self.engine.begin() as conn:
            manifest = json.loads(conn.execute(sa.select(models_table.c.manifest).where(where)).scalar_one())
            conn.execute(models_table.update().where(where).values(manifest=json.dumps(change(manifest))))


def with_future_knob(manifest: dict) -> dict:
    return dict(manifest, params={**manifest["params"], "a_future_knob": 3})


def without_future_knob(manifest: dict) -> dict:
    return dict(manifest, params={k: v for k, v in manifest["params"].items() if k != "a_future_knob"})


def predict(stub, symbol: str, model_id: str = "") -> inference_pb2.PredictResponse:
    candles = [common_pb2.Candle(open_time_ms=T0 + i * H, open=100.0, high=101.0, low=99.0, close=100.5, volume=5.0)
               for i in range(5)]
    return stub.Predict(inference_pb2.PredictRequest(symbol=symbol, timeframe="1h", model_id=model_id,
                                                     candles=candles), timeout=10)


def wait_for(stub, symbol: str, model_id: str, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while predict(stub, symbol).model_id != model_id:
        assert time.monotonic() < deadline, f"{symbol} did not switch to {model_id}"
        time.sleep(0.1)


@pytest.fixture
def server(tmp_path):
    from inference_service.server import start

    url = f"sqlite:///{tmp_path}/mlsignal.db"
    upgrade(url)
    registry = Registry(url, tmp_path / "models")
    running = start(Settings(database_url=url, model_dir=tmp_path / "models", model_poll_seconds=0.2), "127.0.0.1:0")
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    try:
        yield registry, inference_pb2_grpc.InferenceServiceStub(channel)
    finally:
        channel.close()
        running.stop(0.5)
        registry.engine.dispose()


def test_an_unreadable_registry_row_does_not_stop_hot_reload(server, caplog):
    caplog.set_level(logging.INFO, logger="inference_service.model_store")
    registry, stub = server
    btc_old, eth_old, _ = registry.register(BTC), registry.register(ETH), registry.register(SOL)
    assert predict(stub, BTC).model_id == btc_old
    assert predict(stub, ETH).model_id == eth_old
    btc_new = registry.register(BTC)
    registry.set_manifest(btc_new, with_future_knob)
    sol_new = registry.register(SOL)
    registry.set_manifest(sol_new, with_future_knob)
    eth_new = registry.register(ETH)

    wait_for(stub, ETH, eth_new)  # another market still hot-reloads
    time.sleep(1.0)  # several polls
    assert predict(stub, BTC).model_id == btc_old  # the previous model keeps serving
    with pytest.raises(grpc.RpcError) as err:  # a cold load serves only the SERVING model, never an older one
        predict(stub, SOL)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS and f"model {sol_new} refused" in err.value.details()
    refusals = [r.getMessage() for r in caplog.records if f"model {btc_new} refused" in r.getMessage()]
    assert len(refusals) == 1 and "registry row cannot be read" in refusals[0], refusals

    with pytest.raises(grpc.RpcError) as err:
        predict(stub, BTC, model_id=btc_new)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    assert f"model {btc_new} refused" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, BTC, model_id=eth_new)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    registry.set_manifest(btc_new, without_future_knob)  # fixed
    wait_for(stub, BTC, btc_new)
    registry.set_manifest(sol_new, without_future_knob)
    wait_for(stub, SOL, sol_new)


def test_a_pinned_model_that_fails_verification_is_data_loss_without_the_server_path(server):
    registry, stub = server
    good = registry.register(BTC)
    bad = registry.register(BTC, sha256="0" * 64, stage=CANDIDATE)
    assert predict(stub, BTC).model_id == good
    with pytest.raises(grpc.RpcError) as err:
        predict(stub, BTC, model_id=bad)
    assert err.value.code() == grpc.StatusCode.DATA_LOSS
    details = err.value.details()
    assert f"model {bad} refused" in details and "sha256" in details
    assert str(registry.model_dir) not in details and str(registry.model_dir.resolve()) not in details
