"""A fleet on one replica: hundreds of markets, each with its own serving model, streamed at once.

Real inference server, real SQLite and PostgreSQL, tiny real models registered directly (`tiny_models`). The
registry poll is driven by the test (`store.refresh()`, with the server's own poll every hour), so nothing here
waits on a clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa

from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.features import FeatureSpec
from shared.settings import Settings
from shared.store import registry
from shared.store.db import make_engine
from shared.store.registry import CANDIDATE
from tiny_models import candles, messages, register

MARKETS = 200
TF = "1h"
WARM = 120  # candles in each stream's first message


def symbol(i: int) -> str:
    return f"M{i:04d}/USDT"


# What the server's event loop thread did that could block: database statements and files opened in the model
# directory. Recorded by an SQLAlchemy listener and an audit hook (installed once; it records only while a test asks).
LOOP_THREAD = "grpc-server-loop"
_watched_dirs: list[str] = []
_loop_touches: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _watched_dirs and threading.current_thread().name == LOOP_THREAD:
        path = str(args[0])
        if any(path.startswith(d) for d in _watched_dirs):
            _loop_touches.append(f"open {path}")


sys.addaudithook(_audit)


@contextlib.contextmanager
def on_the_loop(engine: sa.Engine, model_dir: Path) -> Iterator[list[str]]:
    """Everything the server's event loop did meanwhile that reads the database or the model directory."""
    def statement(conn, cursor, text, *args) -> None:
        if threading.current_thread().name == LOOP_THREAD:
            _loop_touches.append(f"sql {text}")

    _loop_touches.clear()
    sa.event.listen(engine, "before_cursor_execute", statement)
    _watched_dirs.append(str(Path(model_dir).resolve()))
    _watched_dirs.append(str(model_dir))
    try:
        yield _loop_touches
    finally:
        _watched_dirs.clear()
        sa.event.remove(engine, "before_cursor_execute", statement)


@pytest.fixture
def fleet(db_url, tmp_path):
    """MARKETS markets with a SERVING model each, and one more CANDIDATE model in market 137; a server started."""
    from inference_service.server import start

    engine = make_engine(db_url)
    model_dir = tmp_path / "models"
    for i in range(MARKETS):
        register(engine, model_dir, symbol(i), TF, model_id=f"m{i:04d}-a", seed=i % 7)
    register(engine, model_dir, symbol(137), TF, model_id="m0137-b", seed=11, stage=CANDIDATE)
    settings = Settings(database_url=db_url, model_dir=model_dir, model_poll_seconds=3600.0, live_monitoring=False)
    server = start(settings, "127.0.0.1:0")
    yield engine, server
    server.stop(0.5)
    engine.dispose()


async def _open(stub, i: int, series) -> tuple[grpc.aio.StreamStreamCall, inference_pb2.PredictResponse]:
    call = stub.StreamPredict(timeout=120)
    await call.write(inference_pb2.PredictRequest(symbol=symbol(i), timeframe=TF, candles=messages(series, 0, WARM)))
    return call, await call.read()


async def _send(call, series, k: int) -> inference_pb2.PredictResponse:
    await call.write(inference_pb2.PredictRequest(candles=messages(series, k, k + 1)))
    return await call.read()


def test_a_promotion_in_one_of_hundreds_of_markets_reaches_its_open_stream(fleet):
    engine, server = fleet
    series = candles(WARM + 2)
    queries: list[str] = []
    sa.event.listen(server.store.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            opened = await asyncio.gather(*(_open(stub, i, series) for i in range(MARKETS)))
            for i, (_, first) in enumerate(opened):
                assert first.model_id == f"m{i:04d}-a", first.error.message
                assert first.predictions[-1].ready
            assert len(server.store.loaded()) == MARKETS
            server.store.refresh()  # the first poll looks at every market once
            queries.clear()
            assert server.store.refresh() == []
            assert len(queries) == 1, queries  # idle: one read of the registry's version, whatever the fleet size

            registry.promote(engine, "m0137-b", "a better model")
            queries.clear()
            assert server.store.refresh() == ["m0137-b"]
            assert len(queries) < 10, queries  # only the changed market is read again
            answers = await asyncio.gather(*(_send(call, series, WARM) for call, _ in opened))
            for i, answer in enumerate(answers):
                expected = "m0137-b" if i == 137 else f"m{i:04d}-a"
                assert answer.model_id == expected, answer.error.message
                assert answer.predictions[0].ready
            for call, _ in opened:
                await call.done_writing()

    with on_the_loop(server.store.engine, server.store.model_dir) as touches:
        asyncio.run(run())
    assert touches == []


def test_streams_recover_by_themselves_after_no_model_and_after_a_swap_to_a_funding_model(fleet):
    """Valid candles join a stream's history even when their prediction fails for a reason that is not theirs: a
    market without a model yet (NOT_FOUND), or a newly serving funding-rate model whose window the history does not
    cover yet (FAILED_PRECONDITION). Each stream answers again by itself, without reconnecting."""
    engine, server = fleet
    funded_spec = FeatureSpec(use_funding_rate=True)
    register(engine, server.store.model_dir, symbol(5), TF, model_id="m0005-funding", seed=3, spec=funded_spec,
             stage=CANDIDATE)
    series = candles(400, seed=1, funding_from=245)

    async def run() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # a market that has no model yet
            fresh = stub.StreamPredict(timeout=120)
            for k in range(0, 150, 50):
                await fresh.write(inference_pb2.PredictRequest(symbol="NEW/USDT", timeframe=TF,
                                                               candles=messages(series, k, k + 50)))
                answer = await fresh.read()
                assert answer.error.code == grpc.StatusCode.NOT_FOUND.value[0] and not answer.predictions
            register(engine, server.store.model_dir, "NEW/USDT", TF, model_id="new-a", seed=4)
            answer = await _send(fresh, series, 150)
            assert answer.model_id == "new-a" and answer.predictions[0].ready, answer.error.message

            # a swap to a funding-rate model
            call = stub.StreamPredict(timeout=120)
            await call.write(inference_pb2.PredictRequest(symbol=symbol(5), timeframe=TF,
                                                          candles=messages(series, 0, 250)))
            assert (await call.read()).model_id == "m0005-a"
            registry.promote(engine, "m0005-funding", "now with funding rate")
            assert server.store.refresh() == ["m0005-funding"]
            codes = []
            for k in range(250, 400):
                answer = await _send(call, series, k)
                if answer.error.code:
                    assert answer.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], answer.error.message
                    assert "funding" in answer.error.message or "not finite" in answer.error.message
                    codes.append("error")
                else:
                    assert answer.model_id == "m0005-funding" and answer.predictions[0].ready
                    codes.append("ok")
            assert codes[0] == "error" and codes[-1] == "ok"
            recovered = codes.index("ok")
            assert set(codes[recovered:]) == {"ok"}  # once recovered, it keeps answering
            await call.done_writing()
            await fresh.done_writing()

    with on_the_loop(server.store.engine, server.store.model_dir) as touches:
        asyncio.run(run())
    assert touches == []


# ----------------------------------------------------------------------------------------------------------------------
# PostgreSQL stopped under open streams


@pytest.fixture
def outage_fleet(tmp_path):
    """A cluster of this test's own (it is stopped), five markets, and a server whose cache holds two of them."""
    from inference_service.server import start
    from postgres import started_cluster
    from shared.store.migrate import upgrade

    with started_cluster("mlsignal-pg-fleet-") as cluster:
        url = cluster.url()
        upgrade(url)
        engine = make_engine(url)
        model_dir = tmp_path / "models"
        for i in range(5):
            register(engine, model_dir, symbol(i), TF, model_id=f"m{i:04d}-a", seed=i)
        settings = Settings(database_url=url, model_dir=model_dir, model_poll_seconds=3600.0, model_cache_size=2)
        server = start(settings, "127.0.0.1:0")
        try:
            yield cluster, engine, server
        finally:
            server.stop(0.5)
            engine.dispose()


@pytest.mark.postgres
def test_health_answers_within_100_ms_with_postgresql_stopped_and_streams_on_every_path(outage_fleet):
    """Streams on a pinned model, on serving models in memory and on a market whose model the cache dropped, plus a
    Predict for a market never loaded, all while PostgreSQL is down: what is in memory answers, what needs the
    database answers UNAVAILABLE from a worker thread, and health keeps answering within 100 ms throughout. The
    candles sent meanwhile joined their streams: once the database is back, the evicted market answers again."""
    cluster, _engine, server = outage_fleet
    series = candles(WARM + 10)
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]

    async def run() -> None:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            health = health_pb2_grpc.HealthStub(channel)
            evicted, _ = await _open(stub, 0, series)  # market 0 is loaded first, then dropped by 1 and 2
            pinned = stub.StreamPredict(timeout=120)
            await pinned.write(inference_pb2.PredictRequest(symbol=symbol(3), timeframe=TF, model_id="m0003-a",
                                                            candles=messages(series, 0, WARM)))
            assert (await pinned.read()).model_id == "m0003-a"
            fresh = [(await _open(stub, i, series))[0] for i in (1, 2)]
            served = {role: m.model_id for role, m in server.store.loaded()}
            assert "m0000-a" not in served.values() and len(server.store.loaded()) == 3

            latencies: list[float] = []
            stop = asyncio.Event()

            async def probe() -> None:
                loop = asyncio.get_running_loop()
                while not stop.is_set():
                    t0 = loop.time()
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                    latencies.append(loop.time() - t0)
                    assert reply.status == health_pb2.HealthCheckResponse.SERVING
                    await asyncio.sleep(0.005)

            with cluster.stopped():
                prober = asyncio.create_task(probe())
                for k in range(WARM, WARM + 5):
                    answers = await asyncio.gather(
                        _send(evicted, series, k), _send(pinned, series, k), *(_send(c, series, k) for c in fresh),
                        stub.Predict(inference_pb2.PredictRequest(symbol=symbol(4), timeframe=TF,
                                                                  candles=messages(series, 0, 5)), timeout=30),
                        return_exceptions=True)
                    gone, pin, *in_memory, cold = answers
                    assert gone.error.code == unavailable, gone.error.message
                    assert pin.model_id == "m0003-a" and pin.predictions[0].ready
                    assert [a.model_id for a in in_memory] == ["m0001-a", "m0002-a"]
                    assert isinstance(cold, grpc.aio.AioRpcError) and cold.code() == grpc.StatusCode.UNAVAILABLE
                    # the poll fails, logs, and keeps serving
                    assert await asyncio.to_thread(server.store.refresh) == []
                stop.set()
                await prober
            assert latencies
            assert max(latencies) < 0.1, sorted(latencies)[-5:]

            back = await _send(evicted, series, WARM + 5)
            assert back.model_id == "m0000-a", back.error.message
            # the candles sent during the outage are in the history: the answer is Predict's over the same candles
            whole = await stub.Predict(inference_pb2.PredictRequest(symbol=symbol(0), timeframe=TF,
                                                                    candles=messages(series, 0, WARM + 6)))
            assert back.predictions[0].ml_up_prob == whole.predictions[-1].ml_up_prob
            for call in (evicted, pinned, *fresh):
                await call.done_writing()

    with on_the_loop(server.store.engine, server.store.model_dir) as touches:
        asyncio.run(run())
    assert touches == []
