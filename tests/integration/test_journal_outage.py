"""The prediction journal through a PostgreSQL outage: a cluster of this module's own (initdb/pg_ctl, as the postgres
user when the tests run as root), stopped and started again while inference keeps answering from the models in
memory. The journal keeps what it could not write, in order, bounded (the oldest dropped and counted in
`mlsignal_journal_dropped` beyond the bound), and writes it once the database is back.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from test_journal_maintenance import Clock, closes, register, send, t

from conftest import _free_port
from inference_service.journal import Journal
from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from postgres import Cluster, started_cluster
from shared.labels import make_labels
from shared.server.metrics import Metrics, live_metrics
from shared.settings import Settings
from shared.store import live
from shared.store.db import live_predictions, live_scores, make_engine
from shared.store.migrate import upgrade
from tiny_models import H, candles, messages
from tiny_models import register as register_tiny

pytestmark = pytest.mark.postgres

TF = "1h"
WARM = 120


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    """A running cluster with a migrated database `mlsignal`."""
    with started_cluster("mlsignal-pg-journal-") as c:
        engine = sa.create_engine(c.url("postgres"), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE mlsignal"))
        engine.dispose()
        upgrade(c.url("mlsignal"))
        yield c


@pytest.fixture
def running(cluster: Cluster) -> Iterator[Cluster]:
    if not cluster.running:
        cluster.start()
    yield cluster
    if not cluster.running:
        cluster.start()


def journaled_times(engine: sa.Engine, model_id: str) -> set[int]:
    with engine.connect() as conn:
        out = set()
        for table in (live_predictions, live_scores):
            out |= {r[0] for r in conn.execute(sa.select(table.c.open_time).where(table.c.model_id == model_id))}
    return out


def dropped_metric(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("mlsignal_journal_dropped_total")


def test_answers_served_while_postgres_is_down_are_journaled_once_it_is_back(running, tmp_path):
    url = running.url("mlsignal")
    engine = make_engine(url)
    model = register_tiny(engine, tmp_path / "models", "DOWN/USDT", TF, model_id="down-a")
    server = None
    try:
        from inference_service.server import start

        server = start(Settings(database_url=url, model_dir=tmp_path / "models", model_poll_seconds=3600.0,
                                metrics_port=_free_port()), "127.0.0.1:0")
        h = model.label.horizon_bars
        series = candles(WARM + 80, seed=2)
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            ready: list[int] = []

            def answer(start: int, stop: int) -> None:
                resp = stub.Predict(inference_pb2.PredictRequest(symbol="DOWN/USDT", timeframe=TF,
                                                                 candles=messages(series, start, stop)), timeout=60)
                assert resp.model_id == model.model_id
                ready.extend(p.open_time_ms for p in resp.predictions if p.ready)

            answer(0, WARM)
            server.journal.flush()
            before = journaled_times(engine, model.model_id)
            assert before == set(ready)

            running.stop()
            for k in range(WARM, WARM + 40):  # answered from the model in memory, one candle after another
                answer(k - WARM + 1, k + 1)
            server.journal.flush()
            assert server.journal.held == 40  # kept, in order, until the database is back
            assert server.journal.dropped == 0
            assert dropped_metric(server.handle.metrics) == 0

            running.start()
            server.journal.flush()
            assert server.journal.held == 0 and server.journal.dropped == 0
            assert journaled_times(engine, model.model_id) == set(ready)
            # scored as without the outage: every ready answer whose label the candles received realise
            n = WARM + 40
            labels = make_labels(series.close[:n], model.label, series.open_time_ms[:n], H)
            times = series.open_time_ms[:n].tolist()
            want = {times[i]: int(labels[i]) for i in range(n) if times[i] in set(ready) and i + h + 1 < n}
            s = live.read_scores(engine, model.model_id)
            assert dict(zip(s.open_time_ms.tolist(), s.label.tolist(), strict=True)) == want
            assert len(want) > 20
    finally:
        if server is not None:
            server.stop(0.5)
        engine.dispose()


def test_beyond_its_bound_the_journal_drops_the_oldest_answers_and_counts_them(running):
    engine = make_engine(running.url("mlsignal"))
    try:
        model = register(engine, "BOUND/USD")
        series = closes(20, seed=9)
        clock = Clock()
        journal = Journal(engine, max_held=5, clock=clock)
        metrics = Metrics("inference")
        live_metrics(metrics, lambda: [], lambda model_id: (0, 0.0, 0.0), lambda: journal.dropped)
        for i in range(6):
            send(journal, clock, model, i, series)

        running.stop()
        for i in range(6, 10):
            send(journal, clock, model, i, series)  # each flush fails: the answers are kept
        assert journal.held == 4 and journal.dropped == 0
        for i in range(10, 14):
            send(journal, clock, model, i, series)
        assert journal.held == 5  # the newest five: candles 9..13
        assert journal.dropped == 3 and dropped_metric(metrics) == 3  # candles 6, 7 and 8

        running.start()
        journal.flush()
        assert journal.held == 0
        assert journaled_times(engine, model.record.model_id) == {t(i) for i in (*range(6), *range(9, 14))}
        journal.stop()
        assert journal.dropped == 3
    finally:
        engine.dispose()


def test_a_stop_while_postgres_is_down_counts_what_it_could_not_journal(running):
    engine = make_engine(running.url("mlsignal"))
    try:
        model = register(engine, "STOP/USD")
        series = closes(10, seed=1)
        clock = Clock()
        journal = Journal(engine, clock=clock)
        send(journal, clock, model, 0, series)
        running.stop()
        for i in range(1, 4):
            send(journal, clock, model, i, series)
        assert journal.held == 3
        journal.stop()
        assert journal.held == 0 and journal.dropped == 3
    finally:
        engine.dispose()
