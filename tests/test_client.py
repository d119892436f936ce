"""The client SDK (shared.client) and the `mlsignal train|jobs|models|cancel|predict` commands.

Everything goes over real gRPC on 127.0.0.1:0. The training client talks to the real training service. The inference
client talks to `ReferenceInference` below, a small servicer that implements the inference contract (stateless
Predict with a warmup, stateful StreamPredict, GetModel, NOT_FOUND), so batching and streaming can be checked
independently of the real model server. `ScriptedTraining` replays fixed job histories (progress, failures, errors
in the middle of a stream) that a real job cannot produce on demand in a unit test.
"""

from __future__ import annotations

import math
import threading
from concurrent import futures

import grpc
import numpy as np
import pandas as pd
import pytest

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from shared import client as mc
from shared.cli import main as cli_main
from shared.settings import Settings

HOUR_MS = 3_600_000
T0 = pd.Timestamp("2019-01-01", tz="UTC")


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def candle_frame(n: int, seed: int = 0, start: pd.Timestamp = T0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    open_ = np.concatenate([[100.0], close[:-1]])
    spread = np.abs(rng.normal(0, 0.005, n)) * close
    return pd.DataFrame(
        {
            "open": open_,
            "high": np.maximum(open_, close) + spread,
            "low": np.minimum(open_, close) - spread,
            "close": close,
            "volume": rng.uniform(1, 10, n),
        },
        index=pd.date_range(start, periods=n, freq="h", name="open_time"),
    )


def serve(add) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def metadata_of(context) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata()}


# ----------------------------------------------------------------------------------------------------------------------
# a reference inference servicer (the contract's semantics, with a simple deterministic "model")

MODELS = {"m-new": 5, "m-old": 8}  # model id -> warmup_bars
SERVING = "m-new"
TRAIN_END_MS = int(T0.value // 1_000_000) + 10 * HOUR_MS


def reference_prediction(history: list[common_pb2.Candle], warmup: int) -> inference_pb2.Prediction:
    """The prediction for the last candle of `history` from its last `warmup` candles only."""
    last = history[-1]
    if len(history) < warmup:
        nan = math.nan
        return inference_pb2.Prediction(open_time_ms=last.open_time_ms, ml_up_prob=nan, ml_down_prob=nan,
                                        ml_range_prob=nan, ready=False, in_sample=last.open_time_ms <= TRAIN_END_MS)
    window = np.array([c.close for c in history[-warmup:]])
    r = window[-1] / window[0] - 1
    vol = float(np.std(window) / np.mean(window))
    rng_p = 0.2 + min(0.3, 10 * vol)
    s = 1 / (1 + math.exp(-50 * r))
    up, down = (1 - rng_p) * s, (1 - rng_p) * (1 - s)
    return inference_pb2.Prediction(open_time_ms=last.open_time_ms, ml_up_prob=up, ml_down_prob=down,
                                    ml_range_prob=rng_p, ready=True, in_sample=last.open_time_ms <= TRAIN_END_MS)


class ReferenceInference(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self):
        self.predict_sizes: list[int] = []
        self.metadata: list[dict[str, str]] = []
        self.stream_open = 0
        self.lock = threading.Lock()

    def _model(self, model_id: str, context) -> tuple[str, int]:
        model_id = model_id or SERVING
        if model_id not in MODELS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"model_id: no model {model_id!r}")
        return model_id, MODELS[model_id]

    def Predict(self, request, context):
        self.metadata.append(metadata_of(context))
        if request.symbol == "NONE/USD":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model for NONE/USD 1h")
        if not request.candles:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "candles: the batch is empty")
        model_id, warmup = self._model(request.model_id, context)
        with self.lock:
            self.predict_sizes.append(len(request.candles))
        candles = list(request.candles)
        for i in range(1, len(candles)):
            if candles[i].open_time_ms <= candles[i - 1].open_time_ms:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"candles[{i}].open_time_ms: times must increase")
        for i, c in enumerate(candles):
            if not (math.isfinite(c.close) and c.close > 0):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"candles[{i}].close: must be finite and > 0")
        preds = [reference_prediction(candles[: i + 1], warmup) for i in range(len(candles))]
        return inference_pb2.PredictResponse(model_id=model_id, predictions=preds)

    def StreamPredict(self, request_iterator, context):
        self.metadata.append(metadata_of(context))
        with self.lock:
            self.stream_open += 1
        try:
            history: list[common_pb2.Candle] = []
            model_id = warmup = None
            for request in request_iterator:
                if model_id is None:
                    model_id, warmup = self._model(request.model_id, context)
                preds = []
                for c in request.candles:
                    if history and c.open_time_ms == history[-1].open_time_ms:
                        history[-1] = c
                    elif history and c.open_time_ms < history[-1].open_time_ms:
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "candles[0].open_time_ms: times must increase")
                    else:
                        history.append(c)
                    history = history[-warmup:]
                    preds.append(reference_prediction(history, warmup))
                yield inference_pb2.PredictResponse(model_id=model_id, predictions=preds)
        finally:
            with self.lock:
                self.stream_open -= 1

    def GetModel(self, request, context):
        if request.symbol == "SLOW/USD":
            threading.Event().wait(2)
        if request.symbol == "NONE/USD":
            context.abort(grpc.StatusCode.NOT_FOUND, "no model for NONE/USD 1h")
        return common_pb2.ModelInfo(model_id=SERVING, symbol=request.symbol, timeframe=request.timeframe,
                                    warmup_bars=MODELS[SERVING])


@pytest.fixture(scope="module")
def reference():
    servicer = ReferenceInference()
    server, addr = serve(lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s))
    yield servicer, addr
    server.stop(0)


# ----------------------------------------------------------------------------------------------------------------------
# a scripted training servicer (job histories on demand)

METRICS = {
    "log_loss": 0.96, "prior_log_loss": 0.994, "brier": 0.57, "prior_brier": 0.59, "balanced_accuracy": 0.41,
    "prior_balanced_accuracy": 0.3333, "log_loss_ratio": 0.9658, "shrink_weight": 0.62, "test_class_down": 0.3,
    "test_class_range": 0.45, "test_class_up": 0.25,
}


def _job(job_id, state, progress=0.0, stage="", **kw):
    return training_pb2.TrainingJob(job_id=job_id, state=state, progress=progress, stage=stage, **kw)


SCRIPTS = {
    "ok": [
        _job("ok", training_pb2.JOB_STATE_QUEUED, 0.0, "queued"),
        _job("ok", training_pb2.JOB_STATE_RUNNING, 0.1, "fitting"),
        _job("ok", training_pb2.JOB_STATE_RUNNING, 0.6, "calibrating"),
        _job("ok", training_pb2.JOB_STATE_SUCCEEDED, 1.0, "done", model_id="BTC-USD_1h_x", metrics=METRICS),
    ],
    "fail": [
        _job("fail", training_pb2.JOB_STATE_RUNNING, 0.2, "features"),
        _job("fail", training_pb2.JOB_STATE_FAILED, 0.2, "features", error="fitting: only two classes present"),
    ],
    "cancelled": [_job("cancelled", training_pb2.JOB_STATE_CANCELLED, 0.3, "fitting", error="cancelled by request")],
    "broken": [_job("broken", training_pb2.JOB_STATE_RUNNING, 0.3, "fitting")],  # then DATA_LOSS
    "truncated": [_job("truncated", training_pb2.JOB_STATE_RUNNING, 0.3, "fitting")],  # then ends
}


class ScriptedTraining(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self):
        self.metadata: list[dict[str, str]] = []
        self.requests: list[training_pb2.StartTrainingRequest] = []

    def StartTraining(self, request, context):
        self.metadata.append(metadata_of(context))
        self.requests.append(request)
        job_id = request.symbol.split("/")[0].lower()
        if job_id not in SCRIPTS:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no script {job_id}")
        return training_pb2.TrainingJob(job_id=job_id, state=training_pb2.JOB_STATE_QUEUED, stage="queued",
                                        request=request)

    def GetTrainingJob(self, request, context):
        self.metadata.append(metadata_of(context))
        if request.job_id.startswith("abort:"):
            code = grpc.StatusCode[request.job_id.removeprefix("abort:")]
            context.abort(code, f"scripted {code.name}")
        if request.job_id not in SCRIPTS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        return SCRIPTS[request.job_id][-1]

    def WatchTrainingJob(self, request, context):
        self.metadata.append(metadata_of(context))
        if request.job_id not in SCRIPTS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job_id: no job {request.job_id!r}")
        yield from SCRIPTS[request.job_id]
        if request.job_id == "broken":
            context.abort(grpc.StatusCode.DATA_LOSS, "job record is damaged")

    def CancelTrainingJob(self, request, context):
        if request.job_id == "ok":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "job ok already finished (SUCCEEDED)")
        return _job(request.job_id, training_pb2.JOB_STATE_CANCELLED, 0.3, "fitting", error="cancelled by request")

    def ListModels(self, request, context):
        self.metadata.append(metadata_of(context))
        return training_pb2.ListModelsResponse()


@pytest.fixture(scope="module")
def scripted():
    servicer = ScriptedTraining()
    server, addr = serve(lambda s: training_pb2_grpc.add_TrainingServiceServicer_to_server(servicer, s))
    yield servicer, addr
    server.stop(0)


# ----------------------------------------------------------------------------------------------------------------------
# the real training service


@pytest.fixture
def training_addr(sqlite_url, tmp_path):
    """The real training service on a fresh, migrated (empty) SQLite database; stopped after the test."""
    from training_service.server import start

    running = start(Settings(database_url=sqlite_url, model_dir=tmp_path / "models"), "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(0.5)


@pytest.fixture
def training(training_addr):
    with mc.TrainingClient(training_addr, timeout=30) as c:
        yield c


# ======================================================================================================================
# status codes -> exceptions

STATUS_TABLE = [
    (grpc.StatusCode.INVALID_ARGUMENT, mc.InvalidArgumentError),
    (grpc.StatusCode.NOT_FOUND, mc.NotFoundError),
    (grpc.StatusCode.FAILED_PRECONDITION, mc.FailedPreconditionError),
    (grpc.StatusCode.RESOURCE_EXHAUSTED, mc.ResourceExhaustedError),
    (grpc.StatusCode.UNAVAILABLE, mc.UnavailableError),
    (grpc.StatusCode.UNAUTHENTICATED, mc.UnauthenticatedError),
    (grpc.StatusCode.DEADLINE_EXCEEDED, mc.DeadlineExceededError),
    (grpc.StatusCode.DATA_LOSS, mc.DataLossError),
    (grpc.StatusCode.PERMISSION_DENIED, mc.MlsignalClientError),
    (grpc.StatusCode.INTERNAL, mc.MlsignalClientError),
    (grpc.StatusCode.UNKNOWN, mc.MlsignalClientError),
    (grpc.StatusCode.ABORTED, mc.MlsignalClientError),
    (grpc.StatusCode.UNIMPLEMENTED, mc.MlsignalClientError),
]


@pytest.mark.parametrize("code,cls", STATUS_TABLE, ids=[c.name for c, _ in STATUS_TABLE])
def test_status_codes_map_to_typed_exceptions(scripted, code, cls):
    _, addr = scripted
    with mc.TrainingClient(addr, timeout=10) as c:
        with pytest.raises(mc.MlsignalClientError) as info:
            c.get_job(f"abort:{code.name}")
    exc = info.value
    assert type(exc) is cls
    assert exc.code is code
    assert exc.details == f"scripted {code.name}"
    assert str(exc).startswith(f"{code.name}: scripted")
    assert isinstance(exc.__cause__, grpc.RpcError)


def test_error_from_rpc_is_the_mapping_the_clients_use(scripted):
    _, addr = scripted
    channel = grpc.insecure_channel(addr)
    stub = training_pb2_grpc.TrainingServiceStub(channel)
    try:
        for code, cls in STATUS_TABLE:
            with pytest.raises(grpc.RpcError) as info:
                stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=f"abort:{code.name}"), timeout=10)
            mapped = mc.error_from_rpc(info.value)
            assert type(mapped) is cls and mapped.code is code and mapped.details == f"scripted {code.name}"
    finally:
        channel.close()


def test_unreachable_service_is_unavailable():
    with mc.TrainingClient("127.0.0.1:1", timeout=5) as c:
        with pytest.raises(mc.UnavailableError) as info:
            c.list_models()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_timeout_gives_deadline_exceeded(reference):
    _, addr = reference

    with mc.InferenceClient(addr, timeout=0.2) as c:
        with pytest.raises(mc.DeadlineExceededError):
            c.get_model("SLOW/USD", "1h")


# ======================================================================================================================
# channels


def test_token_is_sent_as_bearer_metadata_on_unary_and_streaming_calls(scripted):
    servicer, addr = scripted
    with mc.TrainingClient(addr, token="s3cret", timeout=10) as c:
        n = len(servicer.metadata)
        c.list_models()
        c.job("ok").watch()
    seen = servicer.metadata[n:]
    assert len(seen) == 3  # ListModels, GetTrainingJob, WatchTrainingJob
    assert all(m.get("authorization") == "Bearer s3cret" for m in seen)


def test_no_token_sends_no_authorization(scripted):
    servicer, addr = scripted
    with mc.TrainingClient(addr, timeout=10) as c:
        n = len(servicer.metadata)
        c.list_models()
    assert "authorization" not in servicer.metadata[n]


def test_token_on_client_streaming_calls(reference):
    servicer, addr = reference
    with mc.InferenceClient(addr, token="tok") as c:
        n = len(servicer.metadata)
        list(c.stream([{"open_time_ms": int(T0.value // 10**6), "open": 1, "high": 1, "low": 1, "close": 1,
                        "volume": 0}], "BTC/USD", "1h"))
    assert servicer.metadata[n]["authorization"] == "Bearer tok"


@pytest.mark.parametrize("target", ["dns:///127.0.0.1:{port}", "ipv4:127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_targets_are_accepted_unchanged(training_addr, target):
    port = training_addr.rsplit(":", 1)[1]
    with mc.TrainingClient(target.format(port=port), timeout=10) as c:
        assert c.list_models() == []


def test_channel_arguments_are_checked():
    with pytest.raises(ValueError, match="target"):
        mc.connect_channel("")
    with pytest.raises(ValueError, match="token"):
        mc.connect_channel("127.0.0.1:1", token="a\nb")
    with pytest.raises(ValueError, match="tls"):
        mc.connect_channel("127.0.0.1:1", root_certificates=b"pem")
    with pytest.raises(ValueError, match="max_batch"):
        mc.InferenceClient("127.0.0.1:1", max_batch=0)
    with pytest.raises(ValueError, match="timeout"):
        mc.TrainingClient("127.0.0.1:1", timeout=0)


# ======================================================================================================================
# frames <-> candles and predictions


def test_frame_to_candles_round_trip_with_optional_fields_unset_when_nan():
    df = candle_frame(4)
    df["funding_rate"] = [0.0001, np.nan, -0.0002, np.nan]
    df["open_interest"] = [np.nan, np.nan, 12345.0, 1.5]
    candles = mc.frame_to_candles(df)
    assert len(candles) == 4
    for i, c in enumerate(candles):
        assert c.open_time_ms == int(df.index[i].value // 10**6)
        for col in ("open", "high", "low", "close", "volume"):
            assert getattr(c, col) == df[col].iat[i]
    assert [c.HasField("funding_rate") for c in candles] == [True, False, True, False]
    assert [c.HasField("open_interest") for c in candles] == [False, False, True, True]
    assert candles[0].funding_rate == 0.0001 and candles[2].funding_rate == -0.0002
    assert candles[2].open_interest == 12345.0 and candles[3].open_interest == 1.5
    zero = mc.frame_to_candles(df.assign(funding_rate=0.0))  # zero is a value, not absence
    assert all(c.HasField("funding_rate") and c.funding_rate == 0.0 for c in zero)
    plain = mc.frame_to_candles(candle_frame(2))
    assert not any(c.HasField("funding_rate") or c.HasField("open_interest") for c in plain)


def test_frame_times_from_other_zones_columns_and_epoch_ms():
    df = candle_frame(3)
    expected = [int(t.value // 10**6) for t in df.index]
    berlin = df.tz_convert("Europe/Berlin")
    assert [c.open_time_ms for c in mc.frame_to_candles(berlin)] == expected
    by_col = df.reset_index().rename(columns={"open_time": "timestamp"})
    assert [c.open_time_ms for c in mc.frame_to_candles(by_col)] == expected
    by_ms = df.reset_index(drop=True).assign(open_time=expected)
    assert [c.open_time_ms for c in mc.frame_to_candles(by_ms)] == expected


def test_tz_naive_times_are_rejected_with_a_clear_error():
    df = candle_frame(3)
    with pytest.raises(ValueError, match="tz-naive.*UTC"):
        mc.frame_to_candles(df.tz_localize(None))
    naive_col = df.reset_index().assign(open_time=lambda d: d.open_time.dt.tz_localize(None))
    with pytest.raises(ValueError, match="tz-naive"):
        mc.frame_to_candles(naive_col)
    with pytest.raises(ValueError, match="no candle times"):
        mc.frame_to_candles(df.reset_index(drop=True))
    with pytest.raises(ValueError, match="epoch seconds"):
        mc.frame_to_candles(df.reset_index(drop=True).assign(timestamp=np.arange(3) * 3600 + 1_546_300_800))
    with pytest.raises(ValueError, match="pd.to_datetime"):
        mc.frame_to_candles(df.reset_index(drop=True).assign(timestamp=["2019-01-01"] * 3))


def test_missing_or_non_numeric_columns_are_rejected():
    with pytest.raises(ValueError, match="missing column.*volume"):
        mc.frame_to_candles(candle_frame(3).drop(columns="volume"))
    with pytest.raises(ValueError, match="'close' is not numeric"):
        mc.frame_to_candles(candle_frame(2).assign(close=["a", "b"]))


def _predictions(candles, ready, in_sample):
    return [inference_pb2.Prediction(open_time_ms=c.open_time_ms, ml_up_prob=0.5, ml_down_prob=0.2,
                                     ml_range_prob=0.3, ready=r, in_sample=s)
            for c, r, s in zip(candles, ready, in_sample)]


def test_predictions_to_frame_keeps_index_and_never_fills_unready_rows():
    df = candle_frame(4)
    df["rsi"] = [30.0, 40.0, 50.0, 60.0]
    preds = _predictions(mc.frame_to_candles(df), [False, True, True, True], [True, True, False, False])
    out = mc.predictions_to_frame(df, preds, "m1")
    assert out.index.equals(df.index) and list(df.columns) == ["open", "high", "low", "close", "volume", "rsi"]
    assert list(out.columns) == [*df.columns, *mc.ML_COLUMNS]
    pd.testing.assert_frame_equal(out[df.columns], df)
    assert out["ML_UP_PROB"].dtype == np.float64 and out["ML_READY"].dtype == bool
    assert out["ML_IN_SAMPLE"].dtype == bool and pd.api.types.is_string_dtype(out["ML_MODEL_ID"])
    # the first row is not ready: NaN even though the message carried numbers
    assert out.iloc[0][["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]].isna().all()
    assert out["ML_UP_PROB"].iloc[1:].tolist() == [0.5] * 3
    assert out["ML_READY"].tolist() == [False, True, True, True]
    assert out["ML_IN_SAMPLE"].tolist() == [True, True, False, False]
    assert out["ML_MODEL_ID"].tolist() == ["m1"] * 4
    ids = mc.predictions_to_frame(df, preds, ["a", "a", "b", "b"])["ML_MODEL_ID"].tolist()
    assert ids == ["a", "a", "b", "b"]


def test_predictions_to_frame_with_time_column_keeps_the_frames_index():
    df = candle_frame(3).reset_index().rename(columns={"open_time": "timestamp"})
    df.index = pd.Index([10, 20, 30])
    out = mc.predictions_to_frame(df, _predictions(mc.frame_to_candles(df), [True] * 3, [False] * 3), "m")
    assert out.index.tolist() == [10, 20, 30] and "timestamp" in out.columns


def test_predictions_that_do_not_match_the_frame_raise():
    df = candle_frame(3)
    preds = _predictions(mc.frame_to_candles(df), [True] * 3, [False] * 3)
    with pytest.raises(mc.ProtocolError, match="2 predictions for 3 candles"):
        mc.predictions_to_frame(df, preds[:2], "m")
    swapped = [preds[1], preds[0], preds[2]]
    with pytest.raises(mc.ProtocolError, match="prediction 0"):
        mc.predictions_to_frame(df, swapped, "m")
    with pytest.raises(mc.ProtocolError, match="model ids"):
        mc.predictions_to_frame(df, preds, ["m"])


def test_times_convert_to_epoch_ms():
    from datetime import datetime, timedelta, timezone

    assert mc.to_epoch_ms("2019-01-01") == 1_546_300_800_000
    assert mc.to_epoch_ms("2019-01-01T01:00:00+01:00") == 1_546_300_800_000
    assert mc.to_epoch_ms(pd.Timestamp("2019-01-01", tz="UTC")) == 1_546_300_800_000
    assert mc.to_epoch_ms(datetime(2019, 1, 1, 2, tzinfo=timezone(timedelta(hours=2)))) == 1_546_300_800_000
    assert mc.to_epoch_ms(np.int64(1_546_300_800_000)) == 1_546_300_800_000
    with pytest.raises(ValueError, match="no time zone"):
        mc.to_epoch_ms(datetime(2019, 1, 1))
    with pytest.raises(ValueError, match="epoch seconds"):
        mc.to_epoch_ms(1_546_300_800)
    with pytest.raises(ValueError):
        mc.to_epoch_ms(1.5e12)
    with pytest.raises(ValueError):
        mc.to_epoch_ms(True)
    with pytest.raises(ValueError, match="ISO-8601"):
        mc.to_epoch_ms("yesterday")


# ======================================================================================================================
# predict: batching


@pytest.mark.parametrize("n,max_batch,overlap", [(0, 5, 2), (5, 5, 4), (6, 5, 4), (100, 7, 5), (101, 10, 1),
                                                 (1000, 999, 998), (37, 6, 0)])
def test_batch_plan_covers_every_row_once_with_enough_history(n, max_batch, overlap):
    plan = mc.batch_plan(n, max_batch, overlap)
    kept = [i for _, stop, keep in plan for i in range(keep, stop)]
    assert kept == list(range(n))
    for start, stop, keep in plan:
        assert 0 < stop - start <= max_batch and start <= keep < stop
        assert start == 0 or keep - start >= overlap


def test_batch_plan_refuses_an_overlap_that_fills_the_batch():
    with pytest.raises(ValueError, match="max_batch"):
        mc.batch_plan(20, 5, 5)


@pytest.mark.parametrize("max_batch", [6, 7, 10, 33, 64])
def test_split_predict_equals_one_big_predict(reference, max_batch):
    servicer, addr = reference
    df = candle_frame(150, seed=1)
    with mc.InferenceClient(addr) as c:
        whole = c.predict(df, "BTC/USD", "1h")
    with mc.InferenceClient(addr, max_batch=max_batch) as c:
        n = len(servicer.predict_sizes)
        split = c.predict(df, "BTC/USD", "1h")
        sizes = servicer.predict_sizes[n:]
    assert len(sizes) > 1 and max(sizes) <= max_batch
    pd.testing.assert_frame_equal(split, whole)
    assert whole["ML_READY"].sum() == len(df) - (MODELS[SERVING] - 1)
    assert (whole["ML_MODEL_ID"] == SERVING).all()
    ready = whole[whole.ML_READY]
    np.testing.assert_allclose(ready[["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]].sum(axis=1), 1.0)
    assert whole["ML_IN_SAMPLE"].tolist() == [t.value // 10**6 <= TRAIN_END_MS for t in df.index]


def test_split_predict_with_a_pinned_model_that_is_not_serving(reference):
    _, addr = reference
    df = candle_frame(90, seed=2)
    with mc.InferenceClient(addr) as c:
        whole = c.predict(df, "BTC/USD", "1h", model_id="m-old")
    with mc.InferenceClient(addr, max_batch=11) as c:
        split = c.predict(df, "BTC/USD", "1h", model_id="m-old")
    pd.testing.assert_frame_equal(split, whole)
    assert (whole["ML_MODEL_ID"] == "m-old").all()
    assert whole["ML_READY"].sum() == len(df) - (MODELS["m-old"] - 1)


def test_split_predict_needs_max_batch_above_the_warmup(reference):
    _, addr = reference
    with mc.InferenceClient(addr, max_batch=MODELS[SERVING]) as c:
        with pytest.raises(ValueError, match="raise max_batch"):
            c.predict(candle_frame(20), "BTC/USD", "1h")


def test_predict_checks_input_before_sending(reference):
    servicer, addr = reference
    df = candle_frame(5)
    n = len(servicer.predict_sizes)
    with mc.InferenceClient(addr) as c:
        with pytest.raises(ValueError, match="strictly increasing: row 3"):
            c.predict(df.iloc[[0, 1, 2, 2, 4]], "BTC/USD", "1h")
        with pytest.raises(ValueError, match="no rows"):
            c.predict(df.iloc[:0], "BTC/USD", "1h")
        with pytest.raises(ValueError, match="tz-naive"):
            c.predict(df.tz_localize(None), "BTC/USD", "1h")
    assert len(servicer.predict_sizes) == n


def test_predict_errors_are_typed_and_name_the_rows_of_a_split_request(reference):
    _, addr = reference
    with mc.InferenceClient(addr) as c:
        with pytest.raises(mc.NotFoundError):
            c.predict(candle_frame(5), "NONE/USD", "1h")
        with pytest.raises(mc.NotFoundError, match="model_id"):
            c.predict(candle_frame(5), "BTC/USD", "1h", model_id="nope")
    bad = candle_frame(40)
    bad.iloc[25, bad.columns.get_loc("close")] = -1.0
    with mc.InferenceClient(addr, max_batch=20) as c:
        with pytest.raises(mc.InvalidArgumentError) as info:
            c.predict(bad, "BTC/USD", "1h")
    assert "close" in info.value.details and "frame rows 15..34" in str(info.value)


# ======================================================================================================================
# stream


def test_stream_one_candle_at_a_time_equals_predict(reference):
    _, addr = reference
    df = candle_frame(30, seed=3)
    with mc.InferenceClient(addr) as c:
        whole = c.predict(df, "BTC/USD", "1h")
        live = list(c.stream(mc.frame_to_candles(df), "BTC/USD", "1h"))
    assert [p.open_time_ms for p in live] == [int(t.value // 10**6) for t in df.index]
    assert all(isinstance(p, mc.LivePrediction) for p in live)
    got = pd.DataFrame({"ML_UP_PROB": [p.up for p in live], "ML_DOWN_PROB": [p.down for p in live],
                        "ML_RANGE_PROB": [p.range for p in live], "ML_READY": [p.ready for p in live],
                        "ML_IN_SAMPLE": [p.in_sample for p in live]}, index=df.index)
    pd.testing.assert_frame_equal(got, whole[got.columns])
    assert {p.model_id for p in live} == {SERVING}
    assert live[0].open_time == T0.to_pydatetime()
    with pytest.raises(AttributeError):
        live[0].up = 1.0  # frozen


def test_stream_accepts_dicts_series_rows_and_messages(reference):
    _, addr = reference
    df = candle_frame(6, seed=4)
    df["funding_rate"] = [np.nan, 0.0001, np.nan, 0.0002, 0.0, np.nan]
    rows = list(df.iterrows())
    items = [
        {"open_time_ms": int(df.index[0].value // 10**6), **df.iloc[0].to_dict()},  # dict with NaN funding: absent
        rows[1],  # (index, Series) from iterrows
        df.iloc[2],  # Series named by its open time
        next(df.iloc[[3]].itertuples()),  # itertuples row
        {"timestamp": df.index[4], **df.iloc[4].to_dict()},  # tz-aware Timestamp under 'timestamp'
        mc.frame_to_candles(df.iloc[[5]])[0],  # a Candle message
    ]
    with mc.InferenceClient(addr) as c:
        live = list(c.stream(iter(items), "BTC/USD", "1h"))
        whole = c.predict(df, "BTC/USD", "1h")
    assert [p.open_time_ms for p in live] == [int(t.value // 10**6) for t in df.index]
    assert [p.ready for p in live] == whole["ML_READY"].tolist()
    assert live[5].up == whole["ML_UP_PROB"].iat[5]


def test_stream_replaces_a_forming_candle(reference):
    _, addr = reference
    df = candle_frame(8, seed=5)
    forming = df.iloc[7].copy()
    forming["close"] = forming["close"] * 1.05
    forming["high"] = max(forming["high"], forming["close"])
    items = [*(df.iloc[i] for i in range(7)), forming, df.iloc[7]]  # the last candle twice: forming, then final
    with mc.InferenceClient(addr) as c:
        live = list(c.stream(items, "BTC/USD", "1h"))
        final = c.predict(df, "BTC/USD", "1h")
        early = c.predict(pd.concat([df.iloc[:7], forming.to_frame().T.astype(float)]), "BTC/USD", "1h")
    assert len(live) == 9 and live[7].open_time_ms == live[8].open_time_ms
    assert live[7].up == early["ML_UP_PROB"].iat[7]
    assert live[8].up == final["ML_UP_PROB"].iat[7] != live[7].up


def test_stream_reports_a_bad_item_after_the_good_ones(reference):
    _, addr = reference
    df = candle_frame(4)
    items = [df.iloc[0], df.iloc[1], {"open": 1.0}, df.iloc[3]]
    got = []
    with mc.InferenceClient(addr) as c:
        with pytest.raises(ValueError, match="candle has no time"):
            for p in c.stream(items, "BTC/USD", "1h"):
                got.append(p)
    assert len(got) == 2


def test_stream_reraises_an_error_of_the_feed(reference):
    _, addr = reference
    df = candle_frame(3)

    def feed():
        yield df.iloc[0]
        yield df.iloc[1]
        raise ConnectionError("exchange websocket closed")

    got = []
    with mc.InferenceClient(addr) as c:
        with pytest.raises(ConnectionError, match="websocket"):
            for p in c.stream(feed(), "BTC/USD", "1h"):
                got.append(p)
    assert len(got) == 2


def test_errors_survive_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(mc.NotFoundError(grpc.StatusCode.NOT_FOUND, "no model", note="rows 1..2")))
    assert type(exc) is mc.NotFoundError and exc.code is grpc.StatusCode.NOT_FOUND and exc.details == "no model"
    job = training_pb2.TrainingJob(job_id="j", state=training_pb2.JOB_STATE_FAILED, error="boom")
    failed = pickle.loads(pickle.dumps(mc.TrainingFailedError(job)))
    assert failed.job == job and failed.details == "boom"


def test_stream_server_errors_are_typed(reference):
    _, addr = reference
    df = candle_frame(4)
    got = []
    with mc.InferenceClient(addr) as c:
        with pytest.raises(mc.InvalidArgumentError, match="times must increase"):
            for p in c.stream([df.iloc[2], df.iloc[3], df.iloc[0]], "BTC/USD", "1h"):
                got.append(p)
        assert len(got) == 2
        with pytest.raises(mc.NotFoundError):
            list(c.stream([df.iloc[0]], "BTC/USD", "1h", model_id="nope"))


def test_leaving_a_live_stream_cancels_it(reference):
    servicer, addr = reference
    feed_done = threading.Event()
    df = candle_frame(3)

    def feed():  # a live feed: blocks after three candles like an exchange waiting for the next close
        yield from (df.iloc[i] for i in range(3))
        feed_done.wait(30)

    with mc.InferenceClient(addr) as c:
        for i, _ in enumerate(c.stream(feed(), "BTC/USD", "1h")):
            if i == 2:
                break
    try:
        for _ in range(100):
            if servicer.stream_open == 0:
                break
            threading.Event().wait(0.05)
        assert servicer.stream_open == 0
    finally:
        feed_done.set()


def test_get_model(reference):
    _, addr = reference
    with mc.InferenceClient(addr) as c:
        assert c.get_model("BTC/USD", "1h").warmup_bars == MODELS[SERVING]
        with pytest.raises(mc.NotFoundError):
            c.get_model("NONE/USD", "1h")


# ======================================================================================================================
# training client against the real training service


def test_unknown_timeframe_is_invalid_argument(training):
    with pytest.raises(mc.InvalidArgumentError) as info:
        training.train("BTC/USD", "2h")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "timeframe" in info.value.details


def test_start_not_before_end_is_invalid_argument(training):
    with pytest.raises(mc.InvalidArgumentError, match="start_time"):
        training.train("BTC/USD", "1h", "2019-01-01", pd.Timestamp("2018-01-01", tz="UTC"))


def test_unknown_job_is_not_found(training):
    with pytest.raises(mc.NotFoundError) as info:
        training.get_job("no-such-job")
    assert info.value.code is grpc.StatusCode.NOT_FOUND and "no-such-job" in info.value.details
    with pytest.raises(mc.NotFoundError):
        training.cancel("no-such-job")
    with pytest.raises(mc.NotFoundError):
        training.job("no-such-job")
    handle = mc.TrainingJobHandle(training, training_pb2.TrainingJob(job_id="no-such-job"))
    with pytest.raises(mc.NotFoundError):  # raised by the server inside the watch stream
        handle.watch()


def test_symbol_without_candles_is_failed_precondition(training):
    with pytest.raises(mc.FailedPreconditionError) as info:
        training.train("NONE/USD", "1h", "2018-01-01", "2019-01-01", n_estimators=10)
    assert "no candles" in info.value.details


def test_empty_database_lists_nothing(training):
    assert training.list_jobs() == []
    assert training.list_jobs("BTC/USD", "1h", limit=5) == []
    assert training.list_models() == []
    assert training.list_models("BTC/USD", "1h") == []


def test_train_arguments_are_checked_before_sending(training):
    from datetime import datetime

    with pytest.raises(ValueError, match="class_weight"):
        training.train("BTC/USD", "1h", class_weight="auto")
    with pytest.raises(ValueError, match="no time zone"):
        training.train("BTC/USD", "1h", datetime(2018, 1, 1))
    with pytest.raises(ValueError, match="n_estimators"):
        training.train("BTC/USD", "1h", n_estimators=10.5)


# ======================================================================================================================
# job handles (scripted histories)


def test_train_request_carries_every_argument(scripted):
    servicer, addr = scripted
    with mc.TrainingClient(addr) as c:
        handle = c.train("OK/USD", "1h", "2018-01-01", 1_546_300_800_000, horizon_bars=12, threshold=0.01,
                         n_estimators=50, max_depth=-1, min_samples_leaf=30, class_weight="balanced", random_state=0)
    req = servicer.requests[-1]
    assert handle.job_id == "ok" and handle.state.state == training_pb2.JOB_STATE_QUEUED
    assert req.start_time.ToJsonString() == "2018-01-01T00:00:00Z"
    assert req.end_time.ToJsonString() == "2019-01-01T00:00:00Z"
    assert (req.label.horizon_bars, req.label.threshold) == (12, 0.01)
    p = req.params
    assert (p.n_estimators, p.max_depth, p.min_samples_leaf) == (50, -1, 30)
    assert p.class_weight == common_pb2.CLASS_WEIGHT_BALANCED
    assert p.HasField("random_state") and p.random_state == 0
    with mc.TrainingClient(addr) as c:
        c.train("OK/USD", "1h")
    req = servicer.requests[-1]
    assert not req.HasField("start_time") and not req.HasField("end_time")
    assert not req.params.HasField("random_state") and req.params.class_weight == common_pb2.CLASS_WEIGHT_UNSPECIFIED


def test_wait_follows_progress_and_returns_the_succeeded_job(scripted):
    _, addr = scripted
    seen = []
    with mc.TrainingClient(addr) as c:
        handle = c.train("OK/USD", "1h")
        job = handle.wait(on_progress=lambda j: seen.append((j.stage, j.progress)))
    assert seen == [("queued", 0.0), ("fitting", 0.1), ("calibrating", 0.6), ("done", 1.0)]
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and job.model_id == "BTC-USD_1h_x"
    assert handle.state is job and mc.is_final(job)


@pytest.mark.parametrize("symbol,state", [("FAIL/USD", "FAILED"), ("CANCELLED/USD", "CANCELLED")])
def test_wait_raises_training_failed_with_the_job(scripted, symbol, state):
    _, addr = scripted
    with mc.TrainingClient(addr) as c:
        handle = c.train(symbol, "1h")
        final = handle.watch()  # watch returns the final job whatever it is
        assert mc.job_state_name(final.state) == state
        with pytest.raises(mc.TrainingFailedError) as info:
            handle.wait()
    assert mc.job_state_name(info.value.job.state) == state
    assert info.value.details == info.value.job.error != ""
    assert isinstance(info.value, mc.MlsignalClientError) and info.value.code is None


def test_error_in_the_middle_of_a_watch_is_typed(scripted):
    _, addr = scripted
    seen = []
    with mc.TrainingClient(addr) as c:
        with pytest.raises(mc.DataLossError, match="damaged"):
            c.job("broken").watch(seen.append)
    assert len(seen) == 1


def test_watch_that_ends_before_a_final_state_raises(scripted):
    _, addr = scripted
    with mc.TrainingClient(addr) as c:
        with pytest.raises(mc.ProtocolError, match="RUNNING"):
            c.job("truncated").watch()


def test_handle_cancel_and_refresh(scripted):
    _, addr = scripted
    with mc.TrainingClient(addr) as c:
        handle = c.train("FAIL/USD", "1h")
        assert handle.cancel().state == training_pb2.JOB_STATE_CANCELLED
        assert handle.refresh().state == training_pb2.JOB_STATE_FAILED
        with pytest.raises(mc.FailedPreconditionError, match="already finished"):
            c.cancel("ok")


# ======================================================================================================================
# CLI


def test_cli_train_shows_progress_and_metrics(scripted, capsys):
    _, addr = scripted
    rc = cli_main(["train", "--symbol", "OK/USD", "--timeframe", "1h", "--start", "2018-01-01", "--end", "2019-01-01",
                   "--horizon", "24", "--threshold", "0.02", "--trees", "200", "--class-weight", "balanced",
                   "--seed", "7", "--target", addr])
    out, err = capsys.readouterr()
    assert rc == 0
    assert "job    ok" in out and "model  BTC-USD_1h_x" in out
    for text in ("log_loss", "0.9600", "0.9940", "brier", "balanced_accuracy", "0.3333", "log_loss_ratio",
                 "0.9658", "shrink_weight", "0.6200", "down 30.0% range 45.0% up 25.0%"):
        assert text in out, text
    assert "100%" in err  # the progress bar


def test_cli_train_failed_job_exits_1(scripted, capsys):
    _, addr = scripted
    rc = cli_main(["train", "--symbol", "FAIL/USD", "--timeframe", "1h", "--target", addr])
    _, err = capsys.readouterr()
    assert rc == 1 and "job fail FAILED: fitting: only two classes present" in err


def test_cli_train_no_wait(scripted, capsys):
    _, addr = scripted
    assert cli_main(["train", "--symbol", "OK/USD", "--timeframe", "1h", "--no-wait", "--target", addr]) == 0
    assert capsys.readouterr().out.strip() == "job ok queued"


def test_cli_refused_requests_exit_2_with_the_status(training_addr, capsys):
    rc = cli_main(["train", "--symbol", "BTC/USD", "--timeframe", "2h", "--target", training_addr])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: INVALID_ARGUMENT: ") and "timeframe" in err
    rc = cli_main(["cancel", "no-such-job", "--target", training_addr])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: NOT_FOUND: ")
    rc = cli_main(["train", "--symbol", "NONE/USD", "--timeframe", "1h", "--target", training_addr])
    assert rc == 2 and capsys.readouterr().err.startswith("error: FAILED_PRECONDITION: ")


def test_cli_bad_date_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["train", "--symbol", "BTC/USD", "--timeframe", "1h", "--start", "soon"])
    assert info.value.code == 2 and "ISO-8601" in capsys.readouterr().err


def test_cli_lists_on_an_empty_database(training_addr, capsys):
    assert cli_main(["jobs", "--target", training_addr]) == 0
    assert capsys.readouterr().out.strip() == "no training jobs"
    assert cli_main(["models", "--symbol", "BTC/USD", "--timeframe", "1h", "--target", training_addr]) == 0
    assert capsys.readouterr().out.strip() == "no models"


def test_cli_predict_writes_the_ml_columns(reference, tmp_path, capsys):
    _, addr = reference
    df = candle_frame(20, seed=6)
    df["funding_rate"] = np.where(np.arange(20) % 3 == 0, np.nan, 0.0001)
    csv = df.reset_index().rename(columns={"open_time": "timestamp"})
    csv["timestamp"] = csv["timestamp"].dt.strftime("%Y-%m-%dT%H:%M:%SZ")
    path = tmp_path / "candles.csv.gz"
    csv.to_csv(path, index=False)
    out_path = tmp_path / "out.csv"
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path), "--out",
                   str(out_path), "--target", addr])
    err = capsys.readouterr().err
    assert rc == 0, err
    out = pd.read_csv(out_path)
    assert list(out.columns) == [*csv.columns, *mc.ML_COLUMNS]
    assert out["timestamp"].tolist() == csv["timestamp"].tolist()
    with mc.InferenceClient(addr) as c:
        expected = c.predict(df, "BTC/USD", "1h")
    np.testing.assert_allclose(out["ML_UP_PROB"], expected["ML_UP_PROB"], rtol=1e-15, equal_nan=True)
    assert out["ML_READY"].tolist() == expected["ML_READY"].tolist()
    ready = int(expected["ML_READY"].sum())
    in_sample = int(expected["ML_IN_SAMPLE"].sum())
    assert f"20 rows, {ready} ready, model {SERVING}, {in_sample} in-sample" in err


def test_cli_predict_epoch_ms_to_stdout(reference, tmp_path, capsys):
    _, addr = reference
    df = candle_frame(6)
    csv = df.reset_index(drop=True)
    csv.insert(0, "timestamp", [int(t.value // 10**6) for t in df.index])
    path = tmp_path / "c.csv"
    csv.to_csv(path, index=False)
    assert cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path), "--target", addr]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("ML_UP_PROB,ML_DOWN_PROB,ML_RANGE_PROB,ML_READY,ML_IN_SAMPLE,ML_MODEL_ID")
    assert len(lines) == 7 and lines[1].startswith(str(csv["timestamp"].iat[0]))


@pytest.mark.parametrize("content,message", [
    ("timestamp,open,high,low,close\n2019-01-01T00:00:00Z,1,1,1,1\n", "header lacks volume"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T00:00:00Z,1,1,1,1,1\nnope,1,1,1,1,1\n",
     "line 3: cannot parse timestamp 'nope'"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T01:00:00Z,1,1,1,1,1\n2019-01-01T00:00:00Z,1,1,1,1,1\n",
     "line 3: timestamp 2019-01-01T00:00:00Z does not come after"),
    ("timestamp,open,high,low,close,volume\n2019-01-01T00:00:00Z,1,1,1,x,1\n", "line 2: close 'x' is not a number"),
    ("timestamp,open,high,low,close,volume\n1546300800,1,1,1,1,1\n", "epoch seconds"),
])
def test_cli_predict_rejects_bad_csv_naming_the_line(tmp_path, capsys, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    rc = cli_main(["predict", "--symbol", "BTC/USD", "--timeframe", "1h", "--csv", str(path), "--target",
                   "127.0.0.1:1"])
    assert rc == 2
    assert message in capsys.readouterr().err
