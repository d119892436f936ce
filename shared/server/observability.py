"""Prometheus metrics, access logs and bearer-token checks for both gRPC servers.

One `ServerInterceptor` wraps every handler of a server:

- **auth**: with a token configured, every RPC except `grpc.health.v1` (health checks must work for orchestrators that
  hold no secret) needs the metadata ``authorization: Bearer <token>``; otherwise it ends UNAUTHENTICATED. Server
  reflection needs the token too. Tokens are compared with `hmac.compare_digest`.
- **metrics** (when `Metrics` is given): RPCs started and handled by method and status code, messages received and
  sent on streams, the handling time of each RPC, and for bidirectional streams the time of each message from its
  request arriving to its response leaving. The names follow the usual gRPC conventions (`grpc_server_handled_total`
  with `grpc_service`, `grpc_method`, `grpc_type`, `grpc_code`), so existing dashboards work.
- **access log**: one line per RPC (per stream, not per message) on the `mlsignal.access` logger with the fields
  `method`, `status`, `duration_ms`, and `model_id` / `job_id` when the request or response carries one. With
  MLSIGNAL_LOG_FORMAT=json each is a JSON object. Status details and message contents (candles) are never logged.
  Health checks are logged at DEBUG.

Each server process has its own `CollectorRegistry`, so two servers in one process never clash; the registry is
served over HTTP on MLSIGNAL_METRICS_PORT (0 disables metrics altogether).
"""

from __future__ import annotations

import hmac
import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

ACCESS_LOG = logging.getLogger("mlsignal.access")
log = logging.getLogger(__name__)

#: Services that answer without a token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
#: Services whose access-log lines are DEBUG rather than INFO (orchestrators poll them every few seconds).
QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                            "grpc.reflection.v1.ServerReflection"})
UNAUTHENTICATED_MESSAGE = "authorization: a valid 'Bearer <token>' is required (MLSIGNAL_AUTH_TOKEN)"

# Sub-millisecond Predict calls up to long training RPCs (streams end up in the top buckets).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
JOB_DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


# ----------------------------------------------------------------------------------------------------------------------
# metrics


class Metrics:
    """The metrics of one server process, in their own registry; `serve` exposes them over HTTP."""

    def __init__(self, service: str, version: str = ""):
        self.service = service
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started", "RPCs started on the server.", labels, registry=r)
        self.handled = Counter("grpc_server_handled", "RPCs completed on the server, by status code.",
                               (*labels, "grpc_code"), registry=r)
        self.received = Counter("grpc_server_msg_received", "Messages received on client-streaming RPCs.", labels,
                                registry=r)
        self.sent = Counter("grpc_server_msg_sent", "Messages sent on server-streaming RPCs.", labels, registry=r)
        self.handling = Histogram("grpc_server_handling_seconds",
                                  "Time from the start to the end of an RPC (the whole stream for streaming RPCs).",
                                  labels, buckets=LATENCY_BUCKETS, registry=r)
        self.stream_message = Histogram(
            "mlsignal_stream_message_seconds",
            "Bidirectional streams, per message: from its request arriving to its response being handed to gRPC.",
            ("grpc_service", "grpc_method"), buckets=LATENCY_BUCKETS, registry=r)
        Gauge("mlsignal_build_info", "Always 1; the labels name the service and the package version.",
              ("service", "version"), registry=r).labels(service, version).set(1)
        self._httpd = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def add_callback(self, fn: Callable[[], Iterable]) -> None:
        """Register `fn`, which yields metric families computed at scrape time."""
        self.registry.register(_Callback(fn))

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics on host:port in a background thread; returns the bound port."""
        self._httpd, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._httpd.server_address[1]
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _Callback:
    def __init__(self, fn):
        self._fn = fn

    def collect(self):
        yield from self._fn()


def inference_metrics(metrics: Metrics, loaded: Callable[[], Iterable[tuple[str, str, str, str, int]]]):
    """Inference metrics; returns the `on_predicted(model, n_candles)` hook for the servicer.

    `loaded()` yields (symbol, timeframe, model_id, role, created_at_ms) for every model in memory, role "serving"
    (the newest for its key) or "pinned" (requested by id).
    """
    candles = Counter("mlsignal_candles_predicted", "Candles predicted (Predict and StreamPredict).",
                      ("symbol", "timeframe"), registry=metrics.registry)
    children: dict[tuple[str, str], object] = {}

    def collect():
        models = GaugeMetricFamily("mlsignal_models_loaded", "Models in memory (1 per model).",
                                   labels=("symbol", "timeframe", "model_id", "role"))
        created = GaugeMetricFamily("mlsignal_model_created_timestamp_seconds",
                                    "When each model in memory was registered (Unix time).",
                                    labels=("symbol", "timeframe", "model_id"))
        seen = set()
        for symbol, timeframe, model_id, role, created_ms in loaded():
            models.add_metric((symbol, timeframe, model_id, role), 1)
            if model_id not in seen:
                seen.add(model_id)
                created.add_metric((symbol, timeframe, model_id), created_ms / 1000.0)
        yield models
        yield created

    metrics.add_callback(collect)

    def on_predicted(model, n: int) -> None:
        rec = model.record
        key = (rec.symbol, rec.timeframe)
        child = children.get(key)
        if child is None:
            child = children.setdefault(key, candles.labels(*key))
        child.inc(n)

    return on_predicted


def training_metrics(metrics: Metrics, job_counts: Callable[[], dict[str, int]]):
    """Training metrics; returns the `on_job_finished(job)` hook for the scheduler.

    `job_counts()` reads the number of jobs per state from the database at scrape time.
    """
    durations = Histogram("mlsignal_training_job_duration_seconds",
                          "Run time of finished training jobs, from start to end, by final state.",
                          ("state",), buckets=JOB_DURATION_BUCKETS, registry=metrics.registry)
    finished = Counter("mlsignal_training_jobs_finished", "Training jobs finished by this process, by final state.",
                       ("state",), registry=metrics.registry)

    def collect():
        jobs = GaugeMetricFamily("mlsignal_training_jobs", "Training jobs in the database, by state (read on scrape).",
                                 labels=("state",))
        up = GaugeMetricFamily("mlsignal_database_up", "1 when the last scrape could read the database, else 0.")
        try:
            counts = job_counts()
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot count training jobs: %s", one_line(exc))
            up.add_metric((), 0)
        else:
            up.add_metric((), 1)
            for state in JOB_STATES:
                jobs.add_metric((state,), counts.get(state, 0))
            yield jobs
        yield up

    metrics.add_callback(collect)

    def on_job_finished(job) -> None:
        finished.labels(job.state).inc()
        if job.started_at_ms is not None and job.finished_at_ms is not None:
            durations.labels(job.state).observe(max(0.0, (job.finished_at_ms - job.started_at_ms) / 1000.0))

    return on_job_finished


# ----------------------------------------------------------------------------------------------------------------------
# the interceptor


def _grpc_type(handler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _Method:
    """Everything about one RPC method that does not change between calls, resolved once."""

    __slots__ = ("full", "service", "name", "kind", "open", "level", "started", "handling", "received", "sent",
                 "stream_message", "_handled", "_metrics")

    def __init__(self, full: str, handler, metrics: Metrics | None):
        self.full = full
        service, _, name = full.lstrip("/").rpartition("/")
        self.service, self.name = service, name
        self.kind = _grpc_type(handler)
        self.open = service in OPEN_SERVICES
        self.level = logging.DEBUG if service in QUIET_SERVICES else logging.INFO
        self._metrics = metrics
        self._handled: dict = {}
        if metrics is not None:
            labels = (self.kind, service, name)
            self.started = metrics.started.labels(*labels)
            self.handling = metrics.handling.labels(*labels)
            self.received = metrics.received.labels(*labels)
            self.sent = metrics.sent.labels(*labels)
            self.stream_message = metrics.stream_message.labels(service, name)
        else:
            self.started = self.handling = self.received = self.sent = self.stream_message = None

    def handled(self, code: grpc.StatusCode):
        child = self._handled.get(code)
        if child is None:
            child = self._handled.setdefault(
                code, self._metrics.handled.labels(self.kind, self.service, self.name, code.name))
        return child


class _Call:
    __slots__ = ("start", "n_in", "n_out", "arrived", "request", "response")

    def __init__(self):
        self.start = perf_counter()
        self.n_in = 0
        self.n_out = 0
        self.arrived: float | None = None
        self.request = None
        self.response = None


def _code_after_error(context, exc: BaseException) -> grpc.StatusCode:
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code
    if isinstance(exc, GeneratorExit) or not context.is_active():
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _ids(*messages) -> dict[str, str]:
    out: dict[str, str] = {}
    for msg in messages:
        if msg is None:
            continue
        for key in ("job_id", "model_id"):
            if key not in out:
                value = getattr(msg, key, None)
                if isinstance(value, str) and value:
                    out[key] = value
    return out


def bearer_token_ok(metadata, token: bytes) -> bool:
    """Whether the call metadata carries ``authorization: Bearer <token>`` (constant-time comparison)."""
    for key, value in metadata or ():
        if key != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode("latin-1", "replace"), token):
            return True
    return False


def _deny_unary(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


def _deny_stream(request, context):
    context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover - abort raises


class ServerInterceptor(grpc.ServerInterceptor):
    """Auth, metrics and access logging for every RPC of one server (see the module docstring)."""

    def __init__(self, metrics: Metrics | None = None, token: str | None = None,
                 access_log: logging.Logger = ACCESS_LOG):
        self._metrics = metrics
        self._token = token.encode("ascii") if token else None
        self._log = access_log
        self._methods: dict[str, _Method] = {}

    def _method(self, full: str, handler) -> _Method:
        m = self._methods.get(full)
        if m is None:
            m = self._methods.setdefault(full, _Method(full, handler, self._metrics))
        return m

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        m = self._method(handler_call_details.method, handler)
        if self._token is not None and not m.open and not bearer_token_ok(
                handler_call_details.invocation_metadata, self._token):
            return self._wrap(_denied(handler), m)
        return self._wrap(handler, m)

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def _begin(self, m: _Method) -> _Call:
        if m.started is not None:
            m.started.inc()
        return _Call()

    def _finish(self, m: _Method, call: _Call, code: grpc.StatusCode, context) -> None:
        elapsed = perf_counter() - call.start
        if self._metrics is not None:
            m.handled(code).inc()
            m.handling.observe(elapsed)
        level = m.level
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
            level = logging.WARNING
        if not self._log.isEnabledFor(level):
            return
        extra = {"method": m.full, "status": code.name, "duration_ms": round(elapsed * 1000.0, 3)}
        extra.update(_ids(call.response, call.request))
        if m.kind != "unary":
            extra["messages_in"], extra["messages_out"] = call.n_in, call.n_out
        try:
            extra["peer"] = context.peer()
        except Exception:  # pragma: no cover - the peer is informative only
            pass
        ids = "".join(f" {k}={extra[k]}" for k in ("job_id", "model_id") if k in extra)
        self._log.log(level, "rpc %s %s %.1fms%s", m.full, code.name, elapsed * 1000.0, ids, extra=extra)

    def _requests(self, m: _Method, call: _Call, iterator: Iterator) -> Iterator:
        counting = self._metrics is not None
        for request in iterator:
            call.n_in += 1
            call.arrived = perf_counter()
            if call.request is None:
                call.request = request
            if counting:
                m.received.inc()
            yield request

    # -- wrappers ------------------------------------------------------------------------------------------------
    def _wrap(self, handler, m: _Method):
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, m), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, m, streaming_request=True),
                handler.request_deserializer, handler.response_serializer)
        behavior = handler.unary_stream or handler.stream_stream
        if getattr(behavior, "experimental_non_blocking", False):
            # The health service's Watch answers through callbacks; wrapping it would pin a thread per watcher.
            if m.started is not None:
                m.started.inc()
            return handler
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(handler.unary_stream, m), handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(handler.stream_stream, m, streaming_request=True),
            handler.request_deserializer, handler.response_serializer)

    def _unary(self, behavior, m: _Method, streaming_request: bool = False):
        def wrapper(request, context):
            call = self._begin(m)
            if streaming_request:
                request = self._requests(m, call, request)
            else:
                call.request = request
            code = grpc.StatusCode.OK
            try:
                call.response = behavior(request, context)
                code = context.code() or grpc.StatusCode.OK
                return call.response
            except BaseException as exc:
                code = _code_after_error(context, exc)
                raise
            finally:
                self._finish(m, call, code, context)

        return wrapper

    def _streaming(self, behavior, m: _Method, streaming_request: bool = False):
        metrics = self._metrics

        def wrapper(request, context):
            call = self._begin(m)
            if streaming_request:
                request = self._requests(m, call, request)
            else:
                call.request = request
            code = grpc.StatusCode.OK
            responses = behavior(request, context)
            try:
                for response in responses:
                    call.n_out += 1
                    call.response = response
                    if metrics is not None:
                        m.sent.inc()
                        if call.arrived is not None:
                            m.stream_message.observe(perf_counter() - call.arrived)
                    call.arrived = None
                    yield response
                code = context.code() or grpc.StatusCode.OK
            except BaseException as exc:
                code = _code_after_error(context, exc)
                raise
            finally:
                close = getattr(responses, "close", None)
                if close is not None:
                    close()
                self._finish(m, call, code, context)

        return wrapper


def _denied(handler):
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_deny_unary, handler.request_deserializer,
                                                   handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, handler.request_deserializer,
                                                    handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, handler.request_deserializer,
                                                    handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, handler.request_deserializer,
                                                 handler.response_serializer)


def one_line(exc: BaseException) -> str:
    """An exception as one line: the DB driver's own message when there is one, whitespace collapsed."""
    inner = getattr(exc, "orig", None) or exc
    text = " ".join(str(inner).split())
    return text or type(inner).__name__
