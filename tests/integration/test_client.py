"""The client SDK (mlsignal.client) against the real services.

Everything goes over real gRPC on 127.0.0.1:0. The inference client talks to the real inference service of the
shared fixture `services` (a BTC/USD model trained on the bundled sample); the training client talks to the real
training service. Small trainings here use SDK/USD, a market this module adds to the shared database, so no model it
trains replaces one that another module is served.
Where a test must see what arrives at the server (the bearer token, how a frame is split, whether a stream was
closed), the real InferenceServicer over the same model store runs behind a recording interceptor. `ScriptedTraining`
is the one stand-in left, for what no real job can be made to do on demand.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from types import SimpleNamespace

import grpc
import numpy as np
import pandas as pd
import pytest

from mlsignal import client as mc
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from service_fixtures import inverted, ms

HOUR_MS = 3_600_000
T0 = pd.Timestamp("2019-01-01", tz="UTC")
TF = "1h"
CANDLE_COLUMNS = ("open", "high", "low", "close", "volume")
PROB_COLUMNS = ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]
SMALL = dict(start="2018-03-01", end="2018-10-01", n_estimators=20)  # a training of a few seconds
SDK = "SDK/USD"


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def candle_frame(n: int, seed: int = 0, start: pd.Timestamp = T0) -> pd.DataFrame:
    """Random-walk candles, for the conversion tests that never reach a server."""
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


def market(frame: pd.DataFrame, start: str, end: str) -> pd.DataFrame:
    """The sample's candles in [start, end) the way a strategy engine holds them: a UTC DatetimeIndex."""
    f = frame[(frame.open_time_ms >= ms(start)) & (frame.open_time_ms < ms(end))]
    index = pd.DatetimeIndex(pd.to_datetime(f.open_time_ms.to_numpy(), unit="ms", utc=True), name="open_time")
    return pd.DataFrame(f[list(CANDLE_COLUMNS)].to_numpy(), columns=list(CANDLE_COLUMNS), index=index)


def raw_predict(stub, df: pd.DataFrame, symbol: str = "BTC/USD", model_id: str = "") -> inference_pb2.PredictResponse:
    """One Predict through the plain generated stub, with candles built here rather than by the client."""
    candles = [common_pb2.Candle(open_time_ms=int(t.value // 1_000_000), open=r.open, high=r.high, low=r.low,
                                 close=r.close, volume=r.volume)
               for t, r in zip(df.index, df.itertuples(index=False), strict=True)]
    return stub.Predict(inference_pb2.PredictRequest(symbol=symbol, timeframe=TF, model_id=model_id,
                                                     candles=candles), timeout=60)


def assert_same_as_raw(out: pd.DataFrame, resp: inference_pb2.PredictResponse) -> None:
    """The client's ML_* columns hold exactly what the server answered, row by row."""
    preds = resp.predictions
    assert len(out) == len(preds)
    assert [int(t.value // 1_000_000) for t in out.index] == [p.open_time_ms for p in preds]
    for col, field in zip(PROB_COLUMNS, ("ml_up_prob", "ml_down_prob", "ml_range_prob"), strict=True):
        want = np.array([getattr(p, field) for p in preds])
        assert np.array_equal(out[col].to_numpy(), want, equal_nan=True), col  # exact
    assert out["ML_READY"].tolist() == [p.ready for p in preds]
    assert out["ML_IN_SAMPLE"].tolist() == [p.in_sample for p in preds]
    assert (out["ML_MODEL_ID"] == resp.model_id).all()


def live_frame(live: list[mc.LivePrediction], index: pd.Index) -> pd.DataFrame:
    return pd.DataFrame({"ML_UP_PROB": [p.up for p in live], "ML_DOWN_PROB": [p.down for p in live],
                         "ML_RANGE_PROB": [p.range for p in live], "ML_READY": [p.ready for p in live],
                         "ML_IN_SAMPLE": [p.in_sample for p in live]}, index=index)


def training_target(services) -> str:
    return f"127.0.0.1:{services.training.port}"


def inference_target(services) -> str:
    return f"127.0.0.1:{services.inference.port}"


def serve(add, interceptors=()) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), interceptors=list(interceptors),
                         options=[("grpc.max_receive_message_length", mc.MAX_MESSAGE_BYTES),
                                  ("grpc.max_send_message_length", mc.MAX_MESSAGE_BYTES)])
    add(server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def metadata_of(context) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata()}


@pytest.fixture(scope="module")
def btc(sample_frame) -> pd.DataFrame:
    """BTC/USD from 2018-12-15 to 2019-01-15: the end of the model's training window and a month after it."""
    return market(sample_frame, "2018-12-15", "2019-01-15")


@pytest.fixture
def inference(services):
    with mc.InferenceClient(inference_target(services)) as c:
        yield c


@pytest.fixture
def training(services):
    with mc.TrainingClient(training_target(services), timeout=30) as c:
        yield c


# ----------------------------------------------------------------------------------------------------------------------
# the real inference servicer behind a recording interceptor


class Recorder(grpc.aio.ServerInterceptor):
    """Records each call's method and metadata, the size of each Predict and how many StreamPredict calls are open.

    It runs on the server's event loop; the tests read what it recorded from their own thread."""

    def __init__(self):
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.predict_sizes: list[int] = []
        self.open_streams = 0
        self.lock = threading.Lock()

    async def intercept_service(self, continuation, details):
        method = details.method.rsplit("/", 1)[-1]
        with self.lock:
            self.calls.append((method, dict(details.invocation_metadata or ())))
        handler = await continuation(details)
        if handler is None:
            return None
        if method == "Predict":
            inner = handler.unary_unary

            async def unary(request, context):
                with self.lock:
                    self.predict_sizes.append(len(request.candles))
                return await inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if method == "StreamPredict":
            inner_stream = handler.stream_stream

            async def stream(request_iterator, context):
                with self.lock:
                    self.open_streams += 1
                try:
                    async for response in inner_stream(request_iterator, context):
                        yield response
                finally:
                    with self.lock:
                        self.open_streams -= 1

            return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                         handler.response_serializer)
        return handler


@pytest.fixture(scope="module")
def observed(services):
    """The real asyncio InferenceServicer over the shared model store, on its own port of an asyncio server (on the
    process's server loop, like the services), with a Recorder in front."""
    from inference_service.server import SERVICE_NAME
    from inference_service.servicer import InferenceServicer
    from shared.server.builder import start_server

    recorder = Recorder()
    servicer = InferenceServicer(services.inference.store, services.settings.max_batch)
    handle = start_server("127.0.0.1:0",
                          lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, s),
                          [SERVICE_NAME], mc.MAX_MESSAGE_BYTES, interceptors=[recorder])
    yield recorder, f"127.0.0.1:{handle.port}"
    handle.stop(0)


# ----------------------------------------------------------------------------------------------------------------------
# a scripted training servicer

# Fake kept only where the real service can't: arbitrary status codes, DATA_LOSS/early end mid-watch, seen metadata.


def _job(job_id, state, progress=0.0, stage="", **kw):
    return training_pb2.TrainingJob(job_id=job_id, state=state, progress=progress, stage=stage, **kw)


SCRIPTS = {
    "ok": [
        _job("ok", training_pb2.JOB_STATE_RUNNING, 0.1, "fitting"),
        _job("ok", training_pb2.JOB_STATE_SUCCEEDED, 1.0, "done", model_id="BTC-USD_1h_x"),
    ],
    "broken": [_job("broken", training_pb2.JOB_STATE_RUNNING, 0.3, "fitting")],  # then DATA_LOSS
    "truncated": [_job("truncated", training_pb2.JOB_STATE_RUNNING, 0.3, "fitting")],  # then ends
}


class ScriptedTraining(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self):
        self.metadata: list[dict[str, str]] = []

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
# real training runs shared by several tests


@pytest.fixture(scope="module")
def sdk_market(services, sample_frame) -> pd.DataFrame:
    """SDK/USD candles in the shared database: the sample's reciprocal (as INV/USD), 2018-01-01 .. 2019-03-01."""
    from shared.store.db import make_engine
    from shared.store.marketdata import insert_candles

    frame = inverted(sample_frame[(sample_frame.open_time_ms >= ms("2018-01-01")) &
                                  (sample_frame.open_time_ms < ms("2019-03-01"))].reset_index(drop=True))
    engine = make_engine(services.url)
    try:
        insert_candles(engine, SDK, TF, frame)  # rows already stored are skipped
    finally:
        engine.dispose()
    return frame


@pytest.fixture(scope="module")
def sdk_models(services, sdk_market):
    """Two SDK/USD models trained through the client, one after the other.

    The first is followed with a progress callback; the second sets every training argument.
    """
    seen: list[training_pb2.TrainingJob] = []
    with mc.TrainingClient(training_target(services), timeout=30) as c:
        first = c.train(SDK, TF, SMALL["start"], SMALL["end"], n_estimators=SMALL["n_estimators"])
        first_job = first.wait(on_progress=seen.append)
        second = c.train(SDK, TF, pd.Timestamp(SMALL["start"], tz="UTC"), ms(SMALL["end"]), horizon_bars=12,
                         threshold=0.01, n_estimators=20, max_depth=-1, min_samples_leaf=30, class_weight="balanced",
                         random_state=0)
        second_job = second.wait()
    return SimpleNamespace(first=first, first_job=first_job, progress=seen, second=second, second_job=second_job)


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
    with mc.TrainingClient(addr, timeout=10) as c, pytest.raises(mc.MlsignalClientError) as info:
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
    with mc.TrainingClient("127.0.0.1:1", timeout=5) as c, pytest.raises(mc.UnavailableError) as info:
        c.list_models()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE


def test_timeout_gives_deadline_exceeded(services, sample_frame):
    df = market(sample_frame, "2018-06-01", "2019-01-01")  # 5,000+ candles cannot be answered within a millisecond
    with (mc.InferenceClient(inference_target(services), timeout=0.001) as c,
          pytest.raises(mc.DeadlineExceededError) as info):
        c.predict(df, "BTC/USD", TF)
    assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_errors_survive_pickling():
    import pickle

    exc = pickle.loads(pickle.dumps(mc.NotFoundError(grpc.StatusCode.NOT_FOUND, "no model", note="rows 1..2")))
    assert type(exc) is mc.NotFoundError and exc.code is grpc.StatusCode.NOT_FOUND and exc.details == "no model"
    job = training_pb2.TrainingJob(job_id="j", state=training_pb2.JOB_STATE_FAILED, error="boom")
    failed = pickle.loads(pickle.dumps(mc.TrainingFailedError(job)))
    assert failed.job == job and failed.details == "boom"


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


def test_token_on_inference_calls_including_the_bidirectional_stream(observed, btc):
    recorder, addr = observed
    df = btc.iloc[:3]
    with mc.InferenceClient(addr, token="tok") as c:
        n = len(recorder.calls)
        c.get_model("BTC/USD", TF)
        c.predict(df, "BTC/USD", TF)
        live = list(c.stream(mc.frame_to_candles(df), "BTC/USD", TF))
    assert len(live) == 3
    seen = recorder.calls[n:]
    assert [m for m, _ in seen] == ["GetModel", "Predict", "StreamPredict"]
    assert all(md.get("authorization") == "Bearer tok" for _, md in seen)
    with mc.InferenceClient(addr) as c:
        n = len(recorder.calls)
        list(c.stream(mc.frame_to_candles(df), "BTC/USD", TF))
    assert "authorization" not in recorder.calls[n][1]


@pytest.mark.parametrize("target", ["dns:///127.0.0.1:{port}", "ipv4:127.0.0.1:{port}", "127.0.0.1:{port}"])
def test_targets_are_accepted_unchanged(services, target):
    with mc.TrainingClient(target.format(port=services.training.port), timeout=10) as c:
        assert services.btc_job.model_id in [m.model_id for m in c.list_models("BTC/USD", TF)]
    with mc.InferenceClient(target.format(port=services.inference.port), timeout=10) as c:
        assert c.get_model("BTC/USD", TF).model_id.startswith("BTC-USD_1h_")


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
    with pytest.raises(ValueError, match=r"tz-naive.*UTC"):
        mc.frame_to_candles(df.tz_localize(None))
    naive_col = df.reset_index().assign(open_time=lambda d: d.open_time.dt.tz_localize(None))
    with pytest.raises(ValueError, match="tz-naive"):
        mc.frame_to_candles(naive_col)
    with pytest.raises(ValueError, match="no candle times"):
        mc.frame_to_candles(df.reset_index(drop=True))
    with pytest.raises(ValueError, match="epoch seconds"):
        mc.frame_to_candles(df.reset_index(drop=True).assign(timestamp=np.arange(3) * 3600 + 1_546_300_800))
    with pytest.raises(ValueError, match="'2019-01-01' has no time zone"):
        mc.frame_to_candles(df.reset_index(drop=True).assign(timestamp=["2019-01-01"] * 3))
    zoned = df.reset_index(drop=True).assign(timestamp=[t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in df.index])
    assert [c.open_time_ms for c in mc.frame_to_candles(zoned)] == [int(t.value // 10**6) for t in df.index]


def test_missing_or_non_numeric_columns_are_rejected():
    with pytest.raises(ValueError, match=r"missing column.*volume"):
        mc.frame_to_candles(candle_frame(3).drop(columns="volume"))
    with pytest.raises(ValueError, match="'close' is not numeric"):
        mc.frame_to_candles(candle_frame(2).assign(close=["a", "b"]))


def _predictions(candles, ready, in_sample):
    return [inference_pb2.Prediction(open_time_ms=c.open_time_ms, ml_up_prob=0.5, ml_down_prob=0.2,
                                     ml_range_prob=0.3, ready=r, in_sample=s)
            for c, r, s in zip(candles, ready, in_sample, strict=True)]


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


# ======================================================================================================================
# predict against the real inference service


def test_predict_returns_exactly_what_predict_answers(inference, services, btc):
    out = inference.predict(btc, "BTC/USD", TF)
    resp = raw_predict(services.infer_stub, btc)
    assert out.index.equals(btc.index)
    assert list(out.columns) == [*btc.columns, *mc.ML_COLUMNS]
    pd.testing.assert_frame_equal(out[btc.columns], btc)
    assert_same_as_raw(out, resp)
    warmup = inference.get_model("BTC/USD", TF).warmup_bars
    assert not out["ML_READY"].iloc[: warmup - 1].any() and out["ML_READY"].iloc[warmup - 1:].all()
    assert out.iloc[: warmup - 1][PROB_COLUMNS].isna().all().all()
    ready = out[out.ML_READY]
    np.testing.assert_allclose(ready[PROB_COLUMNS].sum(axis=1), 1.0, atol=1e-9)
    assert ready["ML_UP_PROB"].nunique() > len(ready) // 2  # a per-candle signal
    # the frame reaches past the 2018 training window of the serving model
    assert out["ML_IN_SAMPLE"].any() and not out["ML_IN_SAMPLE"].all()


def test_split_predict_equals_one_predict_exactly(observed, services, btc):
    recorder, addr = observed
    warmup = services.infer_stub.GetModel(inference_pb2.GetModelRequest(symbol="BTC/USD", timeframe=TF)).warmup_bars
    assert warmup == 100
    whole = raw_predict(services.infer_stub, btc)
    with mc.InferenceClient(addr, max_batch=150) as c:
        n = len(recorder.predict_sizes)
        split = c.predict(btc, "BTC/USD", TF)
        sizes = recorder.predict_sizes[n:]
    assert sizes == [stop - start for start, stop, _ in mc.batch_plan(len(btc), 150, warmup)]
    assert len(sizes) > 5 and max(sizes) == 150
    assert_same_as_raw(split, whole)
    with mc.InferenceClient(inference_target(services), max_batch=150) as c:
        pd.testing.assert_frame_equal(c.predict(btc, "BTC/USD", TF), split, check_exact=True)


def test_split_predict_with_a_pinned_model_that_is_not_serving(observed, services, sdk_market, sdk_models):
    recorder, addr = observed
    ids = {sdk_models.first_job.model_id, sdk_models.second_job.model_id}
    with mc.TrainingClient(f"127.0.0.1:{services.training.port}") as t:
        serving = t.serving_model(SDK, TF)
    # whichever of the two the promotion gate left out of service is the one pinned
    older = next(iter(ids - {serving.model_id})) if serving is not None else sdk_models.first_job.model_id
    with mc.InferenceClient(inference_target(services)) as c:
        assert serving is None or c.get_model(SDK, TF).model_id != older
    df = market(sdk_market, "2019-01-01", "2019-02-01")
    whole = raw_predict(services.infer_stub, df, SDK, model_id=older)
    with mc.InferenceClient(addr, max_batch=150) as c:
        n = len(recorder.predict_sizes)
        split = c.predict(df, SDK, TF, model_id=older)
        sizes = recorder.predict_sizes[n:]
    assert len(sizes) > 5 and max(sizes) == 150
    assert_same_as_raw(split, whole)
    assert (split["ML_MODEL_ID"] == older).all()
    assert split["ML_READY"].sum() == len(df) - 99
    assert not split["ML_IN_SAMPLE"].any()


def test_split_predict_needs_max_batch_above_the_warmup(services, btc):
    with (mc.InferenceClient(inference_target(services), max_batch=100) as c,
          pytest.raises(ValueError, match="raise max_batch")):
        c.predict(btc, "BTC/USD", TF)


def test_predict_checks_input_before_sending(observed, btc):
    recorder, addr = observed
    df = btc.iloc[:5]
    n = len(recorder.calls)
    with mc.InferenceClient(addr) as c:
        with pytest.raises(ValueError, match="strictly increasing: row 3"):
            c.predict(df.iloc[[0, 1, 2, 2, 4]], "BTC/USD", TF)
        with pytest.raises(ValueError, match="no rows"):
            c.predict(df.iloc[:0], "BTC/USD", TF)
        with pytest.raises(ValueError, match="tz-naive"):
            c.predict(df.tz_localize(None), "BTC/USD", TF)
        with pytest.raises(ValueError, match="missing column"):
            c.predict(df.drop(columns="volume"), "BTC/USD", TF)
    assert len(recorder.calls) == n


def test_predict_errors_are_typed(inference, btc):
    with pytest.raises(mc.NotFoundError) as info:
        inference.predict(btc, "ETH/USD", TF)
    assert info.value.code is grpc.StatusCode.NOT_FOUND and "ETH/USD" in info.value.details
    with pytest.raises(mc.NotFoundError, match="model_id"):
        inference.predict(btc, "BTC/USD", TF, model_id="nope")
    with pytest.raises(mc.InvalidArgumentError, match="timeframe"):
        inference.predict(btc, "BTC/USD", "7m")
    bad = btc.copy()
    bad.iloc[40, bad.columns.get_loc("close")] = -1.0
    with pytest.raises(mc.InvalidArgumentError) as info:
        inference.predict(bad, "BTC/USD", TF)
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "candles[40].close" in info.value.details


def test_an_error_in_a_split_request_names_its_rows(services, btc):
    bad = btc.iloc[:400].copy()
    bad.iloc[250, bad.columns.get_loc("close")] = -1.0
    start, stop, _ = next(p for p in mc.batch_plan(400, 150, 100) if p[0] <= 250 < p[1])
    with (mc.InferenceClient(inference_target(services), max_batch=150) as c,
          pytest.raises(mc.InvalidArgumentError) as info):
        c.predict(bad, "BTC/USD", TF)
    assert f"candles[{250 - start}].close" in info.value.details
    assert f"frame rows {start}..{stop - 1}" in str(info.value)


def test_get_model(inference, services):
    info = inference.get_model("BTC/USD", TF)
    raw = services.infer_stub.GetModel(inference_pb2.GetModelRequest(symbol="BTC/USD", timeframe=TF))
    assert info == raw and info.warmup_bars == 100 and info.symbol == "BTC/USD"
    assert "log_loss" in info.metrics and "prior_log_loss" in info.metrics
    with pytest.raises(mc.NotFoundError):
        inference.get_model("ETH/USD", TF)


# ======================================================================================================================
# stream


def test_stream_one_candle_at_a_time_equals_predict(inference, services, btc):
    df = btc.iloc[:300]
    live = list(inference.stream(mc.frame_to_candles(df), "BTC/USD", TF))
    assert all(isinstance(p, mc.LivePrediction) for p in live)
    assert [p.open_time_ms for p in live] == [int(t.value // 1_000_000) for t in df.index]
    resp = raw_predict(services.infer_stub, df)
    assert_same_as_raw(live_frame(live, df.index).assign(ML_MODEL_ID=[p.model_id for p in live]), resp)
    predicted = inference.predict(df, "BTC/USD", TF)[[*PROB_COLUMNS, "ML_READY", "ML_IN_SAMPLE"]]
    pd.testing.assert_frame_equal(live_frame(live, df.index), predicted, check_exact=True)
    assert sum(p.ready for p in live) == 300 - 99
    assert live[0].open_time == df.index[0].to_pydatetime()
    with pytest.raises(AttributeError):
        live[0].up = 1.0  # frozen


def test_stream_accepts_dicts_series_rows_and_messages(inference, btc):
    df = btc.iloc[:110].copy()
    df["funding_rate"] = np.nan
    df.iloc[104:, df.columns.get_loc("funding_rate")] = [np.nan, 0.0001, np.nan, 0.0002, 0.0, np.nan]
    rows = list(df.iterrows())
    items = [
        *mc.frame_to_candles(df.iloc[:104]),  # Candle messages
        {"open_time_ms": int(df.index[104].value // 10**6), **df.iloc[104].to_dict()},  # dict, NaN funding: absent
        rows[105],  # (index, Series) from iterrows
        df.iloc[106],  # Series named by its open time
        next(df.iloc[[107]].itertuples()),  # itertuples row
        {"timestamp": df.index[108], **df.iloc[108].to_dict()},  # tz-aware Timestamp under 'timestamp'
        df.iloc[109].to_dict() | {"open_time": df.index[109]},  # open_time key
    ]
    live = list(inference.stream(iter(items), "BTC/USD", TF))
    whole = inference.predict(df, "BTC/USD", TF)
    assert [p.open_time_ms for p in live] == [int(t.value // 10**6) for t in df.index]
    assert [p.ready for p in live] == whole["ML_READY"].tolist()
    pd.testing.assert_frame_equal(live_frame(live, df.index), whole[live_frame(live, df.index).columns],
                                  check_exact=True)
    assert all(p.ready for p in live[104:])


def test_stream_replaces_a_forming_candle(inference, btc):
    df = btc.iloc[:150]
    forming = df.iloc[149].copy()
    forming["close"] = forming["close"] * 1.03
    forming["high"] = max(forming["high"], forming["close"])
    items = [*(df.iloc[i] for i in range(149)), forming, df.iloc[149]]  # the last candle twice: forming, then final
    live = list(inference.stream(items, "BTC/USD", TF))
    final = inference.predict(df, "BTC/USD", TF)
    early = inference.predict(pd.concat([df.iloc[:149], forming.to_frame().T.astype(float)]), "BTC/USD", TF)
    assert len(live) == 151 and live[149].open_time_ms == live[150].open_time_ms
    assert live[149].ready and live[150].ready
    assert live[149].up == early["ML_UP_PROB"].iat[149]
    assert live[150].up == final["ML_UP_PROB"].iat[149] != live[149].up


def test_stream_reports_a_bad_item_after_the_good_ones(inference, btc):
    items = [btc.iloc[0], btc.iloc[1], {"open": 1.0}, btc.iloc[3]]
    got = []
    with pytest.raises(ValueError, match="candle has no time"):
        for p in inference.stream(items, "BTC/USD", TF):
            got.append(p)
    assert len(got) == 2


def test_stream_reraises_an_error_of_the_feed(inference, btc):
    def feed():
        yield btc.iloc[0]
        yield btc.iloc[1]
        raise ConnectionError("exchange websocket closed")

    got = []
    with pytest.raises(ConnectionError, match="websocket"):
        for p in inference.stream(feed(), "BTC/USD", TF):
            got.append(p)
    assert len(got) == 2


def test_stream_server_errors_are_typed(inference, btc):
    got = []
    with pytest.raises(mc.InvalidArgumentError, match="open_time_ms") as info:
        for p in inference.stream([btc.iloc[2], btc.iloc[3], btc.iloc[0]], "BTC/USD", TF):
            got.append(p)
    assert len(got) == 2 and info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(mc.NotFoundError):
        list(inference.stream([btc.iloc[0]], "BTC/USD", TF, model_id="nope"))
    with pytest.raises(mc.NotFoundError):
        list(inference.stream([btc.iloc[0]], "ETH/USD", TF))


def test_stream_on_error_reports_a_refused_candle_and_goes_on(inference, btc):
    """The server keeps the stream open after a refused candle; with on_error the client does too, and the answers
    after it equal those of a stream that never saw the bad candle."""
    bad = btc.iloc[5].copy()
    bad["close"] = bad["high"] * 1.5  # close above high
    feed = [btc.iloc[i] for i in range(5)] + [bad] + [btc.iloc[i] for i in range(5, 130)]
    errors: list = []
    got = list(inference.stream(iter(feed), "BTC/USD", TF, on_error=errors.append))
    want = list(inference.stream((btc.iloc[i] for i in range(130)), "BTC/USD", TF))
    assert len(errors) == 1 and isinstance(errors[0], mc.InvalidArgumentError)
    assert errors[0].field == "candles[0].close" or errors[0].field.startswith("candles[0]")
    assert [(p.open_time_ms, p.up, p.ready) for p in got] == [(p.open_time_ms, p.up, p.ready) for p in want]
    assert sum(p.ready for p in got) == 130 - 99


def test_leaving_a_live_stream_cancels_it(observed, btc):
    recorder, addr = observed
    feed_done = threading.Event()

    def feed():  # a live feed: blocks after three candles like an exchange waiting for the next close
        yield from (btc.iloc[i] for i in range(3))
        feed_done.wait(30)

    try:
        with mc.InferenceClient(addr) as c:
            for i, _ in enumerate(c.stream(feed(), "BTC/USD", TF)):
                if i == 0:
                    assert recorder.open_streams == 1
                if i == 2:
                    break
        for _ in range(100):
            if recorder.open_streams == 0:
                break
            time.sleep(0.05)
        assert recorder.open_streams == 0
    finally:
        feed_done.set()


# ======================================================================================================================
# training client against the real training service


def test_train_and_watch_with_progress(sdk_models, training):
    job, seen = sdk_models.first_job, sdk_models.progress
    assert job.state == training_pb2.JOB_STATE_SUCCEEDED and mc.is_final(job)
    assert sdk_models.first.state is job and job.progress == 1.0 and job.model_id.startswith("SDK-USD_1h_")
    assert len(seen) >= 3 and seen[-1] is job
    progress = [j.progress for j in seen]
    assert progress == sorted(progress) and len(set(progress)) >= 3
    assert any(0 < p < 1 for p in progress)  # the watch coalesces quick changes, so stages may be skipped
    assert all(not mc.is_final(j) for j in seen[:-1])
    assert all(j.state == training_pb2.JOB_STATE_RUNNING for j in seen if 0 < j.progress < 1)
    assert job.metrics["log_loss"] > 0 and job.metrics["prior_log_loss"] > 0
    models = {m.model_id: m for m in training.list_models(SDK, TF)}
    assert job.model_id in models and models[job.model_id].metrics["log_loss"] == job.metrics["log_loss"]
    assert job.model_id not in [m.model_id for m in training.list_models("BTC/USD", TF)]
    jobs = {j.job_id: j for j in training.list_jobs(SDK, TF)}
    assert jobs[job.job_id].state == training_pb2.JOB_STATE_SUCCEEDED
    assert training.job(job.job_id).state == job


def test_train_request_carries_every_argument(sdk_models):
    req = sdk_models.second_job.request  # the service echoes the request it runs
    assert req.symbol == SDK and req.timeframe == TF
    assert req.start_time.ToJsonString() == "2018-03-01T00:00:00Z"
    assert req.end_time.ToJsonString() == "2018-10-01T00:00:00Z"
    assert (req.label.horizon_bars, req.label.threshold) == (12, 0.01)
    p = req.params
    assert (p.n_estimators, p.max_depth, p.min_samples_leaf) == (20, -1, 30)
    assert p.class_weight == common_pb2.CLASS_WEIGHT_BALANCED
    assert p.HasField("random_state") and p.random_state == 0
    assert sdk_models.second_job.state == training_pb2.JOB_STATE_SUCCEEDED


def test_cancel_ends_a_job_cancelled(training, sdk_market):
    handle = training.train(SDK, TF, n_estimators=3000)
    req = handle.state.request
    assert handle.state.state in (training_pb2.JOB_STATE_QUEUED, training_pb2.JOB_STATE_RUNNING)
    assert not req.HasField("start_time") and not req.HasField("end_time")  # the whole stored range
    assert req.params.n_estimators == 3000 and req.params.random_state == 42  # the service's default seed
    assert req.params.class_weight == common_pb2.CLASS_WEIGHT_NONE
    assert handle.cancel().state == training_pb2.JOB_STATE_CANCELLED
    final = handle.watch()  # watch returns the final job whatever it is
    assert mc.job_state_name(final.state) == "CANCELLED" and not final.model_id
    with pytest.raises(mc.TrainingFailedError) as info:
        handle.wait()
    assert mc.job_state_name(info.value.job.state) == "CANCELLED"
    assert info.value.details == info.value.job.error != ""
    assert isinstance(info.value, mc.MlsignalClientError) and info.value.code is None
    assert handle.refresh().state == training_pb2.JOB_STATE_CANCELLED
    with pytest.raises(mc.FailedPreconditionError, match="already finished"):
        training.cancel(handle.job_id)
    with pytest.raises(mc.FailedPreconditionError, match="already finished"):
        handle.cancel()


def test_a_failed_job_is_returned_by_watch_and_raised_by_wait(training, sdk_market):
    # with a 90 % threshold no candle is labelled up or down, so the worker fails the job
    handle = training.train(SDK, TF, SMALL["start"], SMALL["end"], threshold=0.9, n_estimators=20)
    final = handle.watch()
    assert mc.job_state_name(final.state) == "FAILED" and "label.threshold" in final.error
    with pytest.raises(mc.TrainingFailedError) as info:
        handle.wait()
    assert info.value.job == final and info.value.details == final.error
    assert isinstance(info.value, mc.MlsignalClientError) and info.value.code is None
    assert f"job {handle.job_id} FAILED" in str(info.value)


def test_error_in_the_middle_of_a_watch_is_typed(scripted):
    _, addr = scripted
    seen = []
    with mc.TrainingClient(addr) as c, pytest.raises(mc.DataLossError, match="damaged"):
        c.job("broken").watch(seen.append)
    assert len(seen) == 1


def test_watch_that_ends_before_a_final_state_raises(scripted):
    _, addr = scripted
    with mc.TrainingClient(addr) as c, pytest.raises(mc.ProtocolError, match="RUNNING"):
        c.job("truncated").watch()


def test_unknown_timeframe_is_invalid_argument(training):
    with pytest.raises(mc.InvalidArgumentError) as info:
        training.train("BTC/USD", "2h")
    assert info.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith("timeframe")


def test_start_not_before_end_is_invalid_argument(training):
    with pytest.raises(mc.InvalidArgumentError, match="start_time"):
        training.train("BTC/USD", TF, "2019-01-01", pd.Timestamp("2018-01-01", tz="UTC"))
    with pytest.raises(mc.InvalidArgumentError, match=r"label\.threshold"):
        training.train("BTC/USD", TF, threshold=1.5)


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


def test_symbol_without_candles_is_failed_precondition(training, services):
    with pytest.raises(mc.FailedPreconditionError) as info:
        training.train("NONE/USD", TF, "2018-01-01", "2019-01-01", n_estimators=10)
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and "no candles" in info.value.details
    with pytest.raises(mc.FailedPreconditionError, match="already finished"):
        training.cancel(services.btc_job.job_id)


def test_train_arguments_are_checked_before_sending(training):
    from datetime import datetime

    with pytest.raises(ValueError, match="class_weight"):
        training.train("BTC/USD", TF, class_weight="auto")
    with pytest.raises(ValueError, match="no time zone"):
        training.train("BTC/USD", TF, datetime(2018, 1, 1))
    with pytest.raises(ValueError, match="n_estimators"):
        training.train("BTC/USD", TF, n_estimators=10.5)


@pytest.fixture
def empty_training(sqlite_url, tmp_path):
    """The real training service on a fresh, migrated, empty SQLite database; stopped after the test."""
    from shared.settings import Settings
    from training_service.server import start

    running = start(Settings(database_url=sqlite_url, model_dir=tmp_path / "models"), "127.0.0.1:0")
    try:
        yield f"127.0.0.1:{running.port}"
    finally:
        running.stop(0.5)


def test_empty_database_lists_nothing(empty_training):
    with mc.TrainingClient(empty_training, timeout=30) as c:
        assert c.list_jobs() == []
        assert c.list_jobs("BTC/USD", TF, limit=5) == []
        assert c.list_models() == []
        assert c.list_models("BTC/USD", TF) == []
