"""The prediction journal behind a real inference server, on SQLite and PostgreSQL, with tiny real models
(`tiny_models`): answers that finish during the shutdown grace period are journaled, the last version a client sent
of a forming candle is the one journaled and scored while other clients predict at the same time, and a RESEARCH
model pinned by model_id is not scored.

The journal's writer runs as in production; where a test needs what was recorded so far to be in the database it
calls `journal.flush()` itself (what the writer does every second), so nothing waits on a clock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import sqlalchemy as sa

from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.labels import LabelSpec, make_labels
from shared.settings import Settings
from shared.store import live
from shared.store.db import live_candles, live_predictions, live_scores, make_engine
from shared.store.registry import RESEARCH
from tiny_models import H, candles, messages, register

TF = "1h"
WARM = 120  # candles in a stream's first message (the tiny models' warm-up is 100)


@pytest.fixture
def setup(db_url, tmp_path):
    """A database, a model directory and a started inference server (the registry polled only when the test asks)."""
    from inference_service.server import start

    engine = make_engine(db_url)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    servers = []

    def serve():
        server = start(Settings(database_url=db_url, model_dir=model_dir, model_poll_seconds=3600.0), "127.0.0.1:0")
        servers.append(server)
        return server

    yield engine, model_dir, serve
    for server in servers:
        server.stop(0.5)
    engine.dispose()


def journaled_times(engine: sa.Engine, model_id: str) -> set[int]:
    """Open times of a model's predictions in the journal: pending or scored."""
    with engine.connect() as conn:
        out = set()
        for table in (live_predictions, live_scores):
            out |= {r[0] for r in conn.execute(sa.select(table.c.open_time).where(table.c.model_id == model_id))}
    return out


def test_answers_that_finish_during_the_shutdown_grace_are_journaled(setup):
    """Stopping the server reports NOT_SERVING and lets running calls finish within the grace period; what they
    answer meanwhile is journaled before the journal stops."""
    engine, model_dir, serve = setup
    model = register(engine, model_dir, "SHUT/USDT", TF, model_id="shut-a")
    server = serve()
    series = candles(WARM + 30)
    stopping = threading.Event()
    server.handle.on_stop(lambda grace: stopping.set())  # runs once the server refuses new calls
    requests: queue.Queue = queue.Queue()

    def outgoing() -> Iterator[inference_pb2.PredictRequest]:
        while (request := requests.get()) is not None:
            yield request

    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        responses = stub.StreamPredict(outgoing(), timeout=120)
        requests.put(inference_pb2.PredictRequest(symbol="SHUT/USDT", timeframe=TF, candles=messages(series, 0, WARM)))
        first = next(responses)
        assert first.model_id == model.model_id and first.predictions[-1].ready
        stopper = threading.Thread(target=server.stop, args=(60.0,))
        stopper.start()
        assert stopping.wait(30)
        during = []
        for k in range(WARM, WARM + 30):  # answered while the server drains
            requests.put(inference_pb2.PredictRequest(candles=messages(series, k, k + 1)))
            answer = next(responses)
            assert answer.predictions[0].ready and not answer.HasField("error")
            during.append(answer.predictions[0].open_time_ms)
        requests.put(None)
        assert list(responses) == []
        stopper.join(60)
        assert not stopper.is_alive()
    assert set(during) <= journaled_times(engine, model.model_id)
    scored = live.read_scores(engine, model.model_id).open_time_ms.tolist()
    assert during[0] in scored  # candle WARM's label was realised by candles answered during the grace period


def _forming(series, i: int, close: float) -> list:
    """Candle i as a message with another close (still a valid candle)."""
    [c] = messages(series, i, i + 1)
    c.close = close
    c.high = max(c.high, c.open, close)
    c.low = min(c.low, c.open, close)
    return [c]


def test_the_last_version_sent_of_a_forming_candle_is_journaled_and_scored(setup):
    """A client sends one forming candle in several versions (different closes), one Predict after another, while
    other clients predict the same market's closed candles and other markets at the same time; some versions share a
    journal batch, others are journaled in batches of their own. The journal holds the last version sent: its close
    and the probabilities answered to it, and scores that (its label differs from the versions before it)."""
    engine, model_dir, serve = setup
    model = register(engine, model_dir, "VER/USDT", TF, model_id="ver-a")
    for i in range(3):
        register(engine, model_dir, f"NOISE{i}/USDT", TF, model_id=f"noise-{i}", seed=i + 1)
    server = serve()
    h = model.label.horizon_bars
    f = WARM + 5  # the forming candle
    series = candles(f + h + 2)
    t_f = int(series.open_time_ms[f])
    target = float(series.close[f + h])

    def label_with(close: float) -> int:
        c = series.close.copy()
        c[f] = close
        return int(make_labels(c, LabelSpec(h, model.label.threshold), series.open_time_ms, H)[f])

    done = threading.Event()
    noise_errors: list[BaseException] = []

    def noise(symbol: str, rows: slice) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            try:
                while not done.is_set():
                    stub.Predict(inference_pb2.PredictRequest(symbol=symbol, timeframe=TF,
                                                              candles=messages(series, rows.start, rows.stop)),
                                 timeout=60)
            except BaseException as exc:  # reported by the test
                noise_errors.append(exc)

    workers = [threading.Thread(target=noise, args=(f"NOISE{i}/USDT", slice(0, WARM + i))) for i in range(3)]
    workers.append(threading.Thread(target=noise, args=("VER/USDT", slice(f - WARM, f))))  # closed candles
    for w in workers:
        w.start()
    answered: list[tuple[float, float, float]] = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            def version(close: float) -> tuple[float, float, float]:
                history = messages(series, f - WARM, f)
                answer = stub.Predict(inference_pb2.PredictRequest(
                    symbol="VER/USDT", timeframe=TF, candles=history + _forming(series, f, close)), timeout=60)
                p = answer.predictions[-1]
                assert p.open_time_ms == t_f and p.ready
                answered.append((p.ml_down_prob, p.ml_range_prob, p.ml_up_prob))
                return answered[-1]

            # first versions: closes from 8 % below to 8 % above the close h candles later
            tried = {round(d, 2): version(target * (1 + d)) for d in np.arange(-0.08, 0.081, 0.01)}
            server.journal.flush()
            # then: the last version within the 2 % threshold (label range), the versions before it outside it
            # (label down or up) and answered differently, one flush before the last two
            last = next(d for d in (0.0, 0.01, -0.01) if any(tried[x] != tried[d] for x in tried if abs(x) > 0.02))
            other = [x for x in tried if abs(x) > 0.02 and tried[x] != tried[last]]
            plan = [other[0], other[-1], None, other[len(other) // 2], last]
            for d in plan:
                if d is None:
                    server.journal.flush()
                else:
                    version(target * (1 + d))
            final = target * (1 + last)
    finally:
        done.set()
        for w in workers:
            w.join(60)
    assert noise_errors == []
    assert answered[-1] != answered[-2] and answered[-1] != answered[-3]  # the last version is told from the others
    assert label_with(final) not in {label_with(target * (1 + d)) for d in plan[:2]}
    server.journal.flush()
    with engine.connect() as conn:
        c, p = live_candles.c, live_predictions.c
        close = conn.execute(sa.select(c.close).where(c.symbol == "VER/USDT", c.open_time == t_f)).scalar_one()
        proba = conn.execute(sa.select(p.p_down, p.p_range, p.p_up).where(p.model_id == model.model_id,
                                                                          p.open_time == t_f)).one()
    assert close == final
    assert tuple(proba) == answered[-1]

    # the candles after it close: candle f is scored in its last version (candles alone, without history)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stub.Predict(inference_pb2.PredictRequest(symbol="VER/USDT", timeframe=TF,
                                                  candles=messages(series, f + 1, f + h + 2)), timeout=60)
    server.journal.flush()
    scores = live.read_scores(engine, model.model_id)
    row = scores.open_time_ms.tolist().index(t_f)
    assert tuple(scores.proba[row]) == answered[-1]
    assert int(scores.label[row]) == label_with(final) == 1  # range: within 2 % of the close h candles later
    assert scores.loss[row] == pytest.approx(-np.log(answered[-1][1]), rel=1e-12)


def test_a_pinned_research_model_is_not_scored(setup):
    """A request that pins a RESEARCH model gets its answer; the journal keeps nothing of its predictions, while the
    serving model of the same market is scored on the same candles."""
    engine, model_dir, serve = setup
    serving = register(engine, model_dir, "RES/USDT", TF, model_id="res-serving")
    research = register(engine, model_dir, "RES/USDT", TF, model_id="res-research", seed=2, stage=RESEARCH)
    server = serve()
    series = candles(WARM + 60)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for model_id in ("", research.model_id):
            answer = stub.Predict(inference_pb2.PredictRequest(symbol="RES/USDT", timeframe=TF, model_id=model_id,
                                                               candles=messages(series, 0, len(series))), timeout=60)
            assert answer.model_id == (model_id or serving.model_id)
            assert sum(p.ready for p in answer.predictions) > 50
    server.journal.flush()
    assert journaled_times(engine, research.model_id) == set()
    assert len(live.read_scores(engine, serving.model_id).open_time_ms) > 0
