"""InferenceService through real gRPC on 127.0.0.1:0, serving models trained by the real training service."""

from __future__ import annotations

import io
import itertools
import math
import threading
import time

import grpc
import joblib
import numpy as np
import pandas as pd
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from service_fixtures import ms, train
from shared.artifacts import read_verified
from shared.calibration import shrink_to_prior
from shared.features import compute_features
from shared.store import registry as reg
from shared.store.db import make_engine
from shared.store.registry import get_model

SYMBOL, TF = "BTC/USD", "1h"
TOLERANCE = 1e-6  # ONNX Runtime sums float32 leaf values; scikit-learn sums float64


def candles_of(frame: pd.DataFrame) -> list[common_pb2.Candle]:
    out = []
    for row in frame.itertuples(index=False):
        c = common_pb2.Candle(open_time_ms=int(row.open_time_ms), open=row.open, high=row.high, low=row.low,
                              close=row.close, volume=row.volume)
        for opt in ("funding_rate", "open_interest"):
            v = getattr(row, opt, math.nan)
            if not math.isnan(v):
                setattr(c, opt, v)
        out.append(c)
    return out


def predict(stub, frame, symbol=SYMBOL, model_id=""):
    return stub.Predict(inference_pb2.PredictRequest(symbol=symbol, timeframe=TF, model_id=model_id,
                                                     candles=candles_of(frame)), timeout=30)


def probs(resp) -> np.ndarray:
    return np.array([[p.ml_down_prob, p.ml_range_prob, p.ml_up_prob] for p in resp.predictions])


def stream_all(stub, chunks, symbol=SYMBOL, model_id=""):
    reqs = [inference_pb2.PredictRequest(symbol=symbol if i == 0 else "", timeframe=TF if i == 0 else "",
                                         model_id=model_id if i == 0 else "", candles=candles_of(c))
            for i, c in enumerate(chunks)]
    return list(stub.StreamPredict(iter(reqs), timeout=120))


@pytest.fixture(scope="module")
def y2019(sample_frame):
    f = sample_frame[(sample_frame.open_time_ms >= ms("2018-12-20")) & (sample_frame.open_time_ms < ms("2019-03-01"))]
    return f.reset_index(drop=True)


def test_health_and_reflection(services):
    resp = services.health_stub.Check(health_pb2.HealthCheckRequest(service="mlsignal.v1.InferenceService"))
    assert resp.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(services.inference_channel)
    out = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in out[0].list_services_response.service}
    assert {"mlsignal.v1.InferenceService", "grpc.health.v1.Health"} <= names


def test_predictions_shape_warmup_sum_and_variation(services, y2019):
    mid = services.btc_job.model_id  # pinned: other tests register newer BTC/USD models
    resp = predict(services.infer_stub, y2019, model_id=mid)
    info = next(m for m in services.train_stub.ListModels(training_pb2.ListModelsRequest(symbol=SYMBOL)).models
                if m.model_id == mid)
    assert resp.model_id == mid
    assert [p.open_time_ms for p in resp.predictions] == y2019.open_time_ms.tolist()
    ready = np.array([p.ready for p in resp.predictions])
    w = info.warmup_bars
    assert not ready[: w - 1].any() and ready[w - 1:].all()
    P = probs(resp)
    assert np.isnan(P[~ready]).all()
    assert np.allclose(P[ready].sum(axis=1), 1.0, atol=1e-12)
    assert ((P[ready] > 0) & (P[ready] < 1)).all()
    # a per-candle signal: many distinct values, not one number copied to every row
    assert len(np.unique(np.round(P[ready, 2], 12))) > 0.9 * ready.sum()
    assert P[ready, 2].std() > 1e-3
    # 2018-12-20..31 lies in the training window, 2019 does not
    ins = np.array([p.in_sample for p in resp.predictions])
    assert ins[(y2019.open_time_ms < ms("2019-01-01")).to_numpy()].all()
    assert not ins[(y2019.open_time_ms >= ms("2019-01-01")).to_numpy()].any()


def test_served_probabilities_match_scikit_learn(services, y2019):
    engine = make_engine(services.url)
    rec = get_model(engine, services.btc_job.model_id)
    engine.dispose()
    forest = joblib.load(io.BytesIO(read_verified(services.model_dir, rec.sklearn_artifact, rec.sklearn_sha256)))
    X = compute_features(y2019, rec.feature_spec).to_numpy()
    ok = np.isfinite(X).all(axis=1)
    expected = shrink_to_prior(forest.predict_proba(X[ok].astype(np.float32)), np.array(rec.prior), rec.shrink_weight)
    served = probs(predict(services.infer_stub, y2019, model_id=rec.model_id))[ok]
    assert np.max(np.abs(served - expected)) <= TOLERANCE


def test_stream_one_by_one_chunks_and_batch_agree_exactly(services, y2019):
    frame = y2019.iloc[:400]
    batch = predict(services.infer_stub, frame, model_id=services.btc_job.model_id)
    one = stream_all(services.infer_stub, [frame.iloc[i:i + 1] for i in range(len(frame))],
                     model_id=services.btc_job.model_id)
    sizes = [1, 7, 93, 3, 150, 146]
    bounds = np.cumsum([0, *sizes])
    chunks = stream_all(services.infer_stub, [frame.iloc[a:b] for a, b in itertools.pairwise(bounds)],
                        model_id=services.btc_job.model_id)
    flat_one = [p for r in one for p in r.predictions]
    flat_chunks = [p for r in chunks for p in r.predictions]
    assert [len(r.predictions) for r in chunks] == sizes
    for preds in (flat_one, flat_chunks):
        assert [p.open_time_ms for p in preds] == [p.open_time_ms for p in batch.predictions]
        assert [p.ready for p in preds] == [p.ready for p in batch.predictions]
        got = np.array([[p.ml_down_prob, p.ml_range_prob, p.ml_up_prob] for p in preds])
        assert np.array_equal(got, probs(batch), equal_nan=True)  # exact, not approximately
        # the out-of-distribution score too, bit for bit, and its flag
        assert all(p.HasField("ood_score") for p in preds)
        assert [np.float64(p.ood_score).tobytes() for p in preds] == \
            [np.float64(p.ood_score).tobytes() for p in batch.predictions]
        assert [p.ood for p in preds] == [p.ood for p in batch.predictions]
    scores = np.array([p.ood_score for p in batch.predictions])
    ready = np.array([p.ready for p in batch.predictions])
    assert np.isnan(scores[~ready]).all() and np.isfinite(scores[ready]).all()
    assert len(np.unique(scores[ready])) == ready.sum(), "a score per candle"
    assert not any(p.ood for p in batch.predictions if not p.ready)


def test_candles_far_outside_the_training_rows_are_flagged(services, sample_frame):
    """Tenfold volatility (and prices): most candles are flagged; the untouched candles of the same period mostly
    not. The threshold flags 1 % of the model's training rows."""
    engine = make_engine(services.url)
    rec = get_model(engine, services.btc_job.model_id)
    engine.dispose()
    assert rec is not None and rec.ood is not None and 0.005 <= rec.metrics["ood_rate_train"] <= 0.02
    assert rec.metrics["ood_threshold"] == rec.ood.threshold
    times = sample_frame.open_time_ms
    frame = sample_frame[(times >= ms("2018-12-01")) & (times < ms("2019-02-01"))].reset_index(drop=True)
    log_close = np.log(frame.close.to_numpy())
    start = 200  # the first 200 candles as they were, then every move ten times larger
    r = np.diff(log_close)
    r[start - 1:] *= 10
    new_log = log_close[0] + np.concatenate([[0.0], np.cumsum(r)])
    new_log[start:] += np.log(10)
    wild = frame.copy()
    for c in ("open", "high", "low"):
        offset = np.log(frame[c].to_numpy()) - log_close
        offset[start:] *= 10
        wild[c] = np.exp(new_log + offset)
    wild["close"] = np.exp(new_log)
    calm = predict(services.infer_stub, frame, model_id=services.btc_job.model_id).predictions
    out = predict(services.infer_stub, wild, model_id=services.btc_job.model_id).predictions
    settle = start + 100  # every feature's window lies in the scaled part
    wild_rate = np.mean([p.ood for p in out[settle:]])
    calm_rate = np.mean([p.ood for p in calm[settle:]])
    assert wild_rate > 0.6 and calm_rate < 0.2, (wild_rate, calm_rate)


def test_no_look_ahead(services, y2019):
    frame = y2019.iloc[:600].reset_index(drop=True)
    base = probs(predict(services.infer_stub, frame, model_id=services.btc_job.model_id))
    t = 350
    changed = frame.copy()
    rng = np.random.default_rng(1)
    scale = rng.uniform(0.5, 2.0, size=len(frame) - t - 1)
    for col in ("open", "high", "low", "close"):
        changed.loc[t + 1:, col] = changed.loc[t + 1:, col].to_numpy() * scale
    changed.loc[t + 1:, "volume"] = changed.loc[t + 1:, "volume"].to_numpy() * 10
    after = probs(predict(services.infer_stub, changed, model_id=services.btc_job.model_id))
    assert np.array_equal(after[: t + 1], base[: t + 1], equal_nan=True)
    assert not np.array_equal(after[t + 1:], base[t + 1:], equal_nan=True)
    truncated = probs(predict(services.infer_stub, frame.iloc[: t + 1], model_id=services.btc_job.model_id))
    assert np.array_equal(truncated, base[: t + 1], equal_nan=True)


def test_forming_candle_replaces_the_last(services, y2019):
    frame = y2019.iloc[:200].reset_index(drop=True)
    stub = services.infer_stub
    forming = frame.iloc[[199]].copy()
    forming[["close", "high"]] = forming[["close", "high"]] * 1.03
    forming["low"] = forming["low"] * 0.99
    resps = stream_all(stub, [frame.iloc[:199], forming, frame.iloc[[199]]], model_id=services.btc_job.model_id)
    assert resps[1].predictions[0].open_time_ms == resps[2].predictions[0].open_time_ms
    final = probs(predict(stub, frame, model_id=services.btc_job.model_id))
    assert np.array_equal(probs(resps[2])[0], final[199])
    with_forming = pd.concat([frame.iloc[:199], forming])
    pinned = services.btc_job.model_id
    assert np.array_equal(probs(resps[1])[0], probs(predict(stub, with_forming, model_id=pinned))[199])
    assert not np.array_equal(probs(resps[1])[0], final[199])


def _err(fn):
    with pytest.raises(grpc.RpcError) as err:
        fn()
    return err.value.code(), err.value.details()


def test_error_table(services, y2019):
    stub = services.infer_stub
    good = y2019.iloc[:150].reset_index(drop=True)
    reference = probs(predict(stub, good, model_id=services.btc_job.model_id))

    def bad(changes):
        f = good.copy()
        for (col, row), value in changes.items():
            f.loc[row, col] = value
        return f

    cases = [
        (lambda: predict(stub, good, symbol="ETH/USD"), grpc.StatusCode.NOT_FOUND, "ETH/USD"),
        (lambda: predict(stub, good, model_id="no-such-model"), grpc.StatusCode.NOT_FOUND, "model_id"),
        (lambda: stub.Predict(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe="7m", candles=candles_of(good))),
         grpc.StatusCode.INVALID_ARGUMENT, "timeframe"),
        (lambda: stub.Predict(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF)),
         grpc.StatusCode.INVALID_ARGUMENT, "candles"),
        (lambda: predict(stub, bad({("close", 40): float("nan")})), grpc.StatusCode.INVALID_ARGUMENT,
         "candles[40].close"),
        (lambda: predict(stub, bad({("open", 3): float("inf")})), grpc.StatusCode.INVALID_ARGUMENT, "candles[3].open"),
        (lambda: predict(stub, bad({("low", 7): -1.0})), grpc.StatusCode.INVALID_ARGUMENT, "candles[7].low"),
        (lambda: predict(stub, bad({("high", 9): 1.0})), grpc.StatusCode.INVALID_ARGUMENT, "candles[9].high"),
        (lambda: predict(stub, bad({("volume", 11): -5.0})), grpc.StatusCode.INVALID_ARGUMENT, "candles[11].volume"),
        (lambda: predict(stub, bad({("open_time_ms", 20): int(good.open_time_ms[19])})),
         grpc.StatusCode.INVALID_ARGUMENT, "candles[20].open_time_ms"),
        (lambda: predict(stub, bad({("open_time_ms", 20): int(good.open_time_ms[20]) + 1})),
         grpc.StatusCode.INVALID_ARGUMENT, "candles[20].open_time_ms"),
    ]
    for call, code, text in cases:
        got_code, details = _err(call)
        assert got_code == code and text in details, (code, text, got_code, details)
        # the service still answers correctly afterwards
        assert np.array_equal(probs(predict(stub, good, model_id=services.btc_job.model_id)), reference, equal_nan=True)


def test_oversized_batch_is_rejected_and_max_batch_fits(services, sample_frame):
    stub = services.infer_stub
    n = services.settings.max_batch
    code, details = _err(lambda: predict(stub, sample_frame.iloc[: n + 1]))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "10000" in details
    resp = predict(stub, sample_frame.iloc[:n])
    assert len(resp.predictions) == n


def test_a_bad_stream_message_is_answered_and_the_stream_goes_on(services, y2019):
    """A refused message gets `error` (code and field) and no predictions; the stream keeps its state, and its later
    answers equal Predict over the good candles only. Another stream alongside is not disturbed."""
    from google.rpc import code_pb2, error_details_pb2

    stub = services.infer_stub
    good = y2019.iloc[:120]
    healthy_q: list = []
    done = threading.Event()

    def healthy():
        for r in stream_all(stub, [good.iloc[i:i + 10] for i in range(0, 120, 10)], model_id=services.btc_job.model_id):
            healthy_q.append(r)
        done.set()

    th = threading.Thread(target=healthy)
    th.start()
    backwards = good.iloc[[50, 40]]
    answers = stream_all(stub, [good.iloc[:50], backwards, good.iloc[50:120]], model_id=services.btc_job.model_id)
    assert len(answers) == 3
    refused = answers[1]
    assert refused.error.code == code_pb2.INVALID_ARGUMENT and not refused.predictions and not refused.model_id
    assert "open_time_ms" in refused.error.message
    violations = error_details_pb2.BadRequest()
    assert refused.error.details[0].Unpack(violations)
    assert violations.field_violations[0].field.startswith("candles[")
    assert not answers[0].HasField("error") and not answers[2].HasField("error")
    got = np.vstack([probs(answers[0]), probs(answers[2])])
    want = probs(predict(stub, good, model_id=services.btc_job.model_id))
    assert np.array_equal(got, want, equal_nan=True)

    no_symbol = list(stub.StreamPredict(iter([inference_pb2.PredictRequest(candles=candles_of(good.iloc[:3]))]),
                                        timeout=10))
    assert no_symbol[0].error.code == code_pb2.INVALID_ARGUMENT and "symbol" in no_symbol[0].error.message
    th.join(60)
    assert done.is_set() and len(healthy_q) == 12
    got = np.vstack([probs(r) for r in healthy_q])
    assert np.array_equal(got, probs(predict(stub, good, model_id=services.btc_job.model_id)), equal_nan=True)


def test_sixteen_concurrent_streams_on_two_markets(services, sample_frame):
    """16 streams at once over two different markets each get exactly their own market's predictions."""
    from service_fixtures import inverted

    stub = services.infer_stub
    models = {
        "BTC/USD": stub.GetModel(inference_pb2.GetModelRequest(symbol="BTC/USD", timeframe=TF)).model_id,
        "INV/USD": train(services.train_stub, symbol="INV/USD").model_id,
    }
    base = sample_frame[sample_frame.open_time_ms >= ms("2019-02-01")].reset_index(drop=True)
    jobs = []
    for i in range(16):
        symbol = "BTC/USD" if i % 2 == 0 else "INV/USD"
        frame = base.iloc[i * 20: i * 20 + 300]
        frame = inverted(frame) if symbol == "INV/USD" else frame
        jobs.append((symbol, frame.reset_index(drop=True)))
    results: dict[int, list] = {}
    errors: list = []

    def run(i, symbol, frame):
        try:
            results[i] = stream_all(stub, [frame.iloc[k:k + 25] for k in range(0, len(frame), 25)], symbol=symbol,
                                    model_id=models[symbol])
        except Exception as exc:  # surfaced below with the stream's index
            errors.append((i, exc))

    threads = [threading.Thread(target=run, args=(i, s, f)) for i, (s, f) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for i, (symbol, frame) in enumerate(jobs):
        got = np.vstack([probs(r) for r in results[i]])
        want = probs(predict(stub, frame, symbol=symbol, model_id=models[symbol]))
        assert np.array_equal(got, want, equal_nan=True), i
        assert {r.model_id for r in results[i]} == {models[symbol]}
    # the two markets really differ: same times, different predictions
    assert not np.array_equal(np.vstack([probs(r) for r in results[0]]), np.vstack([probs(r) for r in results[1]]))


def test_funding_model_needs_funding_on_candles(tmp_path, sample_frame):
    """A model trained with funding-rate features refuses candles without it (FAILED_PRECONDITION)."""
    from service_fixtures import load_market, start_services, stop_services
    from shared.store.marketdata import insert_series

    url = f"sqlite:///{tmp_path}/f.db"
    frame = sample_frame[(sample_frame.open_time_ms >= ms("2018-01-01")) &
                         (sample_frame.open_time_ms < ms("2018-09-01"))].reset_index(drop=True)
    load_market(url, frame)
    # Synthetic funding rate (no real series ships with the project): published every 8 hours.
    rng = np.random.default_rng(3)
    times = np.arange(ms("2017-12-31"), ms("2018-09-01"), 8 * 3_600_000)
    engine = make_engine(url)
    funding = pd.DataFrame({"time_ms": times, "value": rng.normal(1e-4, 3e-4, len(times))})
    insert_series(engine, "funding-rate", SYMBOL, funding)
    engine.dispose()
    s = start_services(url, tmp_path / "models")
    try:
        job = train(s.train_stub, start="2018-01-01", end="2018-09-01")
        # pinned: whether this short synthetic-funding model passes the promotion gate is beside the point here
        listed = s.train_stub.ListModels(training_pb2.ListModelsRequest(symbol=SYMBOL, timeframe=TF)).models
        info = next(m for m in listed if m.model_id == job.model_id)
        assert any("funding" in f for f in info.features)
        window = frame.iloc[-200:].reset_index(drop=True)
        code, details = _err(lambda: predict(s.infer_stub, window, model_id=job.model_id))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "funding_rate" in details
        with_funding = window.assign(funding_rate=1e-4)
        resp = predict(s.infer_stub, with_funding, model_id=job.model_id)
        assert sum(p.ready for p in resp.predictions) > 0
    finally:
        stop_services(s)


def get_registered(services, model_id: str) -> reg.ModelRecord:
    engine = make_engine(services.url)
    try:
        found = get_model(engine, model_id)
    finally:
        engine.dispose()
    assert found is not None
    return found


def test_hot_reload_switches_an_open_stream(services, y2019):
    stub = services.infer_stub
    old = stub.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF)).model_id
    frame = y2019.iloc[:400].reset_index(drop=True)
    import queue

    q: queue.Queue = queue.Queue()
    responses = []

    def requests():
        first = True
        while True:
            item = q.get()
            if item is None:
                return
            yield inference_pb2.PredictRequest(symbol=SYMBOL if first else "", timeframe=TF if first else "",
                                               candles=candles_of(item))
            first = False

    call = stub.StreamPredict(requests(), timeout=300)
    q.put(frame.iloc[:150])
    responses.append(next(call))
    assert responses[0].model_id == old
    new = train(services.train_stub, start="2018-02-01", end="2019-01-01").model_id
    # under the default promotion (shadow) the new model shadows the serving one: the stream keeps its model
    registered = get_registered(services, new)
    assert registered.stage == reg.SHADOW and registered.stage_reason.endswith(
        f"; shadows {old} until live candles decide")
    time.sleep(3 * services.settings.model_poll_seconds)  # inference has seen the new row
    q.put(frame.iloc[[150]])
    responses.append(next(call))
    assert responses[-1].model_id == old
    # once it serves, the open stream switches to it
    services.train_stub.PromoteModel(training_pb2.PromoteModelRequest(model_id=new, reason="hot reload"), timeout=30)
    deadline = time.monotonic() + 20
    i = 151
    while responses[-1].model_id != new and time.monotonic() < deadline:
        q.put(frame.iloc[[i]])
        responses.append(next(call))
        i += 1
        time.sleep(0.05)
    q.put(None)
    list(call)
    assert responses[-1].model_id == new
    ids = [r.model_id for r in responses]
    assert set(ids) == {old, new} and ids == sorted(ids, key=lambda m: m == new)  # one switch, at a boundary
    # the new model's answer for the last candle equals a Predict pinned to the new model
    pinned = predict(stub, frame.iloc[:i], model_id=new)
    assert np.array_equal(probs(responses[-1])[0], probs(pinned)[-1])
    # pinning the old model still works
    assert predict(stub, frame.iloc[:i], model_id=old).model_id == old


def test_corrupted_newer_model_is_refused_and_previous_keeps_serving(services, y2019, caplog):
    import dataclasses
    import shutil

    from shared.store.registry import insert_model, promote, serving_model

    stub = services.infer_stub
    serving = stub.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF)).model_id
    engine = make_engine(services.url)
    rec = serving_model(engine, SYMBOL, TF)
    assert rec.model_id == serving
    bad_name = "corrupt-copy.onnx"
    shutil.copy(services.model_dir / rec.artifact, services.model_dir / bad_name)
    with open(services.model_dir / bad_name, "r+b") as fh:  # truncate: a half-written file
        fh.truncate(1000)
    fake = dataclasses.replace(rec, model_id="corrupt-copy", artifact=bad_name, created_at_ms=rec.created_at_ms + 1)
    with engine.begin() as conn:
        insert_model(conn, fake)
    try:
        before = probs(predict(stub, y2019.iloc[:200]))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            time.sleep(0.3)
            resp = predict(stub, y2019.iloc[:200])
            assert resp.model_id == serving
        assert np.array_equal(probs(resp), before, equal_nan=True)
        refusals = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert any("corrupt-copy refused" in m and "sha256" in m for m in refusals), refusals
    finally:
        from shared.store.db import models as models_table

        promote(engine, serving, "the corrupted copy is removed")
        with engine.begin() as conn:
            conn.execute(models_table.delete().where(models_table.c.model_id == "corrupt-copy"))
        engine.dispose()
