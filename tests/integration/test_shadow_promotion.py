"""Shadow promotion through the real services, on synthetic candles with a planted signal, so the outcome is certain.

The market's regimes, one after the other in one series of 1h candles:
  noise      returns are independent: nothing to learn;
  momentum   a candle's return carries on: the sign of the last return is the direction of the next four candles;
  overshoot  every fifth candle jumps and the next four give the jump back: after a jump, the opposite direction.

Model A (noise) serves by an operator's decision. Model B (momentum) passes the offline gate and shadows A; live
momentum candles streamed to inference are predicted by both, scored on the same candles, and the live test
promotes B. Model C (overshoot) passes the gate on its own regime and shadows B; on live momentum candles it is
worse, and the test rejects it. The stream's answers are the same bytes as a stream pinned to the serving model
(pinned streams have no shadows).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pandas as pd
import pytest

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from service_fixtures import start_services, stop_services, wait_job
from shared.store.db import make_engine
from shared.store.live import read_scores
from shared.store.marketdata import insert_candles
from shared.store.migrate import upgrade

SYMBOL, TF, H_MS = "SIG/USD", "1h", 3_600_000
T0 = 1_600_000_000_000 - 1_600_000_000_000 % H_MS
REGIMES = (("noise", 2500), ("momentum", 2500), ("live_momentum", 900), ("overshoot", 2500), ("live_momentum2", 900))
LABEL = common_pb2.LabelSpec(horizon_bars=4, threshold=0.01)
PARAMS = common_pb2.ModelParams(n_estimators=40)
MIN_SCORED, MAX_SCORED = 150, 3000


def returns(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "noise":
        return rng.normal(0.0, 0.005, n)
    if kind.startswith("momentum") or kind.startswith("live_momentum"):
        r = np.empty(n)
        prev = 0.004
        for i in range(n):
            r[i] = 0.004 * np.sign(prev) + rng.normal(0.0, 0.003)
            prev = r[i]
        return r
    assert kind == "overshoot"
    r = rng.normal(0.0, 0.0015, n)
    jumps = np.arange(0, n, 5)
    size = rng.choice([-0.02, 0.02], len(jumps))
    r[jumps] += size
    for k in range(1, 5):
        back = jumps + k
        ok = back < n
        r[back[ok]] -= size[ok] / 4
    return r


@pytest.fixture(scope="module")
def market() -> tuple[pd.DataFrame, dict[str, tuple[int, int]]]:
    rng = np.random.default_rng(7)
    parts, spans, start = [], {}, 0
    for kind, n in REGIMES:
        parts.append(returns(kind, n, rng))
        spans[kind] = (start, start + n)
        start += n
    r = np.concatenate(parts)
    close = 100.0 * np.exp(np.cumsum(r))
    open_ = np.concatenate([[100.0], close[:-1]])
    wick = np.abs(rng.normal(0.0, 0.001, len(r)))
    frame = pd.DataFrame({
        "open_time_ms": T0 + np.arange(len(r), dtype=np.int64) * H_MS,
        "open": open_, "high": np.maximum(open_, close) * (1 + wick), "low": np.minimum(open_, close) * (1 - wick),
        "close": close, "volume": rng.uniform(50.0, 150.0, len(r)),
    })
    return frame, spans


def _ts(ms: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


def train_on(stub, frame: pd.DataFrame, span: tuple[int, int]) -> training_pb2.TrainingJob:
    start, end = int(frame.open_time_ms[span[0]]), int(frame.open_time_ms[span[1] - 1]) + H_MS
    job = stub.StartTraining(training_pb2.StartTrainingRequest(
        symbol=SYMBOL, timeframe=TF, start_time=_ts(start), end_time=_ts(end), label=LABEL, params=PARAMS), timeout=30)
    done = wait_job(stub, job.job_id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    return done


def stage_of(stub, model_id: str) -> common_pb2.ModelInfo:
    models = {m.model_id: m for m in stub.ListModels(training_pb2.ListModelsRequest(symbol=SYMBOL), timeout=10).models}
    return models[model_id]


def stream(stub, frame: pd.DataFrame, lo: int, hi: int, model_id: str = "") -> list[bytes]:
    """Candles lo..hi-1 one per message (the first message carries 120 candles of warm-up history)."""
    def candle(r) -> common_pb2.Candle:
        return common_pb2.Candle(open_time_ms=int(r.open_time_ms), open=r.open, high=r.high, low=r.low,
                                 close=r.close, volume=r.volume)

    rows = list(frame.iloc[lo - 120:hi].itertuples(index=False))
    first = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, model_id=model_id,
                                         candles=[candle(r) for r in rows[:121]])
    rest = (inference_pb2.PredictRequest(candles=[candle(r)]) for r in rows[121:])
    out = []
    for i, response in enumerate(stub.StreamPredict(iter([first, *rest]), timeout=300)):
        assert not response.HasField("error"), response.error
        if i > 0:
            out.append(response.SerializeToString(deterministic=True))
    return out


def scored_times(url: str, model_id: str) -> set[int]:
    engine = make_engine(url)
    try:
        return set(read_scores(engine, model_id).open_time_ms.tolist())
    finally:
        engine.dispose()


def until_scored(url: str, model_ids: list[str], at_least: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        counts = [len(scored_times(url, m)) for m in model_ids]
        if min(counts) >= at_least:
            time.sleep(1.5)  # one more flush: the last candles of both models land together
            return
        time.sleep(0.2)
    raise AssertionError(f"scores did not arrive: {counts} < {at_least}")


def test_a_better_shadow_is_promoted_and_a_worse_one_rejected_on_live_candles(tmp_path, market):
    frame, spans = market
    url = f"sqlite:///{tmp_path}/mlsignal.db"
    upgrade(url)
    engine = make_engine(url)
    insert_candles(engine, SYMBOL, TF, frame)
    engine.dispose()
    services = start_services(url, tmp_path / "models", shadow_min_scored=MIN_SCORED, shadow_max_scored=MAX_SCORED,
                              policy_interval_seconds=0)  # the test runs the live test itself
    try:
        t, i = services.train_stub, services.infer_stub
        a = train_on(t, frame, spans["noise"])
        assert stage_of(t, a.model_id).stage in (common_pb2.MODEL_STAGE_REJECTED, common_pb2.MODEL_STAGE_SERVING)
        t.PromoteModel(training_pb2.PromoteModelRequest(model_id=a.model_id, reason="baseline"), timeout=10)
        b = train_on(t, frame, spans["momentum"])
        info = stage_of(t, b.model_id)
        assert info.stage == common_pb2.MODEL_STAGE_SHADOW, info.stage_reason
        assert a.model_id in info.stage_reason

        lo, hi = spans["live_momentum"]
        served = stream(i, frame, lo, hi)
        pinned = stream(i, frame, lo, hi, model_id=a.model_id)
        assert served == pinned, "shadows change nothing the client receives"
        until_scored(url, [a.model_id, b.model_id], hi - lo - 10)
        # the shadow is scored on exactly the serving model's candles, apart from those inside its own training
        # window (the warm-up history the stream began with), which are in-sample for it
        live_from = int(frame.open_time_ms[lo])
        assert scored_times(url, b.model_id) == {t for t in scored_times(url, a.model_id) if t >= live_from}

        compared = i.CompareLivePerformance(inference_pb2.CompareLivePerformanceRequest(
            symbol=SYMBOL, timeframe=TF, model_id=b.model_id), timeout=30)
        assert compared.baseline_model_id == a.model_id and compared.decision == "promote", compared
        assert compared.paired >= MIN_SCORED and compared.mean_log_loss_difference > 0

        report = services.training.promotion.tick()
        assert report.promoted == [b.model_id], report
        info = stage_of(t, b.model_id)
        assert info.stage == common_pb2.MODEL_STAGE_SERVING and "live test" in info.stage_reason
        assert stage_of(t, a.model_id).stage == common_pb2.MODEL_STAGE_RETIRED
        assert services.training.promotion.tick().promoted == [], "decided once"

        c = train_on(t, frame, spans["overshoot"])
        assert stage_of(t, c.model_id).stage == common_pb2.MODEL_STAGE_SHADOW
        deadline = time.monotonic() + 10  # inference sees B serving and C shadowing within its poll interval
        while i.GetModel(inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=10).model_id \
                != b.model_id:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        time.sleep(services.settings.model_poll_seconds * 3)
        lo, hi = spans["live_momentum2"]
        stream(i, frame, lo, hi)
        until_scored(url, [c.model_id], hi - lo - 10)
        report = services.training.promotion.tick()
        assert report.rejected == [c.model_id], report
        info = stage_of(t, c.model_id)
        assert info.stage == common_pb2.MODEL_STAGE_REJECTED and b.model_id in info.stage_reason
        assert stage_of(t, b.model_id).stage == common_pb2.MODEL_STAGE_SERVING

        # the serving model against its prior, and the errors of CompareLivePerformance
        perf = i.GetLivePerformance(inference_pb2.GetLivePerformanceRequest(symbol=SYMBOL, timeframe=TF),
                                    timeout=30)
        assert perf.model_id == b.model_id and not perf.worse_than_prior
        assert perf.prior_comparison.baseline_model_id == b.model_id and perf.prior_comparison.decision == "reject"
        with pytest.raises(grpc.RpcError) as err:
            i.CompareLivePerformance(inference_pb2.CompareLivePerformanceRequest(
                symbol=SYMBOL, timeframe=TF, model_id="nope"), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "model_id" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            i.CompareLivePerformance(inference_pb2.CompareLivePerformanceRequest(
                symbol=SYMBOL, timeframe=TF, model_id=b.model_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        stop_services(services)
