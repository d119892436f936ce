"""What both gRPC servers share: domain errors to status codes, health, reflection, TLS, interceptors (auth, metrics,
access logs), a clean SIGTERM, and the start-up of the server processes."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
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
    """A started server with its health servicer; `stop` flips health to NOT_SERVING before draining calls.

    `metrics` is the server's `shared.server.observability.Metrics` when MLSIGNAL_METRICS_PORT is set (its `port` is the
    bound metrics port), else None.
    """

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, port: int, services: list[str],
                 metrics=None):
        self.server = server
        self.health = health_servicer
        self.port = port
        self.services = services
        self.metrics = metrics
        self._on_stop: list = []
        self._on_stopped: list = []
        self._stopped = False

    def on_stop(self, fn) -> None:
        """Call fn(grace) right after the server stops taking new calls (running calls still drain meanwhile)."""
        self._on_stop.append(fn)

    def on_stopped(self, fn) -> None:
        """Call fn() once every call has finished or was cancelled at the end of the grace period."""
        self._on_stopped.append(fn)

    def stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, and it stays so
        event = self.server.stop(grace)  # new calls are refused from here on; running calls get `grace` seconds
        for fn in self._on_stop:
            fn(grace)
        event.wait(grace + 1)
        for fn in self._on_stopped:
            fn()

    def wait(self) -> None:
        self.server.wait_for_termination()


class RunningServer:
    """A started service: its server handle and database engine; `stop` drains the server, then closes the pool."""

    def __init__(self, handle: ServerHandle, engine):
        self.handle = handle
        self.engine = engine

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self, grace: float = 1.0) -> None:
        self.handle.stop(grace)
        self.engine.dispose()


def server_credentials(tls_pair: tuple[bytes, bytes] | None) -> grpc.ServerCredentials | None:
    """TLS credentials from (certificate chain PEM, private key PEM), or None for plaintext."""
    if tls_pair is None:
        return None
    cert, key = tls_pair
    return grpc.ssl_server_credentials([(key, cert)])


def start_server(address: str, add_servicers, service_names: list[str], max_message_bytes: int,
                 max_workers: int = 32, *, interceptors: Sequence[grpc.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None, metrics=None) -> ServerHandle:
    """Build, bind and start a server. `add_servicers(server)` registers the service implementations.

    With `credentials` the port speaks TLS only. `interceptors` wrap every handler, health and reflection included.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=message_size_options(max_message_bytes),
        interceptors=list(interceptors),
    )
    add_servicers(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc raises RuntimeError for an address it cannot bind
        raise OSError(f"cannot listen on {address}: {exc}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    for name in ["", *service_names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return ServerHandle(server, health_servicer, port, service_names, metrics)


def listen_host(address: str) -> str:
    """The host part of a gRPC listen address (`0.0.0.0:50051`, `[::]:50051`); metrics listen on the same host."""
    if address.startswith("unix:"):
        return "127.0.0.1"
    host = address.rpartition(":")[0].strip("[]")
    return host or "0.0.0.0"


def observability(settings, service: str, address: str):
    """(Metrics or None, interceptors) for a server: metrics when MLSIGNAL_METRICS_PORT is set, the bearer-token check
    when MLSIGNAL_AUTH_TOKEN is set, and the access log always. The metrics endpoint is served at once."""
    from importlib.metadata import PackageNotFoundError, version

    from shared.server.observability import Metrics, ServerInterceptor

    metrics = None
    if settings.metrics_port:
        try:
            v = version("mlsignal")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
            v = ""
        metrics = Metrics(service, v)
        try:
            metrics.serve(listen_host(address), settings.metrics_port)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on port {settings.metrics_port}: {exc.strerror or exc}") from None
    return metrics, [ServerInterceptor(metrics, settings.auth_token)]


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the access-log fields when present, and exc."""

    FIELDS = ("method", "status", "duration_ms", "model_id", "job_id", "messages_in", "messages_out", "peer")

    def format(self, record: logging.LogRecord) -> str:
        import json
        import time

        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in self.FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


# ----------------------------------------------------------------------------------------------------------------------
# the server processes


class StartupError(Exception):
    """A server cannot start for a reason the operator must fix; the message is one line."""


def _database_label(url: str) -> str:
    import sqlalchemy as sa

    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "MLSIGNAL_DATABASE_URL"


def check_database(url: str) -> None:
    """Connect once and run SELECT 1; StartupError (one line, password hidden) when the database cannot be used."""
    import sqlalchemy as sa

    from shared.store.db import make_engine
    from shared.server.observability import one_line

    try:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        raise StartupError(f"cannot use the database {_database_label(url)}: {one_line(exc)}") from None


def server_main(prog: str, start: Callable, describe: Callable[[object, object], str]) -> int:
    """The body of `mlsignal-training` / `mlsignal-inference`: read settings, set up logging, check the database,
    start, print `<prog> listening on port N`, serve until SIGTERM/SIGINT and drain. Start-up failures the operator
    must fix (configuration, database, address in use, unreadable TLS files) print one line on stderr and exit 2
    (configuration) or 1 (anything else), without a traceback."""
    import sqlalchemy as sa
    from alembic.util.exc import CommandError

    from shared.server.observability import one_line
    from shared.settings import Settings

    try:
        settings = Settings.from_env()
        settings.server_tls_pair()  # the PEM files are readable
    except ValueError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        check_database(settings.database_url)
        running = start(settings)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (sa.exc.SQLAlchemyError, CommandError) as exc:
        print(f"{prog}: cannot use the database {_database_label(settings.database_url)}: {one_line(exc)}",
              file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 1
    logging.getLogger(prog.replace("-", ".")).info("%s", describe(settings, running))
    print(f"{prog} listening on port {running.port}", flush=True)
    if running.handle.metrics is not None:
        print(f"{prog} metrics on port {running.handle.metrics.port}", flush=True)
    run_until_signalled(running.handle, settings.grace_seconds)
    running.engine.dispose()
    return 0
