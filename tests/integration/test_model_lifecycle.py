"""Model lifecycle through the real services: the promotion gate, shadow models, PromoteModel and RollbackModel
(which verify the model file first), open streams that follow the serving model, and walk-forward research models
that never serve."""

from __future__ import annotations

import itertools
import queue
import time

import grpc
import numpy as np
import pytest

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from prior_checks import require_beats_prior
from service_fixtures import SMALL_PARAMS, load_market, ms, start_services, stop_services, train, ts, wait_job
from shared.store.db import make_engine
from shared.store.marketdata import insert_candles
from shared.store.registry import stage_history

TF = "1h"
STAGE = common_pb2.ModelStage


def candles_of(frame) -> list[common_pb2.Candle]:
    return [common_pb2.Candle(open_time_ms=int(r.open_time_ms), open=r.open, high=r.high, low=r.low, close=r.close,
                              volume=r.volume) for r in frame.itertuples(index=False)]


def info(stub, model_id: str) -> common_pb2.ModelInfo:
    models = stub.ListModels(training_pb2.ListModelsRequest(), timeout=30).models
    return next(m for m in models if m.model_id == model_id)


def serving_id(s, symbol: str) -> str:
    return s.infer_stub.GetModel(inference_pb2.GetModelRequest(symbol=symbol, timeframe=TF), timeout=30).model_id


def wait_serving(s, symbol: str, model_id: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while serving_id(s, symbol) != model_id:
        assert time.monotonic() < deadline, f"{model_id} does not serve {symbol}"
        time.sleep(0.1)


def code_of(fn) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def beats_prior(m: common_pb2.ModelInfo) -> None:
    """Below the prior on the held-back test part, with a shrink weight above 0 both there and in the served model
    (a model shrunk fully to the prior has the prior's log loss and beats nothing)."""
    require_beats_prior(m.metrics["log_loss"], m.metrics["prior_log_loss"], m.metrics["eval_shrink_weight"],
                        what=f"model {m.model_id} on its held-back test part")
    assert m.metrics["shrink_weight"] > 0, f"model {m.model_id} serves the class prior (shrink weight 0)"


def test_a_model_that_beats_the_prior_serves(services):
    job = services.btc_job
    m = info(services.train_stub, job.model_id)
    beats_prior(m)
    # it served from its registration on (later tests of the session may have replaced it since)
    changes = services.train_stub.ListModelStageChanges(training_pb2.ListModelStageChangesRequest(
        symbol="BTC/USD", timeframe=TF, model_id=job.model_id), timeout=30).changes
    assert changes[0].stage == STAGE.MODEL_STAGE_SERVING
    assert "out-of-sample log loss" in changes[0].reason and " < prior" in changes[0].reason
    if m.stage == STAGE.MODEL_STAGE_SERVING:
        assert "out-of-sample log loss" in m.stage_reason
    assert serving_id(services, "BTC/USD") == info(services.train_stub, serving_id(services, "BTC/USD")).model_id
    assert info(services.train_stub, serving_id(services, "BTC/USD")).stage == STAGE.MODEL_STAGE_SERVING


def history_of(url: str, symbol: str) -> list[tuple[str, str, str]]:
    engine = make_engine(url)
    try:
        return [(h.model_id, h.stage, h.reason) for h in stage_history(engine, symbol, TF)]
    finally:
        engine.dispose()


def test_under_the_default_a_second_model_shadows_and_promote_and_rollback_verify_the_model_file(services,
                                                                                                  sample_frame):
    symbol = "SHADE/USD"
    engine = make_engine(services.url)
    try:
        insert_candles(engine, symbol, TF, sample_frame)
    finally:
        engine.dispose()
    stub = services.train_stub
    # the same data and parameters as the session's BTC/USD model, which passes the gate: so do both of these
    first = train(stub, symbol=symbol).model_id
    assert info(stub, first).stage == STAGE.MODEL_STAGE_SERVING  # nothing served the market: it serves at once
    second = train(stub, symbol=symbol).model_id
    shadow = info(stub, second)
    beats_prior(shadow)
    assert shadow.stage == STAGE.MODEL_STAGE_SHADOW
    assert " < prior" in shadow.stage_reason and shadow.stage_reason.endswith(
        f"; shadows {first} until live candles decide")
    wait_serving(services, symbol, first)

    def refused(call, request) -> str:
        before = history_of(services.url, symbol)
        code, details = code_of(lambda: call(request, timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert history_of(services.url, symbol) == before  # nothing changed
        return details

    path = services.model_dir / f"{second}.onnx"
    data = path.read_bytes()
    promote = training_pb2.PromoteModelRequest(model_id=second, reason="looks better")
    path.unlink()
    details = refused(stub.PromoteModel, promote)
    assert details.startswith("model_id: ") and second in details and f"{path} is missing" in details
    path.write_bytes(data + b"\0")  # a file that does not match the registry's sha256
    details = refused(stub.PromoteModel, promote)
    assert str(path) in details and "sha256" in details and info(stub, second).sha256 in details
    assert info(stub, second).stage == STAGE.MODEL_STAGE_SHADOW
    assert info(stub, first).stage == STAGE.MODEL_STAGE_SERVING
    assert serving_id(services, symbol) == first

    path.write_bytes(data)
    assert stub.PromoteModel(promote, timeout=30).stage == STAGE.MODEL_STAGE_SERVING
    wait_serving(services, symbol, second)
    # a rollback checks the file of the model it would bring back
    first_path = services.model_dir / f"{first}.onnx"
    first_data = first_path.read_bytes()
    first_path.unlink()
    rollback = training_pb2.RollbackModelRequest(symbol=symbol, timeframe=TF, reason="worse live")
    details = refused(stub.RollbackModel, rollback)
    assert first in details and f"{first_path} is missing" in details
    assert info(stub, second).stage == STAGE.MODEL_STAGE_SERVING
    first_path.write_bytes(first_data)
    assert stub.RollbackModel(rollback, timeout=30).model_id == first
    wait_serving(services, symbol, first)
    assert [(m, st) for m, st, _ in history_of(services.url, symbol)] == [
        (first, "SERVING"), (second, "SHADOW"), (first, "RETIRED"), (second, "SERVING"), (second, "RETIRED"),
        (first, "SERVING")]
    # the one model that served before the first: nothing
    code, details = code_of(lambda: stub.RollbackModel(rollback, timeout=30))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to roll back to" in details


def test_promote_and_rollback_switch_an_open_stream_at_a_message_boundary(services, sample_frame):
    symbol = "LIFE/USD"
    engine = make_engine(services.url)
    try:
        insert_candles(engine, symbol, TF, sample_frame)
    finally:
        engine.dispose()
    stub = services.train_stub
    a = train(stub, symbol=symbol, start="2018-01-01", end="2019-01-01").model_id
    b = train(stub, symbol=symbol, start="2018-02-01", end="2019-01-01",
              params=common_pb2.ModelParams(n_estimators=40, random_state=3)).model_id
    assert stub.PromoteModel(training_pb2.PromoteModelRequest(model_id=a, reason="start from a"),
                             timeout=30).stage == STAGE.MODEL_STAGE_SERVING
    wait_serving(services, symbol, a)

    frame = sample_frame[sample_frame.open_time_ms >= ms("2018-12-20")].iloc[:600].reset_index(drop=True)
    q: queue.Queue = queue.Queue()

    def requests():
        first = True
        while (item := q.get()) is not None:
            yield inference_pb2.PredictRequest(symbol=symbol if first else "", timeframe=TF if first else "",
                                               candles=candles_of(item))
            first = False

    call = services.infer_stub.StreamPredict(requests(), timeout=300)
    responses: list[inference_pb2.PredictResponse] = []
    sent = [150]
    q.put(frame.iloc[:150])
    responses.append(next(call))

    def follow_until(model_id: str) -> None:
        deadline = time.monotonic() + 20
        while responses[-1].model_id != model_id:
            assert time.monotonic() < deadline, f"the stream did not switch to {model_id}"
            i = sent[-1]
            q.put(frame.iloc[[i]])
            sent.append(i + 1)
            responses.append(next(call))
            time.sleep(0.05)

    promoted = stub.PromoteModel(training_pb2.PromoteModelRequest(model_id=b, reason="b is better"), timeout=30)
    assert promoted.model_id == b and promoted.stage == STAGE.MODEL_STAGE_SERVING and promoted.stage_reason
    follow_until(b)
    switched_at = len(responses)
    rolled = stub.RollbackModel(training_pb2.RollbackModelRequest(symbol=symbol, timeframe=TF, reason="b is worse"),
                                timeout=30)
    assert rolled.model_id == a and rolled.stage == STAGE.MODEL_STAGE_SERVING and "b is worse" in rolled.stage_reason
    follow_until(a)
    q.put(None)
    list(call)

    ids = [r.model_id for r in responses]
    # a, then b, then a again: exactly two switches, each between two messages
    runs = [ids[0]] + [m for prev, m in itertools.pairwise(ids) if m != prev]
    assert runs == [a, b, a]
    assert all(len(r.predictions) == (150 if k == 0 else 1) for k, r in enumerate(responses))
    # no message mixes models: each answer is exactly what its model gives for the candles so far
    for k in (switched_at - 1, len(responses) - 1):
        pinned = services.infer_stub.Predict(inference_pb2.PredictRequest(
            symbol=symbol, timeframe=TF, model_id=responses[k].model_id, candles=candles_of(frame.iloc[:sent[k]])),
            timeout=30)
        got = responses[k].predictions[-1]
        want = pinned.predictions[-1]
        assert (got.ml_up_prob, got.ml_down_prob, got.ml_range_prob) == (
            want.ml_up_prob, want.ml_down_prob, want.ml_range_prob)
    assert info(stub, b).stage == STAGE.MODEL_STAGE_RETIRED

    engine = make_engine(services.url)
    try:
        history = [(h.model_id, h.stage) for h in stage_history(engine, symbol, TF)]
    finally:
        engine.dispose()
    assert history[-4:] == [(a, "RETIRED"), (b, "SERVING"), (b, "RETIRED"), (a, "SERVING")]


def test_walk_forward_never_changes_the_serving_model(services, sample_frame):
    from mlsignal.client import InferenceClient, TrainingClient
    from mlsignal.walkforward import DAY_MS, walk_forward

    before = serving_id(services, "BTC/USD")
    start, end = ms("2019-01-01"), ms("2019-01-11")
    window = 200 * DAY_MS
    keep = (sample_frame.open_time_ms >= start - window - 2 * DAY_MS) & (sample_frame.open_time_ms < end)
    frame = sample_frame[keep].reset_index(drop=True)
    with TrainingClient(f"127.0.0.1:{services.training.port}") as training, \
            InferenceClient(f"127.0.0.1:{services.inference.port}") as inference:
        out = walk_forward(training, inference, frame, "BTC/USD", TF, start, end, window, 5 * DAY_MS,
                           horizon_bars=24, threshold=0.02, n_estimators=20, random_state=5)
        research = [m for m in training.list_models("BTC/USD", TF) if m.stage == STAGE.MODEL_STAGE_RESEARCH]
    assert len(out) > 0 and len(research) >= 2
    assert all("research" in m.stage_reason for m in research)
    time.sleep(3 * services.settings.model_poll_seconds)
    assert serving_id(services, "BTC/USD") == before


def test_gate_rejects_under_a_strict_tolerance_and_manual_mode_waits(tmp_path, sample_frame):
    url = f"sqlite:///{tmp_path}/gate.db"
    load_market(url, sample_frame, ("BTC/USD",))
    s = start_services(url, tmp_path / "models", promotion_tolerance=-0.5)
    try:
        stub = s.train_stub
        rejected = train(stub)
        m = info(stub, rejected.model_id)
        assert m.stage == STAGE.MODEL_STAGE_REJECTED
        loss, prior = m.metrics["log_loss"], m.metrics["prior_log_loss"]
        assert m.stage_reason == f"out-of-sample log loss {loss:.4f} >= prior {prior:.4f} \u00d7 (1 + -0.5)"
        code, details = code_of(lambda: serving_id(s, "BTC/USD"))
        assert code == grpc.StatusCode.NOT_FOUND and "no model is serving" in details
        # a rejected model can still be used pinned
        pinned = s.infer_stub.Predict(inference_pb2.PredictRequest(
            symbol="BTC/USD", timeframe=TF, model_id=rejected.model_id,
            candles=candles_of(sample_frame.iloc[-300:])), timeout=30)
        assert pinned.model_id == rejected.model_id
        rollback = training_pb2.RollbackModelRequest(symbol="BTC/USD", timeframe=TF)
        assert code_of(lambda: stub.RollbackModel(rollback, timeout=30))[0] == grpc.StatusCode.FAILED_PRECONDITION
        assert code_of(lambda: stub.PromoteModel(training_pb2.PromoteModelRequest(model_id="nope"), timeout=30))[0] \
            == grpc.StatusCode.NOT_FOUND
        promoted = stub.PromoteModel(training_pb2.PromoteModelRequest(model_id=rejected.model_id), timeout=30)
        assert promoted.stage == STAGE.MODEL_STAGE_SERVING and promoted.stage_reason == "promoted by operator"
        wait_serving(s, "BTC/USD", rejected.model_id)
        # the only model that ever served: nothing to roll back to
        code, details = code_of(lambda: stub.RollbackModel(rollback, timeout=30))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "nothing to roll back to" in details
        bad = training_pb2.RollbackModelRequest(symbol="BTC/USD", timeframe="2h")
        assert code_of(lambda: stub.RollbackModel(bad, timeout=30))[0] == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop_services(s)

    s = start_services(url, tmp_path / "models", promotion="manual")
    try:
        job = s.train_stub.StartTraining(training_pb2.StartTrainingRequest(
            symbol="BTC/USD", timeframe=TF, start_time=ts("2018-03-01"), end_time=ts("2019-01-01"),
            params=SMALL_PARAMS), timeout=30)
        candidate = wait_job(s.train_stub, job.job_id)
        m = info(s.train_stub, candidate.model_id)
        assert m.stage == STAGE.MODEL_STAGE_CANDIDATE and "MLSIGNAL_PROMOTION=manual" in m.stage_reason
        time.sleep(3 * s.settings.model_poll_seconds)
        assert serving_id(s, "BTC/USD") == rejected.model_id
    finally:
        stop_services(s)

    # MLSIGNAL_PROMOTION=auto: a model past the gate replaces the serving one at once
    s = start_services(url, tmp_path / "models", promotion="auto")
    try:
        replacing = train(s.train_stub)
        m = info(s.train_stub, replacing.model_id)
        assert m.stage == STAGE.MODEL_STAGE_SERVING and " < prior" in m.stage_reason
        beats_prior(m)
        assert info(s.train_stub, rejected.model_id).stage_reason == f"replaced by {replacing.model_id}"
        wait_serving(s, "BTC/USD", replacing.model_id)
    finally:
        stop_services(s)


def test_bad_promotion_settings_are_refused_at_start(tmp_path):
    from shared.settings import Settings

    with pytest.raises(ValueError, match="MLSIGNAL_PROMOTION"):
        Settings(promotion="sometimes").validate()
    with pytest.raises(ValueError, match="MLSIGNAL_PROMOTION_TOLERANCE"):
        Settings(promotion_tolerance=-1.0).validate()
    with pytest.raises(ValueError, match="MLSIGNAL_RESEARCH_KEEP"):
        Settings(research_keep=0).validate()
    assert np.isfinite(Settings().promotion_tolerance)
