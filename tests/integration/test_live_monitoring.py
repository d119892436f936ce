"""Live outcome monitoring through the real services: predictions served by inference are scored on the labels the
candles it later receives realise, exactly as an independent computation from the served answers and
`shared.labels.make_labels` over the same candles; once per model and candle, in the final version of a forming
candle, never in-sample or before warm-up, and the scores survive a restart. Runs on SQLite and PostgreSQL.

Each test registers its own copy of the session's BTC/USD model (trained on 2018) under a market of its own, so it
is the only one scoring that model; it streams the BTC/USD candles of 2019 (out of sample) under that market.
"""

from __future__ import annotations

import itertools
import json
import math
import time
import urllib.request
import uuid
from dataclasses import replace

import grpc
import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import _free_port
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from service_fixtures import ms
from shared.calibration import EPS
from shared.labels import CLASSES, FIXED_HORIZON, TRIPLE_BARRIER, make_labels
from shared.store.db import live_predictions, live_scores, make_engine, models
from shared.store.registry import ModelRecord, get_model

TF, TF_MS = "1h", 3_600_000
_markets = itertools.count()


def candles_of(frame: pd.DataFrame) -> list[common_pb2.Candle]:
    return [common_pb2.Candle(open_time_ms=int(r.open_time_ms), open=r.open, high=r.high, low=r.low, close=r.close,
                              volume=r.volume) for r in frame.itertuples(index=False)]


def window(frame: pd.DataFrame, start: str, end: str) -> pd.DataFrame:
    return frame[(frame.open_time_ms >= ms(start)) & (frame.open_time_ms < ms(end))].reset_index(drop=True)


def new_market(services, kind: str = FIXED_HORIZON, created_ago_ms: int = 0, write_kind: bool = True) -> ModelRecord:
    """A copy of the session's BTC/USD model registered (SERVING where the registry has stages) for a new symbol.
    `write_kind` False leaves the label kind out of the copy's manifest, as a registry that does not keep it would."""
    symbol = f"LV{next(_markets)}X{uuid.uuid4().hex[:4].upper()}/USD"
    engine = make_engine(services.url)
    try:
        with engine.begin() as conn:
            row = dict(conn.execute(sa.select(models).where(
                models.c.model_id == services.btc_job.model_id)).one()._mapping)
            model_id = uuid.uuid4().hex
            manifest = json.loads(row["manifest"])
            manifest["label_kind"] = kind
            if not write_kind:
                del manifest["label_kind"]
            row.update(model_id=model_id, symbol=symbol, manifest=json.dumps(manifest, sort_keys=True))
            if created_ago_ms:
                row["created_at"] = int(time.time() * 1000) - created_ago_ms
            if "stage" in row:
                row.update(stage="SERVING", stage_reason="live monitoring test")
            conn.execute(models.insert().values(**row))
        record = get_model(engine, model_id)
    finally:
        engine.dispose()
    # A registry that cannot keep the label kind this test needs is a failure, never a skip: scoring a triple-barrier
    # model as a fixed-horizon one would compare the wrong labels.
    assert record is not None, f"model {model_id} was inserted but the registry does not return it"
    assert record.label.kind == kind, f"the registry does not keep label kind {kind}: it reads {record.label.kind}"
    return record


def stream_one_by_one(stub, frame: pd.DataFrame, record: ModelRecord) -> list[inference_pb2.PredictResponse]:
    reqs = (inference_pb2.PredictRequest(symbol=record.symbol if i == 0 else "", timeframe=TF if i == 0 else "",
                                         model_id=record.model_id if i == 0 else "", candles=candles_of(frame[i:i + 1]))
            for i in range(len(frame)))
    out = list(stub.StreamPredict(reqs, timeout=300))
    assert all(not r.HasField("error") for r in out)
    return out


def performance(stub, record: ModelRecord, model_id: str | None = None) -> inference_pb2.LivePerformance:
    return stub.GetLivePerformance(inference_pb2.GetLivePerformanceRequest(
        symbol=record.symbol, timeframe=TF, model_id=record.model_id if model_id is None else model_id), timeout=30)


def settled(stub, record: ModelRecord, expect: int | None = None, quiet: float = 2.6,
            timeout: float = 60) -> inference_pb2.LivePerformance:
    """GetLivePerformance once the journal has written everything: the count has not changed for `quiet` seconds
    (more than two flush periods) and, when given, equals `expect`."""
    deadline = time.monotonic() + timeout
    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        perf = performance(stub, record)
        if last is None or perf.scored != last.scored:
            last, since = perf, time.monotonic()
        elif time.monotonic() - since >= quiet and (expect is None or perf.scored == expect):
            return perf
        time.sleep(0.2)
    raise AssertionError(f"live scores did not settle (last count {last.scored if last else None}, expected {expect})")


def expected_scores(frame: pd.DataFrame, answers: dict[int, tuple], record: ModelRecord) -> dict:
    """The independent computation: for every ready, out-of-sample answer (the last one served per candle), the
    label `make_labels` gives over the same candles, when the candle after t+h was also received (t+h itself may
    still be forming until then)."""
    times = frame.open_time_ms.to_numpy()
    labels = make_labels(frame.close.to_numpy(), record.label, times, TF_MS)
    h = record.label.horizon_bars
    rows = {}
    for i, t in enumerate(times.tolist()):
        if t not in answers or labels[i] < 0 or i + h + 1 >= len(times):
            continue
        proba, ready, in_sample = answers[t]
        if ready and not in_sample:
            rows[t] = (proba, int(labels[i]))
    return rows


def answers_of(responses) -> dict[int, tuple]:
    out: dict[int, tuple] = {}
    for r in responses:
        for p in r.predictions:
            out[p.open_time_ms] = ((p.ml_down_prob, p.ml_range_prob, p.ml_up_prob), p.ready, p.in_sample)
    return out


def check_equal(perf: inference_pb2.LivePerformance, rows: dict, record: ModelRecord) -> None:
    times = sorted(rows)
    proba = np.array([rows[t][0] for t in times])
    y = np.array([rows[t][1] for t in times])
    idx = np.arange(len(y))
    prior = np.asarray(record.prior)
    assert perf.model_id == record.model_id
    assert perf.scored == len(times) > 0
    assert perf.log_loss == pytest.approx(float(-np.mean(np.log(np.clip(proba[idx, y], EPS, 1)))), rel=1e-9)
    assert perf.prior_log_loss == pytest.approx(float(-np.mean(np.log(prior[y]))), rel=1e-9)
    onehot = np.eye(3)[y]
    assert perf.brier == pytest.approx(float(np.mean(np.sum((proba - onehot) ** 2, axis=1))), rel=1e-9)
    assert (perf.first_open_time_ms, perf.last_open_time_ms) == (times[0], times[-1])
    for k, name in enumerate(CLASSES):
        bins = [b for b in perf.reliability if b.class_name == name]
        assert sum(b.count for b in bins) == len(y)
        for b in bins:
            inside = (proba[:, k] >= b.lower) & ((proba[:, k] < b.upper) | (b.upper == 1.0))
            assert b.count == inside.sum()
            assert b.mean_predicted == pytest.approx(proba[inside, k].mean(), rel=1e-9)
            assert b.observed_frequency == pytest.approx((y[inside] == k).mean(), rel=1e-12)


def without_window(perf: inference_pb2.LivePerformance) -> inference_pb2.LivePerformance:
    """The performance without what the drift window holds (in memory, per replica)."""
    out = inference_pb2.LivePerformance()
    out.CopyFrom(perf)
    for name in ("drift", "drift_candles", "ood_rate"):
        out.ClearField(name)
    return out


def scored_rows(url: str, model_id: str) -> dict[int, tuple]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            s = live_scores.c
            return {r.open_time: ((r.p_down, r.p_range, r.p_up), r.label) for r in conn.execute(
                sa.select(s.open_time, s.p_down, s.p_range, s.p_up, s.label).where(s.model_id == model_id))}
    finally:
        engine.dispose()


# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [FIXED_HORIZON, TRIPLE_BARRIER])
def test_a_month_of_live_candles_scores_like_an_independent_computation(services, sample_frame, kind):
    record = new_market(services, kind)
    stub = services.infer_stub
    month = window(sample_frame, "2019-02-01", "2019-03-01")  # after the training window (2018)
    answers = answers_of(stream_one_by_one(stub, month, record))
    assert sum(not a[1] for a in answers.values()) == record.warmup_bars - 1  # the stream starts cold
    rows = expected_scores(month, answers, record)
    perf = settled(stub, record, expect=len(rows))
    check_equal(perf, rows, record)
    # exactly those candles, with the probabilities served: never one that was not ready
    stored = scored_rows(services.url, record.model_id)
    assert set(stored) == set(rows)
    for t, (proba, label) in rows.items():
        assert stored[t][1] == label and stored[t][0] == pytest.approx(proba, abs=0)
    # the model serving the market is this one: an empty model_id gives the same numbers
    assert performance(stub, record, model_id="") == perf

    # serving the same candles again, through Predict, adds nothing
    resp = stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF, model_id=record.model_id,
                                                     candles=candles_of(month)), timeout=60)
    again = answers_of([resp])
    assert {t for t, a in again.items() if a[1]} == {t for t, a in answers.items() if a[1]}
    assert all(again[t] == a for t, a in answers.items() if a[1])  # the same answers as the stream
    assert settled(stub, record) == perf


def test_drift_ood_rate_and_expected_loss_of_the_candles_served(services, sample_frame, tmp_path, capsys):
    """PSI per feature and the OOD rate over the distinct candles served (the same candles served again count once),
    and the expected log loss: the mean entropy of the scored probabilities, computed here from the stored rows."""
    from shared.drift import N_BINS, bin_counts, psi

    record = new_market(services, FIXED_HORIZON)
    assert record.drift is not None and record.ood is not None
    stub = services.infer_stub
    month = window(sample_frame, "2019-02-01", "2019-03-01")
    responses = stream_one_by_one(stub, month, record)
    answers = answers_of(responses)
    perf = settled(stub, record, expect=len(expected_scores(month, answers, record)))
    ready = [p for r in responses for p in r.predictions if p.ready]
    assert perf.drift_candles == min(len(ready), services.settings.drift_window)
    assert perf.ood_rate == pytest.approx(np.mean([p.ood for p in ready[-perf.drift_candles:]]), abs=1e-12)
    names = [d.feature for d in perf.drift]
    assert sorted(names) == sorted(record.feature_spec.feature_names)
    values = [d.psi for d in perf.drift]
    assert values == sorted(values, reverse=True) and all(v >= 0 for v in values)
    # the same index from the features of the candles served, computed independently
    from shared.features import feature_matrix

    cols = {c: month[c].to_numpy(dtype=np.float64) for c in ("open", "high", "low", "close", "volume")}
    X = feature_matrix(cols, record.feature_spec)
    served = X[np.isfinite(X).all(axis=1)][-perf.drift_candles:]
    own = dict(zip(record.feature_spec.feature_names,
                   psi(record.drift.train_fractions, bin_counts(record.drift.bins(served), N_BINS)), strict=True))
    assert {d.feature: d.psi for d in perf.drift} == pytest.approx(own, abs=1e-12)
    # expected log loss: the mean entropy of the probabilities that were scored
    stored = scored_rows(services.url, record.model_id)
    p = np.clip(np.array([v[0] for v in stored.values()]), EPS, 1.0)
    assert perf.expected_log_loss == pytest.approx(float(np.mean(-(p * np.log(p)).sum(axis=1))), rel=1e-9)
    # mlsignal monitor shows them, and --plot draws them
    from mlsignal.cli import main

    plot = tmp_path / "monitor.png"
    target = f"127.0.0.1:{services.inference.port}"
    assert main(["monitor", "--symbol", record.symbol, "--timeframe", TF, "--model-id", record.model_id,
                 "--target", target, "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert f"ood rate    {perf.ood_rate:.1%} of the last {perf.drift_candles} candles served" in out
    assert f"drift (PSI) {perf.drift[0].feature} {perf.drift[0].psi:.2f}" in out
    assert f"expected    {perf.expected_log_loss:>10.4f}" in out
    assert plot.stat().st_size > 10_000
    # serving the same candles again changes neither
    stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF, model_id=record.model_id,
                                              candles=candles_of(month)), timeout=60)
    again = settled(stub, record)
    assert again.drift_candles == perf.drift_candles and list(again.drift) == list(perf.drift)


def _drift_after(stub, record, frame: pd.DataFrame, timeout: float = 30.0) -> inference_pb2.LivePerformance:
    """Predict `frame` with the model, then its LivePerformance once the journal has taken the answer."""
    stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF, model_id=record.model_id,
                                              candles=candles_of(frame)), timeout=120)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        perf = performance(stub, record)
        if perf.drift_candles:
            return perf
        time.sleep(0.2)
    raise AssertionError("the drift window stayed empty")


def test_psi_is_near_zero_on_the_training_window_and_large_in_another_volatility_regime(services, sample_frame):
    """With a window as long as the training year, the candles of the training window give the training deciles
    back (PSI near 0); the same candles with tenfold volatility move the volatility features far (PSI > 0.2)."""
    from inference_service.server import start as start_inference

    year = window(sample_frame, "2018-01-01", "2019-01-01")
    log_close = np.log(year.close.to_numpy())
    wild = year.copy()
    new_log = log_close[0] + np.concatenate([[0.0], np.cumsum(np.diff(log_close) * 10)]) + np.log(10)
    for c in ("open", "high", "low"):
        wild[c] = np.exp(new_log + (np.log(year[c].to_numpy()) - log_close) * 10)
    wild["close"] = np.exp(new_log)
    server = start_inference(replace(services.settings, drift_window=10_000), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            record = new_market(services)
            same = _drift_after(stub, record, year)
            assert same.drift_candles == len(year) - (record.warmup_bars - 1)  # every ready candle of the year
            assert max(d.psi for d in same.drift) < 0.01, list(same.drift)[:3]
            moved = {d.feature: d.psi for d in _drift_after(stub, new_market(services), wild).drift}
            assert moved["volatility_24"] > 0.2 and moved["natr_14"] > 0.2, moved
    finally:
        server.stop(0.5)


def test_a_forming_candle_replaced_three_times_is_scored_once_in_its_final_version(services, sample_frame):
    record = new_market(services)
    stub = services.infer_stub
    frame = window(sample_frame, "2019-04-01", "2019-04-30")
    forming = record.warmup_bars + 50  # the row sent in four versions: ready
    t = int(frame.open_time_ms[forming])

    def versions():
        row = frame.iloc[forming]
        for close in (row.low, row.high, (row.open + row.low) / 2):
            yield frame.iloc[forming:forming + 1].assign(close=close)
        yield frame.iloc[forming:forming + 1]  # final

    chunks = [frame.iloc[i:i + 1] for i in range(forming)] + list(versions()) + \
             [frame.iloc[i:i + 1] for i in range(forming + 1, len(frame))]
    reqs = [inference_pb2.PredictRequest(symbol=record.symbol if i == 0 else "", timeframe=TF if i == 0 else "",
                                         model_id=record.model_id if i == 0 else "", candles=candles_of(c))
            for i, c in enumerate(chunks)]
    out = list(stub.StreamPredict(iter(reqs), timeout=300))
    served_t = [r.predictions[0] for r in out if r.predictions[0].open_time_ms == t]
    assert len(served_t) == 4
    finals = [(p.ml_down_prob, p.ml_range_prob, p.ml_up_prob) for p in served_t]
    assert len(set(finals)) > 1  # the versions were answered differently
    answers = answers_of(out)  # the last answer per candle
    rows = expected_scores(frame, answers, record)  # final closes
    assert t in rows and rows[t][0] == finals[-1]
    perf = settled(stub, record, expect=len(rows))
    check_equal(perf, rows, record)
    stored = scored_rows(services.url, record.model_id)
    assert stored[t] == (finals[-1], rows[t][1])


def test_in_sample_and_not_ready_predictions_are_never_scored(services, sample_frame):
    record = new_market(services)
    stub = services.infer_stub
    in_sample = window(sample_frame, "2018-06-01", "2018-07-01")  # inside the training window
    resp = stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF, model_id=record.model_id,
                                                     candles=candles_of(in_sample)), timeout=60)
    assert all(p.in_sample for p in resp.predictions)
    # out of sample, but none ready: fewer candles than the warm-up
    short = window(sample_frame, "2019-05-01", "2019-06-01").iloc[:record.warmup_bars - 1]
    resp = stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF, model_id=record.model_id,
                                                     candles=candles_of(short)), timeout=60)
    assert not any(p.ready for p in resp.predictions)
    perf = settled(stub, record)
    assert perf.scored == 0 and math.isnan(perf.log_loss) and not perf.reliability
    engine = make_engine(services.url)
    try:
        with engine.connect() as conn:
            pending = conn.execute(sa.select(sa.func.count()).where(
                live_predictions.c.model_id == record.model_id)).scalar()
    finally:
        engine.dispose()
    assert pending == 0  # nothing was even journaled


def test_a_registry_without_the_label_kind_fails_instead_of_skipping(services):
    new_market(services, TRIPLE_BARRIER)
    with pytest.raises(AssertionError, match="does not keep label kind triple_barrier"):
        new_market(services, TRIPLE_BARRIER, write_kind=False)


def test_unknown_model_is_not_found(services):
    with pytest.raises(grpc.RpcError) as err:
        services.infer_stub.GetLivePerformance(inference_pb2.GetLivePerformanceRequest(
            symbol="BTC/USD", timeframe=TF, model_id="no-such-model"), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_scores_and_pending_predictions_survive_a_restart(services, sample_frame):
    from inference_service.server import start as start_inference

    record = new_market(services)
    frame = window(sample_frame, "2019-06-01", "2019-06-21")
    half = len(frame) // 2
    settings = replace(services.settings, metrics_port=_free_port())

    first = start_inference(settings, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{first.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            a1 = answers_of(stream_one_by_one(stub, frame.iloc[:half], record))
            before = settled(stub, record)
    finally:
        first.stop(0.5)  # writes what is still queued
    assert before.scored > 0

    second = start_inference(settings, "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{second.port}") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # the same numbers after the restart; the drift window is this replica's memory and starts again
            after = performance(stub, record)
            assert after.drift_candles == 0 and before.drift_candles > 0
            assert without_window(after) == without_window(before)
            # the client reconnects with history; the predictions left pending before the restart are scored now
            a2 = answers_of(stream_one_by_one(stub, frame.iloc[half - record.warmup_bars:], record))
            # the second stream starts cold: its first answers are not ready, the first stream's were
            answers = {**a1, **{t: a for t, a in a2.items() if a[1]}}
            rows = expected_scores(frame, answers, record)
            perf = settled(stub, record, expect=len(rows))
            check_equal(perf, rows, record)
            assert max(rows) > before.last_open_time_ms and min(rows) == before.first_open_time_ms
            # Prometheus: the live log-loss ratio of the serving model
            stub.GetModel(inference_pb2.GetModelRequest(symbol=record.symbol, timeframe=TF), timeout=30)
            text = urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics", timeout=10).read()
            lines = [line for line in text.decode().splitlines()
                     if line.startswith("mlsignal_live_") and f'model_id="{record.model_id}"' in line]
            ratio = next(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("mlsignal_live_log_loss_ratio"))
            count = next(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("mlsignal_live_scored_candles"))
            assert count == perf.scored
            assert ratio == pytest.approx(perf.log_loss / perf.prior_log_loss, rel=1e-9)
            # the trust signals: expected log loss (SQL, every score), PSI and OOD rate (this replica's window)
            mine = [line for line in text.decode().splitlines() if f'model_id="{record.model_id}"' in line]
            expected = next(float(x.rsplit(" ", 1)[1]) for x in mine if x.startswith("mlsignal_expected_log_loss"))
            assert expected == pytest.approx(perf.expected_log_loss, rel=1e-9)
            psi = {x.split('feature="')[1].split('"')[0]: float(x.rsplit(" ", 1)[1])
                   for x in mine if x.startswith("mlsignal_feature_psi")}
            assert psi == pytest.approx({d.feature: d.psi for d in perf.drift}, rel=1e-9)
            rate = next(float(x.rsplit(" ", 1)[1]) for x in mine if x.startswith("mlsignal_ood_rate"))
            assert rate == pytest.approx(perf.ood_rate, abs=1e-12)
    finally:
        second.stop(0.5)


def test_a_model_older_than_the_maximum_age_reports_stale_health_but_keeps_serving(services, sample_frame):
    from inference_service.server import STALENESS_SERVICE
    from inference_service.server import start as start_inference

    record = new_market(services, created_ago_ms=2 * 86_400_000)
    server = start_inference(replace(services.settings, model_max_age="1d"), "127.0.0.1:0")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status(name: str) -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status

            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            frame = window(sample_frame, "2019-07-01", "2019-07-10")
            resp = stub.Predict(inference_pb2.PredictRequest(symbol=record.symbol, timeframe=TF,
                                                             candles=candles_of(frame)), timeout=60)
            assert resp.model_id == record.model_id  # the serving model: still served
            deadline = time.monotonic() + 20
            while status(STALENESS_SERVICE) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "staleness was not reported"
                time.sleep(0.2)
            assert status("mlsignal.v1.InferenceService") == health_pb2.HealthCheckResponse.SERVING
            assert status("") == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0.5)
