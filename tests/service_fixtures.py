"""Fixtures that run the real services: servers on 127.0.0.1:0, real SQLite/PostgreSQL, real trained models."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pandas as pd
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2_grpc

from mlsignal.v1 import common_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.importers import read_candles
from shared.store.marketdata import insert_candles
from shared.store.migrate import upgrade

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "btcusd_1h_coinbase_2017-2019.csv.gz"
FINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
SMALL_PARAMS = common_pb2.ModelParams(n_estimators=40)


def ts(text: str) -> Timestamp:
    t = Timestamp()
    t.FromDatetime(pd.Timestamp(text, tz="UTC").to_pydatetime())
    return t


def ms(text: str) -> int:
    return int(pd.Timestamp(text, tz="UTC").value // 1_000_000)


def inverted(frame: pd.DataFrame) -> pd.DataFrame:
    """A second, genuinely different market: the reciprocal of BTC/USD (USD priced in BTC), scaled."""
    out = frame.copy()
    out["open"] = 1e6 / frame["open"]
    out["close"] = 1e6 / frame["close"]
    out["high"] = 1e6 / frame["low"]
    out["low"] = 1e6 / frame["high"]
    return out


@pytest.fixture(scope="session")
def sample_frame() -> pd.DataFrame:
    return read_candles(SAMPLE, "1h")


def load_market(url: str, frame: pd.DataFrame, symbols=("BTC/USD",)) -> None:
    upgrade(url)
    engine = make_engine(url)
    try:
        for s in symbols:
            insert_candles(engine, s, "1h", inverted(frame) if s == "INV/USD" else frame)
    finally:
        engine.dispose()


def wait_job(stub, job_id: str, timeout: float = 180) -> training_pb2.TrainingJob:
    deadline = time.monotonic() + timeout
    for job in stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=timeout):
        if job.state in FINAL:
            return job
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"job {job_id} did not finish in {timeout}s")


def train(stub, symbol="BTC/USD", start="2018-01-01", end="2019-01-01", params=SMALL_PARAMS, **label):
    req = training_pb2.StartTrainingRequest(
        symbol=symbol, timeframe="1h", start_time=ts(start), end_time=ts(end),
        label=common_pb2.LabelSpec(**label), params=params,
    )
    job = stub.StartTraining(req, timeout=30)
    done = wait_job(stub, job.job_id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    return done


@dataclass
class Services:
    url: str
    model_dir: Path
    settings: Settings
    training: object
    inference: object
    training_channel: grpc.Channel
    inference_channel: grpc.Channel

    @property
    def train_stub(self):
        return training_pb2_grpc.TrainingServiceStub(self.training_channel)

    @property
    def infer_stub(self):
        return inference_pb2_grpc.InferenceServiceStub(self.inference_channel)

    @property
    def health_stub(self):
        return health_pb2_grpc.HealthStub(self.inference_channel)


def start_services(url: str, model_dir: Path, **overrides) -> Services:
    from inference_service.server import start as start_inference
    from training_service.server import start as start_training

    settings = Settings(database_url=url, model_dir=model_dir, model_poll_seconds=0.2, **overrides)
    training = start_training(settings, "127.0.0.1:0")
    inference = start_inference(settings, "127.0.0.1:0")
    opts = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    return Services(
        url, model_dir, settings, training, inference,
        grpc.insecure_channel(f"127.0.0.1:{training.port}", options=opts),
        grpc.insecure_channel(f"127.0.0.1:{inference.port}", options=opts),
    )


def stop_services(s: Services) -> None:
    s.training_channel.close()
    s.inference_channel.close()
    s.inference.stop(0.5)
    s.training.stop(0.5)


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def services(request, tmp_path_factory, sample_frame):
    """Both services on one database holding BTC/USD and INV/USD, with one BTC/USD model trained on 2018.

    Session-wide and run twice: every test that uses it runs on SQLite and on PostgreSQL.
    """
    import contextlib

    from conftest import fresh_pg_database

    root = tmp_path_factory.mktemp(f"services-{request.param}")
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{root}/mlsignal.db"
        else:
            url = stack.enter_context(fresh_pg_database(request.getfixturevalue("pg_server")))
        load_market(url, sample_frame, ("BTC/USD", "INV/USD"))
        s = start_services(url, root / "models")
        stack.callback(stop_services, s)
        s.btc_job = train(s.train_stub)
        yield s
