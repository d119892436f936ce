"""What both gRPC servers share: domain errors to status codes, health, reflection, and a clean SIGTERM."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared import errors

log = logging.getLogger(__name__)

STATUS_OF = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    import sqlalchemy as sa

    for cls, code in STATUS_OF.items():
        if isinstance(exc, cls):
            return code
    if isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return grpc.StatusCode.UNAVAILABLE
    return None


def _abort(context, exc: BaseException):
    code = status_for(exc)
    if code is None:
        raise exc
    message = str(exc)
    if code == grpc.StatusCode.UNAVAILABLE and not isinstance(exc, errors.MlsignalError):
        message = f"the database is unavailable: {type(exc).__name__}"
    context.abort(code, message)


def maps_errors(method):
    """Decorate a servicer method (unary or streaming) so domain errors become their gRPC status codes."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self, request, context):
            try:
                yield from method(self, request, context)
            except errors.MlsignalError as exc:
                _abort(context, exc)
            except Exception as exc:
                if status_for(exc) is None:
                    raise
                _abort(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except Exception as exc:
            if status_for(exc) is None:
                raise
            _abort(context, exc)

    return wrapper


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


class ServerHandle:
    """A started server with its health servicer; `stop` flips health to NOT_SERVING before draining calls."""

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, port: int, services: list[str]):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.services = services
        self._on_stop: list = []

    def on_stop(self, fn) -> None:
        self._on_stop.append(fn)

    def stop(self, grace: float) -> None:
        for name in ["", *self.services]:
            self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        event = self.server.stop(grace)
        for fn in self._on_stop:
            fn(grace)
        event.wait(grace + 1)

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_server(address: str, add_servicers, service_names: list[str], max_message_bytes: int,
                 max_workers: int = 32) -> ServerHandle:
    """Build, bind and start a server. `add_servicers(server)` registers the service implementations."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=message_size_options(max_message_bytes),
    )
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServerHandle(server, health_servicer, port, service_names)


def run_until_signalled(handle: ServerHandle, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    done = threading.Event()

    def _handler(signum, _frame):
        log.info("received signal %d; shutting down (grace %.1fs)", signum, grace)
        done.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    done.wait()
    handle.stop(grace)


def configure_logging(level: str, fmt: str) -> None:
    import json
    import time

    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            out = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
            }
            for key in ("method", "status", "duration_ms", "model_id", "job_id"):
                if hasattr(record, key):
                    out[key] = getattr(record, key)
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            return json.dumps(out)

    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
