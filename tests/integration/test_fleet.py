"""A fleet on one replica: hundreds of markets, each with its own serving model, streamed at once.

Real inference server, real SQLite and PostgreSQL, tiny real models registered directly (`tiny_models`). The
registry poll is driven by the test (`store.refresh()`, with the server's own poll every hour), so nothing here
waits on a clock.
"""

from __future__ import annotations

import asyncio

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

    asyncio.run(run())


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

    asyncio.run(run())
