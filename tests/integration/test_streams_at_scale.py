"""Many open streams on one server: health and unary calls stay prompt, the stream past MLSIGNAL_MAX_STREAMS is
refused at once, stream errors are answers rather than the end of the stream, and errors carry field violations.

Real servers on 127.0.0.1:0 over one SQLite database holding a tiny model (5 trees on 3,000 candles). Deadlines are
call deadlines, generous for a loaded machine; nothing here measures time.
"""

from __future__ import annotations

import contextlib
import os
import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from test_inference_service import candles_of

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from service_fixtures import load_market, wait_job
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
SYMBOL, TF = "BTC/USD", "1h"
N_CANDLES = 3000
OPEN = 200  # streams held open while other calls must stay prompt
LIMIT = 210  # MLSIGNAL_MAX_STREAMS of the servers here
PROMPT = 1.0  # the deadline of a call that must not wait behind the open streams
LONG = common_pb2.ModelParams(n_estimators=4000)


class Feed:
    """A request iterator the test feeds one message at a time."""

    def __init__(self) -> None:
        self.q: queue.Queue = queue.Queue()

    def send(self, msg) -> None:
        self.q.put(msg)

    def close(self) -> None:
        self.q.put(None)

    def __iter__(self) -> Iterator:
        while (msg := self.q.get()) is not None:
            yield msg


class Stream:
    """One open StreamPredict call."""

    def __init__(self, stub, timeout: float = 300) -> None:
        self.feed = Feed()
        self.responses = stub.StreamPredict(iter(self.feed), timeout=timeout)

    def ask(self, request) -> inference_pb2.PredictResponse:
        self.feed.send(request)
        return next(self.responses)

    def close(self) -> None:
        self.feed.close()
        self.responses.cancel()


class Servers:
    """Training and inference with MLSIGNAL_MAX_STREAMS=LIMIT over one database, with one tiny model."""

    def __init__(self, root: Path, frame) -> None:
        from inference_service.server import start as start_inference
        from training_service.server import start as start_training

        self.url = f"sqlite:///{root}/mlsignal.db"
        self.frame = frame.iloc[:N_CANDLES].reset_index(drop=True)
        load_market(self.url, self.frame)
        self.settings = Settings(database_url=self.url, model_dir=root / "models", model_poll_seconds=0.2,
                                 max_streams=LIMIT, training_workers=1)
        self.training = start_training(self.settings, "127.0.0.1:0")
        self.inference = start_inference(self.settings, "127.0.0.1:0")
        self.train_channel = grpc.insecure_channel(f"127.0.0.1:{self.training.port}")
        self.infer_channel = grpc.insecure_channel(f"127.0.0.1:{self.inference.port}")
        self.train_stub = training_pb2_grpc.TrainingServiceStub(self.train_channel)
        self.infer_stub = inference_pb2_grpc.InferenceServiceStub(self.infer_channel)
        job = self.train_stub.StartTraining(training_pb2.StartTrainingRequest(
            symbol=SYMBOL, timeframe=TF, params=common_pb2.ModelParams(n_estimators=5)), timeout=30)
        done = wait_job(self.train_stub, job.job_id, timeout=120)
        assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
        self.model_id = done.model_id

    def close(self) -> None:
        self.train_channel.close()
        self.infer_channel.close()
        self.inference.stop(0.5)
        self.training.stop(0.5)

    def candles(self, start: int, n: int = 1) -> list[common_pb2.Candle]:
        return candles_of(self.frame.iloc[start:start + n])

    def first_message(self, start: int) -> inference_pb2.PredictRequest:
        return inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=self.candles(start))


@pytest.fixture(scope="module")
def servers(tmp_path_factory, sample_frame):
    s = Servers(tmp_path_factory.mktemp("streams"), sample_frame)
    yield s
    s.close()


def _healthy(channel: grpc.Channel, service: str) -> None:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=PROMPT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value


def _reopen_all(open_one: Callable[[int], object], close: Callable[[object], None], timeout: float = 60) -> list:
    """Open LIMIT streams (`open_one(i)` returns one that has answered, or raises) right after others were closed:
    the server frees a closed stream's slot when it has seen the cancellation, so a refusal (RESOURCE_EXHAUSTED) is
    retried until `timeout`. A slot that is never freed fails here. Returns the open streams."""
    deadline = time.monotonic() + timeout
    opened: list = []
    try:
        for i in range(LIMIT):
            while True:
                try:
                    opened.append(open_one(i))
                    break
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
                    assert time.monotonic() < deadline, (
                        f"only {len(opened)} of MLSIGNAL_MAX_STREAMS={LIMIT} streams open again: "
                        f"{LIMIT - len(opened)} slots of closed streams were never freed")
                    time.sleep(0.05)
    except BaseException:
        for stream in opened:
            close(stream)
        raise
    return opened


def _violations(err: grpc.RpcError) -> list[error_details_pb2.BadRequest.FieldViolation]:
    status = rpc_status.from_call(err)
    assert status is not None, "the status carries no google.rpc.Status details"
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out.extend(bad.field_violations)
    return out


# ----------------------------------------------------------------------------------------------------------------------
# open streams


def test_open_streams_leave_health_and_predict_prompt_and_the_limit_refuses_at_once(servers):
    stub = servers.infer_stub
    streams = [Stream(stub) for _ in range(OPEN)]
    try:
        for i, stream in enumerate(streams):
            reply = stream.ask(servers.first_message(i))
            assert reply.model_id == servers.model_id and len(reply.predictions) == 1, reply.error

        # every stream is open and idle: health and a unary Predict still answer at once
        _healthy(servers.infer_channel, "")
        _healthy(servers.infer_channel, "mlsignal.v1.InferenceService")
        request = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=servers.candles(0, 200))
        assert len(stub.Predict(request, timeout=PROMPT).predictions) == 200

        # up to the limit, streams are taken; the next one is refused at once, and it says why
        streams += [Stream(stub) for _ in range(LIMIT - OPEN)]
        for i, stream in enumerate(streams[OPEN:]):
            assert stream.ask(servers.first_message(OPEN + i)).model_id == servers.model_id
        extra = Stream(stub, timeout=2)
        err = _refused(lambda: extra.ask(servers.first_message(0)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "MLSIGNAL_MAX_STREAMS" in err.details()
        extra.close()

        # the open streams still work: each answers its next candle
        for i, stream in enumerate(streams[:: 20]):
            reply = stream.ask(inference_pb2.PredictRequest(candles=servers.candles(20 * i + 1)))
            assert len(reply.predictions) == 1 and not reply.HasField("error")
        _healthy(servers.infer_channel, "")
    finally:
        for stream in streams:
            stream.close()

    # closed streams free every slot: all MLSIGNAL_MAX_STREAMS streams open again, and the next one is refused
    def open_one(i: int) -> Stream:
        stream = Stream(stub, timeout=120)
        try:
            assert stream.ask(servers.first_message(i)).model_id == servers.model_id
        except BaseException:
            stream.close()
            raise
        return stream

    reopened = _reopen_all(open_one, Stream.close)
    try:
        extra = Stream(stub, timeout=2)
        err = _refused(lambda: extra.ask(servers.first_message(0)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        extra.close()
    finally:
        for stream in reopened:
            stream.close()


def test_open_watches_leave_health_and_unary_calls_prompt_and_the_limit_refuses_at_once(servers):
    stub = servers.train_stub
    request = training_pb2.StartTrainingRequest(symbol=SYMBOL, timeframe=TF, params=LONG)
    running = stub.StartTraining(request, timeout=30)
    queued = stub.StartTraining(request, timeout=30)  # waits behind `running` (one worker)
    watches = []
    try:
        get = training_pb2.GetTrainingJobRequest(job_id=queued.job_id)
        for _ in range(OPEN):
            watch = stub.WatchTrainingJob(get, timeout=300)
            assert next(watch).job_id == queued.job_id
            watches.append(watch)

        _healthy(servers.train_channel, "")
        _healthy(servers.train_channel, "mlsignal.v1.TrainingService")
        listed = stub.ListTrainingJobs(training_pb2.ListTrainingJobsRequest(limit=5), timeout=PROMPT)
        assert queued.job_id in {j.job_id for j in listed.jobs}
        assert stub.GetTrainingJob(get, timeout=PROMPT).job_id == queued.job_id

        for _ in range(LIMIT - OPEN):
            watch = stub.WatchTrainingJob(get, timeout=300)
            assert next(watch).job_id == queued.job_id
            watches.append(watch)
        err = _refused(lambda: next(stub.WatchTrainingJob(get, timeout=2)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "MLSIGNAL_MAX_STREAMS" in err.details()

        # the open watches still follow the job: cancelling it ends every one of them with the final state
        cancelled = stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=queued.job_id), timeout=10)
        assert cancelled.state == training_pb2.JOB_STATE_CANCELLED
        for watch in watches[:: 10]:
            assert list(watch)[-1].state == training_pb2.JOB_STATE_CANCELLED
    finally:
        for watch in watches:
            watch.cancel()
        for job in (queued, running):
            with contextlib.suppress(grpc.RpcError):  # already final
                stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job.job_id), timeout=10)

    # closed watches free every slot: MLSIGNAL_MAX_STREAMS watches of a new queued job open again, the next is refused
    running = stub.StartTraining(request, timeout=30)
    queued = stub.StartTraining(request, timeout=30)
    get = training_pb2.GetTrainingJobRequest(job_id=queued.job_id)

    def open_one(i: int):
        watch = stub.WatchTrainingJob(get, timeout=120)
        try:
            assert next(watch).job_id == queued.job_id
        except BaseException:
            watch.cancel()
            raise
        return watch

    watches = []
    try:
        watches = _reopen_all(open_one, lambda watch: watch.cancel())
        err = _refused(lambda: next(stub.WatchTrainingJob(get, timeout=2)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
    finally:
        for watch in watches:
            watch.cancel()
        for job in (queued, running):
            with contextlib.suppress(grpc.RpcError):
                stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=job.job_id), timeout=10)


# ----------------------------------------------------------------------------------------------------------------------
# errors


def test_unary_invalid_argument_carries_a_field_violation(servers):
    candles = servers.candles(0, 10)
    candles[3].close = float("nan")
    err = _refused(lambda: servers.infer_stub.Predict(
        inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=candles), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in _violations(err)] == ["candles[3].close"]

    err = _refused(lambda: servers.train_stub.StartTraining(
        training_pb2.StartTrainingRequest(symbol=SYMBOL, timeframe="7m"), timeout=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in _violations(err)] == ["timeframe"]


def test_a_bad_stream_message_is_answered_with_an_error_and_the_stream_goes_on(servers):
    stream = Stream(servers.infer_stub, timeout=60)
    try:
        first = stream.ask(inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, candles=servers.candles(0, 100)))
        assert len(first.predictions) == 100 and not first.HasField("error")

        bad = servers.candles(100, 2)
        bad[1].high = bad[1].low / 2
        reply = stream.ask(inference_pb2.PredictRequest(candles=bad))
        assert reply.HasField("error") and not reply.predictions
        assert reply.error.code == code_pb2.INVALID_ARGUMENT and "candles[1].high" in reply.error.message
        violations = []
        for detail in reply.error.details:
            br = error_details_pb2.BadRequest()
            assert detail.Unpack(br)
            violations.extend(v.field for v in br.field_violations)
        assert violations == ["candles[1].high"]

        # the stream goes on as if the bad message had not been sent: the same candles, corrected, are accepted
        good = stream.ask(inference_pb2.PredictRequest(candles=servers.candles(100, 2)))
        assert len(good.predictions) == 2 and not good.HasField("error")
        assert stream.ask(inference_pb2.PredictRequest(candles=servers.candles(102))).predictions[0].open_time_ms == \
            int(servers.frame.open_time_ms[102])
    finally:
        stream.close()


def test_an_unexpected_error_is_internal_with_an_error_id_and_no_traceback(caplog):
    from shared.server.builder import start_server
    from shared.server.status import maps_errors

    class Broken(inference_pb2_grpc.InferenceServiceServicer):
        @maps_errors
        async def GetModel(self, request, context):
            raise ZeroDivisionError("a bug")

    handle = start_server("127.0.0.1:0", lambda s: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
        Broken(), s), ["mlsignal.v1.InferenceService"], 4 << 20)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as channel:
            err = _refused(lambda: inference_pb2_grpc.InferenceServiceStub(channel).GetModel(
                inference_pb2.GetModelRequest(symbol=SYMBOL, timeframe=TF), timeout=10))
    finally:
        handle.stop(0)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "error id" in err.details() and "ZeroDivisionError" not in err.details()
    error_id = err.details().split("error id ")[1].split(";")[0]
    logged = [r for r in caplog.records if r.name == "mlsignal.errors"]
    assert logged and error_id in logged[0].getMessage() and logged[0].exc_info is not None


# ----------------------------------------------------------------------------------------------------------------------
# the listen address


def test_a_taken_port_fails_to_bind_with_the_address_named(servers):
    from inference_service.server import start as start_inference

    taken = f"127.0.0.1:{servers.inference.port}"
    with pytest.raises(OSError, match=f"cannot listen on {taken}"):
        start_inference(replace(servers.settings, metrics_port=0), taken)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSIGNAL_")}
    env.update(MLSIGNAL_DATABASE_URL=servers.url, MLSIGNAL_MODEL_DIR=str(servers.settings.model_dir),
               MLSIGNAL_INFERENCE_ADDR=taken)
    proc = subprocess.run([sys.executable, "-m", "inference_service.server"], env=env, cwd=REPO, text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == (f"mlsignal-inference: cannot listen on {taken}: the address is in use or not "
                                   "available here (is another server running on it?)")
    assert "listening" not in proc.stdout
    # the first server is undisturbed
    _healthy(servers.infer_channel, "")
