"""One score set across inference replicas: two real inference servers on one database (SQLite and PostgreSQL) score
the predictions either of them served with the candles either of them received, once per model and candle.

A client follows one market: a first Predict over its history, a stream, and after a reconnection a second stream
(with history, so it starts cold) and later a third. Through one replica that is the reference. Through two replicas
the first Predict and the second stream go to replica B, the first and third streams to replica A: each replica
journals predictions whose labels only candles the other one receives realise, and B has seen the market before A
journals the predictions B must score. Both markets have a copy of the same tiny
model (same forest, same probabilities for the same candles), so the two runs must give the same scores: the same
(model, candle) pairs with the same labels and losses.

Each replica's journal writer runs as in production; the test also calls `journal.flush()` after each phase, as the
writer would within a second, so the runs do not depend on timing, and compares the two runs after each phase.
"""

from __future__ import annotations

import grpc
import pytest
import sqlalchemy as sa

from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.settings import Settings
from shared.store import live
from shared.store.db import live_scores, make_engine
from tiny_models import candles, messages, register

TF = "1h"
WARM = 120  # candles of history in a stream's first message (the tiny model's warm-up is 100)
N = 460
HALF = 260  # where the client moves to the other replica
BACK = 380  # where it moves back


@pytest.fixture
def replicas(db_url, tmp_path):
    from inference_service.server import start

    engine = make_engine(db_url)
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    settings = Settings(database_url=db_url, model_dir=model_dir, model_poll_seconds=3600.0)
    servers = [start(settings, "127.0.0.1:0") for _ in range(2)]
    yield engine, model_dir, servers
    for server in servers:
        server.stop(0.5)
    engine.dispose()


def stream(server, symbol: str, series, start: int, stop: int) -> int:
    """A stream of candles start..stop-1: its first message carries WARM candles of history up to `start`, then one
    candle per message. Returns how many answers were ready."""
    first = max(start - WARM, 0)
    reqs = [inference_pb2.PredictRequest(symbol=symbol, timeframe=TF, candles=messages(series, first, start))]
    reqs += [inference_pb2.PredictRequest(candles=messages(series, k, k + 1)) for k in range(start, stop)]
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        out = list(inference_pb2_grpc.InferenceServiceStub(channel).StreamPredict(iter(reqs), timeout=120))
    assert len(out) == len(reqs) and not any(r.HasField("error") for r in out)
    return sum(p.ready for r in out for p in r.predictions)


def predict(server, symbol: str, series, stop: int) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        answer = inference_pb2_grpc.InferenceServiceStub(channel).Predict(
            inference_pb2.PredictRequest(symbol=symbol, timeframe=TF, candles=messages(series, 0, stop)), timeout=60)
    assert sum(p.ready for p in answer.predictions) > 0


def phases(series):
    """The client's traffic for one market, phase by phase: (which replica in turn, what it sends)."""
    return [
        (1, lambda server, symbol: predict(server, symbol, series, WARM + 10)),
        (0, lambda server, symbol: stream(server, symbol, series, WARM, HALF)),
        (1, lambda server, symbol: stream(server, symbol, series, HALF, BACK)),
        (0, lambda server, symbol: stream(server, symbol, series, BACK, N)),
    ]


def scores_of(engine: sa.Engine, model_id: str) -> dict[int, tuple[int, float, float, float]]:
    s = live.read_scores(engine, model_id)
    return {int(t): (int(y), float(loss), float(prior), float(brier))
            for t, y, loss, prior, brier in zip(s.open_time_ms, s.label, s.loss, s.prior_loss, s.brier, strict=True)}


def test_a_market_moved_between_replicas_is_scored_as_on_one_replica(replicas):
    engine, model_dir, (a, b) = replicas
    one = register(engine, model_dir, "ONE/USDT", TF, model_id="one-replica", seed=7)
    two = register(engine, model_dir, "TWO/USDT", TF, model_id="two-replicas", seed=7)
    h = one.label.horizon_bars
    series = candles(N, seed=4)
    times = series.open_time_ms.tolist()

    for phase, (turn, send) in enumerate(phases(series)):
        send(a, "ONE/USDT")  # the reference: one replica
        a.journal.flush()
        server = (a, b)[turn]  # B, then A, then B, then A again
        send(server, "TWO/USDT")
        server.journal.flush()
        reference = scores_of(engine, one.model_id)
        got = scores_of(engine, two.model_id)
        assert set(got) == set(reference), f"phase {phase}"
        for t, (label, loss, prior, brier) in reference.items():
            assert got[t][0] == label
            assert got[t][1:] == pytest.approx((loss, prior, brier), rel=1e-12)
        if phase == 2:  # A's last predictions before the move were scored with the candles B received
            assert {times[HALF - h - 1], times[HALF - 1], times[HALF]} <= set(got)
    # the reference scores every ready prediction whose label the candles realised, across the moves
    assert min(reference) == times[WARM - 21]  # the first ready answer of the first Predict (warm-up 100)
    assert max(reference) == times[N - h - 2]
    assert {times[BACK - 1], times[BACK]} <= set(reference)
    with engine.connect() as conn:  # once per model and candle
        s = live_scores.c
        n = conn.execute(sa.select(sa.func.count()).where(s.model_id == two.model_id)).scalar()
    assert n == len(got)
