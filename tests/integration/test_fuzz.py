"""A fuzzer for every RPC of both services, generated from their protobuf descriptors.

Requests are built field by field from `DESCRIPTOR.services_by_name[...].methods` (strings, numbers, enums,
Timestamps, nested and repeated messages) with edge values: NaN, ±inf, huge and negative integers, empty and huge
strings, Timestamps outside protobuf's range, unknown enum numbers, and valid values (the stored market, the real
model and job ids, real candles) often enough that calls also get past validation. Raw garbage bytes go to every
method path as well. Every answer must carry a documented status code: never UNKNOWN or INTERNAL, and no message may
show a server path, SQL, a traceback or the token. Afterwards both servers are SERVING, candles and models are
unchanged (but for the candles ImportCandles answered it inserted), every job the fuzzer started was cancelled, and
a reference Predict answers exactly as before.

`make test` runs MLSIGNAL_FUZZ_EXAMPLES=300 examples in total (the default); `make fuzz` runs 5000. The codes seen
are printed at the end (`pytest -s`).
"""

from __future__ import annotations

import math
import os
import re
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
import sqlalchemy as sa
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_inference_service import candles_of

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2, training_pb2_grpc
from service_fixtures import load_market
from shared.settings import Settings

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TOTAL = int(os.environ.get("MLSIGNAL_FUZZ_EXAMPLES", "300"))
MESSAGE_EXAMPLES = max(1, TOTAL * 4 // 5)
GARBAGE_EXAMPLES = max(1, TOTAL - MESSAGE_EXAMPLES)
TOKEN = "fuzz-token-0123456789"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
SYMBOL, TF = "BTC/USD", "1h"
N_CANDLES = 3000

SERVICES = {
    "training": training_pb2.DESCRIPTOR.services_by_name["TrainingService"],
    "inference": inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
}
METHODS = [(server, m) for server, svc in SERVICES.items() for m in svc.methods]
C = grpc.StatusCode
DOCUMENTED = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.FAILED_PRECONDITION, C.RESOURCE_EXHAUSTED, C.DATA_LOSS,
              C.UNAVAILABLE, C.UNAUTHENTICATED, C.UNIMPLEMENTED}
STREAM_ONLY = {C.CANCELLED, C.DEADLINE_EXCEEDED}  # only for streams this test cancels or cuts short
LEAKS = re.compile(r"Traceback|File \"|/tmp/|/var/|/home/|/work/|sqlite:|postgresql|SELECT |INSERT |UPDATE |"
                   r"sqlalchemy|psycopg|\.py\b|" + re.escape(TOKEN), re.I)

INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1), FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1), FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1), FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1), FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
EDGE_FLOATS = [math.nan, math.inf, -math.inf, 0.0, -0.0, 1e308, -1e308, 5e-324, 1.0, 0.02, 0.5, 100.0, 1e-9]
T_2018 = 1_514_764_800


class World:
    """Both services on their own SQLite database with a token, one tiny model, a tiny training queue."""

    def __init__(self, root: Path, frame):
        from inference_service.server import start as start_inference
        from training_service.server import start as start_training

        self.root = root
        self.url = f"sqlite:///{root}/fuzz.db"
        self.frame = frame.iloc[:N_CANDLES].reset_index(drop=True)
        load_market(self.url, self.frame)
        base = Settings(database_url=self.url, model_dir=root / "models", auth_token=TOKEN, model_poll_seconds=0.2,
                        training_queue_size=2, training_workers=1, max_batch=2000, training_fit_jobs=1)
        self.training = start_training(base, "127.0.0.1:0")
        self.inference = start_inference(base, "127.0.0.1:0")
        self.channels = {"training": grpc.insecure_channel(f"127.0.0.1:{self.training.port}"),
                         "inference": grpc.insecure_channel(f"127.0.0.1:{self.inference.port}")}
        tstub = training_pb2_grpc.TrainingServiceStub(self.channels["training"])
        job = tstub.StartTraining(training_pb2.StartTrainingRequest(
            symbol=SYMBOL, timeframe=TF, params=common_pb2.ModelParams(n_estimators=5)), timeout=30, metadata=AUTH)
        done = _wait_final(tstub, job.job_id)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        self.model_id, self.job_id = done.model_id, done.job_id
        self.tstub = tstub
        self.reference = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF,
                                                      candles=candles_of(self.frame.iloc[-300:]))
        self.reference_answer = self.predict_reference()
        self.counts = self.row_counts()
        self.codes: Counter[str] = Counter()
        self.examples = 0
        self.started_jobs: list[str] = []
        self.imported = 0  # candles that ImportCandles calls answered they inserted

    def predict_reference(self) -> bytes:
        call = self.channels["inference"].unary_unary("/mlsignal.v1.InferenceService/Predict")
        deadline = time.monotonic() + 10
        while True:  # the model may still be loading
            try:
                return call(self.reference.SerializeToString(), timeout=10, metadata=AUTH)
            except grpc.RpcError as err:
                if err.code() != C.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def row_counts(self) -> dict[str, int]:
        engine = sa.create_engine(self.url)
        try:
            with engine.connect() as conn:
                return {t: conn.execute(sa.text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                        for t in ("candles", "models", "training_jobs")}
        finally:
            engine.dispose()

    def close(self) -> None:
        for channel in self.channels.values():
            channel.close()
        self.inference.stop(0.5)
        self.training.stop(0.5)


FINAL = {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}


def _wait_final(stub, job_id: str, timeout: float = 180) -> training_pb2.TrainingJob:
    for job in stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=timeout,
                                     metadata=AUTH):
        if job.state in FINAL:
            return job
    raise AssertionError(f"job {job_id} ended its watch without a final state")


@pytest.fixture(scope="module")
def world(tmp_path_factory, sample_frame):
    w = World(tmp_path_factory.mktemp("fuzz"), sample_frame)
    yield w
    w.close()


# ----------------------------------------------------------------------------------------------------------------------
# strategies from descriptors


def _timestamps() -> st.SearchStrategy:
    seconds = st.one_of(st.sampled_from([0, -1, 2**40, -(2**40), 2**63 - 1, -(2**63), 253_402_300_799,
                                         253_402_300_800, -62_135_596_800, -62_135_596_801, T_2018,
                                         T_2018 + 86_400 * 365]),
                        st.integers(-(2**63), 2**63 - 1), st.integers(T_2018 - 10**8, T_2018 + 10**8))
    nanos = st.one_of(st.just(0), st.sampled_from([-1, 10**9, 999_999_999, -(2**31), 2**31 - 1]),
                      st.integers(-(2**31), 2**31 - 1))
    return st.builds(lambda s, n: {"seconds": s, "nanos": n}, seconds, nanos)


def _strings(field: FieldDescriptor, world: World) -> st.SearchStrategy:
    pool = ["", " ", "\x00", "../../etc/passwd", "'; DROP TABLE models; --", "%s%n", "é" * 3, "BTC/USD ", "btc/usd"]
    name = field.name
    if "symbol" in name:
        pool += [SYMBOL, SYMBOL, "ETH/USD", "BTC-USD", "B" * 200]
    if "timeframe" in name:
        pool += [TF, TF, "1m", "1d", "2h", "1H"]
    if name.endswith("model_id"):
        pool += [world.model_id, world.model_id, world.model_id + "x", "BTC-USD_1h_0"]
    if name.endswith("job_id"):
        pool += [world.job_id, world.job_id, "0" * 32]
    return st.one_of(st.sampled_from(pool), st.text(max_size=40), st.just("X" * 100_000))


def _scalar(field: FieldDescriptor, world: World) -> st.SearchStrategy:
    t = field.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.one_of(st.sampled_from(EDGE_FLOATS), st.floats(allow_nan=True, allow_infinity=True))
    if t in INT_RANGES:
        lo, hi = INT_RANGES[t]
        edges = [v for v in (0, 1, -1, 5, 24, lo, hi, 2**31 - 1, 2**32, 10**9) if lo <= v <= hi]
        if "time" in field.name:
            edges += [int(world.frame.open_time_ms.iloc[-1]), int(world.frame.open_time_ms.iloc[-1]) + 3_600_000]
        return st.one_of(st.sampled_from(edges), st.integers(lo, hi))
    if t == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == FieldDescriptor.TYPE_STRING:
        return _strings(field, world)
    if t == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if t == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]),
                         st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"unhandled field type {t} of {field.full_name}")


def _sane_scalar(field: FieldDescriptor, world: World) -> st.SearchStrategy:
    """Plausible values only, so that whole requests get past validation (and jobs start, predictions are made)."""
    t = field.type
    if t in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.sampled_from([0.0, 0.02, 0.05, 0.5])
    if t in INT_RANGES:
        return st.sampled_from([0, 0, 1, 3, 5])
    if t == FieldDescriptor.TYPE_STRING:
        if "symbol" in field.name:
            return st.just(SYMBOL)
        if "timeframe" in field.name:
            return st.just(TF)
        if field.name.endswith("model_id"):
            return st.just(world.model_id)
        if field.name.endswith("job_id"):
            return st.just(world.job_id)
        return st.sampled_from(["", "fuzz"])
    if t == FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return _scalar(field, world)


def _is_repeated(field: FieldDescriptor) -> bool:
    repeated = getattr(field, "is_repeated", None)
    return bool(repeated) if repeated is not None else field.label == FieldDescriptor.LABEL_REPEATED


@st.composite
def message(draw, descriptor, world: World, depth: int = 0, sane: bool = False):
    """A message of `descriptor`, each field set or not, by type; unsettable values (protobuf refuses) skipped.
    `sane` draws plausible values only (see `_sane_scalar`)."""
    msg = GetMessageClass(descriptor)()
    scalar = _sane_scalar if sane else _scalar
    if descriptor.full_name == "google.protobuf.Timestamp":
        if sane:
            msg.seconds = draw(st.sampled_from([T_2018, T_2018 + 86_400 * 200, T_2018 + 86_400 * 400]))
            return msg
        value = draw(_timestamps())
        msg.seconds, msg.nanos = value["seconds"], value["nanos"]
        return msg
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for _ in range(draw(st.integers(0, 3))):
                key, value = draw(scalar(key_f, world)), draw(scalar(value_f, world))
                _try(lambda f=field, k=key, v=value: getattr(msg, f.name).__setitem__(k, v))
            continue
        if field.message_type is not None:
            if depth >= 3:
                continue
            if field.message_type.full_name == "mlsignal.v1.Candle" and _is_repeated(field) and draw(st.booleans()):
                start = draw(st.integers(0, len(world.frame) - 1))
                n = draw(st.integers(1, 400))
                real = candles_of(world.frame.iloc[start:start + n])
                if real and not sane and draw(st.booleans()):  # one absurd value inside otherwise real candles
                    victim = real[draw(st.integers(0, len(real) - 1))]
                    sub = draw(message(field.message_type, world, depth + 1))
                    victim.MergeFrom(sub)
                getattr(msg, field.name).extend(real)
                continue
            count = draw(st.integers(0, 4)) if _is_repeated(field) else 1
            for _ in range(count):
                sub = draw(message(field.message_type, world, depth + 1, sane))
                if _is_repeated(field):
                    getattr(msg, field.name).add().CopyFrom(sub)
                else:
                    getattr(msg, field.name).CopyFrom(sub)
            continue
        if _is_repeated(field):
            values = draw(st.lists(scalar(field, world), max_size=6))
            _try(lambda f=field, v=values: getattr(msg, f.name).extend(v))
        else:
            value = draw(scalar(field, world))
            _try(lambda f=field, v=value: setattr(msg, f.name, v))
    return msg


def _try(fn) -> None:
    try:
        fn()
    except (ValueError, TypeError, OverflowError):  # e.g. a string with lone surrogates, a float field overflow
        pass


# ----------------------------------------------------------------------------------------------------------------------
# calling


def _path(method) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _check(world: World, what: str, code: grpc.StatusCode, details: str | None, stream: bool) -> None:
    allowed = DOCUMENTED | (STREAM_ONLY if stream else set())
    assert code in allowed, f"{what}: {code.name}: {details}"
    assert not LEAKS.search(details or ""), f"{what}: {code.name} leaks: {details!r}"
    world.codes[code.name] += 1


def _call(world: World, server: str, method, payload: bytes, metadata=AUTH) -> list[bytes]:
    """One call with raw bytes in and out; checks the status; returns the response messages."""
    channel = world.channels[server]
    path = _path(method) if not isinstance(method, str) else method
    client_streaming = getattr(method, "client_streaming", False)
    server_streaming = getattr(method, "server_streaming", False)
    stream = client_streaming or server_streaming
    out: list[bytes] = []
    try:
        if client_streaming and server_streaming:
            call = channel.stream_stream(path)(iter([payload] * (1 + len(payload) % 3)), timeout=5,
                                               metadata=metadata)
            for response in call:
                out.append(response)
        elif server_streaming:
            call = channel.unary_stream(path)(payload, timeout=5, metadata=metadata)
            for response in call:
                out.append(response)
                call.cancel()  # a job may still run: one answer is enough
                break
        elif client_streaming:
            out.append(channel.stream_unary(path)(iter([payload]), timeout=10, metadata=metadata))
        else:
            out.append(channel.unary_unary(path)(payload, timeout=10, metadata=metadata))
        _check(world, path, C.OK, None, stream)
    except grpc.RpcError as err:
        _check(world, path, err.code(), err.details(), stream)
    return out


def _after(world: World, method, responses: list[bytes]) -> None:
    """Cancel any job a StartTraining started; count the candles an ImportCandles inserted; check errors answered
    inside a StreamPredict."""
    if method.name == "ImportCandles":
        world.imported += sum(training_pb2.ImportCandlesResponse.FromString(raw).inserted for raw in responses)
    if method.name == "StartTraining":
        for raw in responses:
            job = training_pb2.TrainingJob.FromString(raw)
            world.started_jobs.append(job.job_id)
            try:
                world.tstub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job.job_id), timeout=10,
                                              metadata=AUTH)
            except grpc.RpcError as err:
                assert err.code() == C.FAILED_PRECONDITION, err  # it already ended
    if method.name == "StreamPredict":
        for raw in responses:
            reply = inference_pb2.PredictResponse.FromString(raw)
            if reply.HasField("error"):
                code = next(c for c in C if c.value[0] == reply.error.code)
                _check(world, "StreamPredict message", code, reply.error.message, stream=False)


# ----------------------------------------------------------------------------------------------------------------------
# the tests


def test_every_rpc_has_a_generator():
    assert {m.name for _, m in METHODS} >= {"Predict", "StreamPredict", "GetModel", "StartTraining",
                                            "GetTrainingJob", "WatchTrainingJob", "CancelTrainingJob",
                                            "ListTrainingJobs", "ListModels"}


def test_fuzz_every_rpc_with_generated_messages(world):
    @st.composite
    def requests(draw):
        server, method = draw(st.sampled_from(METHODS))
        return server, method, draw(message(method.input_type, world, sane=draw(st.integers(0, 3)) == 0))

    @settings(max_examples=MESSAGE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(requests())
    def run(case):
        server, method, msg = case
        world.examples += 1
        _after(world, method, _call(world, server, method, msg.SerializeToString()))

    run()


def test_fuzz_every_method_path_with_garbage_bytes(world):
    paths = [(server, m) for server, m in METHODS] + [("inference", "/mlsignal.v1.InferenceService/NoSuchMethod"),
                                                      ("training", "/no.such.Service/Method")]

    @settings(max_examples=GARBAGE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(paths), st.one_of(st.binary(max_size=256),
                                            st.sampled_from([b"\xff" * 16, b"\x0a\xff\xff\xff\xff\x0f",
                                                             b"\x22\x80\x80\x80\x80\x10", b"\x08" * 64])),
           st.booleans())
    def run(target, payload, with_token):
        server, method = target
        world.examples += 1
        refused = world.codes[C.UNAUTHENTICATED.name]
        responses = _call(world, server, method, payload, metadata=AUTH if with_token else None)
        if not isinstance(method, str):
            _after(world, method, responses)
            if not with_token:  # authentication comes before decoding: garbage without the token tells nothing
                assert world.codes[C.UNAUTHENTICATED.name] == refused + 1, (method.name, payload)

    run()


def test_after_fuzzing_the_services_serve_and_the_stored_data_is_unchanged(world):
    for channel in world.channels.values():
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    for job_id in world.started_jobs:
        final = _wait_final(world.tstub, job_id)
        assert final.state in (training_pb2.JOB_STATE_CANCELLED, training_pb2.JOB_STATE_FAILED), final
    counts = world.row_counts()
    assert counts["candles"] == world.counts["candles"] + world.imported and counts["models"] == world.counts["models"]
    assert counts["training_jobs"] == world.counts["training_jobs"] + len(set(world.started_jobs))
    assert world.predict_reference() == world.reference_answer
    summary = ", ".join(f"{name} {n}" for name, n in world.codes.most_common())
    print(f"\nfuzz: {world.examples} examples over {len(METHODS)} RPCs, {len(set(world.started_jobs))} jobs started "
          f"and cancelled, {world.imported} candles imported; codes seen: {summary}")
    assert world.examples >= MESSAGE_EXAMPLES  # hypothesis ran them all
