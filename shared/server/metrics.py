"""Prometheus metrics of one server process: RPC counters and latencies, and each service's own gauges and counters.

Each server process has its own `CollectorRegistry`, so two servers in one process never clash; the registry is
served over HTTP on MLSIGNAL_METRICS_HOST:MLSIGNAL_METRICS_PORT (loopback by default; port 0 disables metrics
altogether). With a bearer token (MLSIGNAL_AUTH_TOKEN) a scrape must send ``Authorization: Bearer <token>`` or is
answered 401; with the server's TLS certificate (MLSIGNAL_TLS_CERT/KEY) the endpoint speaks HTTPS. The RPC metrics
follow the usual gRPC names (`grpc_server_handled_total` with `grpc_service`, `grpc_method`, `grpc_type`,
`grpc_code`), so existing dashboards work; `shared.server.interceptors` records them.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from shared.errors import one_line
from shared.server.auth import bearer_token_ok

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0, 30.0, 60.0, 300.0)
JOB_DURATION_BUCKETS = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
JOB_STATES = ("QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")


class Metrics:
    """The metrics of one server process, in their own registry; `serve` exposes them over HTTP."""

    def __init__(self, service: str, version: str = "") -> None:
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
        self._httpd: Any = None  # the WSGI server of `serve`
        self._thread: threading.Thread | None = None
        self.port = 0
        self.address: tuple[str, int] | None = None  # the (host, port) the endpoint is bound to, once serving

    def add_callback(self, fn: Callable[[], Iterable[Metric]]) -> None:
        """Register `fn`, which yields metric families computed at scrape time."""
        self.registry.register(_Callback(fn))

    def serve(self, host: str, port: int, *, token: str | None = None,
              tls_files: tuple[Path, Path] | None = None) -> int:
        """Serve /metrics on host:port in a background thread; returns the bound port.

        With `token` every request needs ``Authorization: Bearer <token>`` (else 401). With `tls_files`
        (certificate chain, private key: PEM files) the endpoint speaks HTTPS only."""
        app = make_wsgi_app(self.registry)
        if token is not None:
            app = bearer_protected(app, token)
        family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                       flags=socket.AI_PASSIVE)[0]
        server_class = type("MetricsServer", (ThreadingWSGIServer,), {"address_family": family})
        httpd: Any = make_server(str(sockaddr[0]), port, app, server_class, handler_class=_QuietHandler)
        if tls_files is not None:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                context.load_cert_chain(certfile=str(tls_files[0]), keyfile=str(tls_files[1]))
                httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
            except BaseException:
                httpd.server_close()
                raise
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.address = (str(httpd.server_address[0]), int(httpd.server_address[1]))
        self.port = self.address[1]
        return self.port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _QuietHandler(WSGIRequestHandler):
    """Request handler that writes no line per scrape to stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


#: The answer to a scrape without the bearer token.
UNAUTHORIZED_BODY = b"authorization: a valid 'Bearer <token>' is required (MLSIGNAL_AUTH_TOKEN)\n"


def bearer_protected(app: Callable[..., Any], token: str) -> Callable[..., Any]:
    """The WSGI `app` behind a bearer-token check: a request without ``Authorization: Bearer <token>`` is answered
    401 (the comparison takes constant time; see `shared.server.auth.bearer_token_ok`)."""
    expected = token.encode("ascii")

    def protected(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION", "")
        if bearer_token_ok([("authorization", header)], expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("Content-Length", str(len(UNAUTHORIZED_BODY))),
                                            ("WWW-Authenticate", 'Bearer realm="mlsignal metrics"')])
        return [UNAUTHORIZED_BODY]

    return protected


class _Callback(Collector):
    """A collector whose metric families are computed by a function at scrape time."""

    def __init__(self, fn: Callable[[], Iterable[Metric]]) -> None:
        self._fn = fn

    def collect(self) -> Iterator[Metric]:
        yield from self._fn()


def inference_metrics(metrics: Metrics,
                      loaded: Callable[[], Iterable[tuple[str, str, str, str, int]]]) -> Callable[[Any, int], None]:
    """Inference metrics; returns the `on_predicted(model, n_candles)` hook for the servicer.

    `loaded()` yields (symbol, timeframe, model_id, role, created_at_ms) for every model in memory, role "serving"
    (the newest for its key) or "pinned" (requested by id).
    """
    candles = Counter("mlsignal_candles_predicted", "Candles predicted (Predict and StreamPredict).",
                      ("symbol", "timeframe"), registry=metrics.registry)
    children: dict[tuple[str, str], Any] = {}

    def collect() -> Iterator[Metric]:
        models = GaugeMetricFamily("mlsignal_models_loaded", "Models in memory (1 per model).",
                                   labels=("symbol", "timeframe", "model_id", "role"))
        created = GaugeMetricFamily("mlsignal_model_created_timestamp_seconds",
                                    "When each model in memory was registered (Unix time).",
                                    labels=("symbol", "timeframe", "model_id"))
        seen: set[str] = set()
        for symbol, timeframe, model_id, role, created_ms in loaded():
            models.add_metric((symbol, timeframe, model_id, role), 1)
            if model_id not in seen:
                seen.add(model_id)
                created.add_metric((symbol, timeframe, model_id), created_ms / 1000.0)
        yield models
        yield created

    metrics.add_callback(collect)

    def on_predicted(model: Any, n: int) -> None:
        rec = model.record
        key = (rec.symbol, rec.timeframe)
        child = children.get(key)
        if child is None:
            child = children.setdefault(key, candles.labels(*key))
        child.inc(n)

    return on_predicted


def live_metrics(metrics: Metrics, serving: Callable[[], Iterable[tuple[str, str, str]]],
                 summary: Callable[[str], tuple[int, float, float, float]], dropped: Callable[[], int],
                 drift: Callable[[str], tuple[int, Iterable[tuple[str, float]], float]] | None = None) -> None:
    """Live outcome monitoring gauges, computed at scrape time for every serving model in memory.

    `serving()` yields (symbol, timeframe, model_id) of the serving models; `summary(model_id)` gives (scored,
    sum of live log loss, sum of the prior's log loss, sum of the scored probabilities' entropy); `dropped()` the
    answers the journal could not keep; `drift(model_id)` (candles in the drift window, (feature, PSI) pairs, OOD
    rate) from this replica's memory.
    """

    def collect() -> Iterator[Metric]:
        labels = ("symbol", "timeframe", "model_id")
        ratio = GaugeMetricFamily(
            "mlsignal_live_log_loss_ratio",
            "Live log loss over the training class prior's log loss on the same scored candles, per serving model "
            "(above 1: worse than the prior). Absent until a prediction is scored.", labels=labels)
        scored = GaugeMetricFamily("mlsignal_live_scored_candles",
                                   "Served predictions scored on realised labels, per serving model.", labels=labels)
        loss = GaugeMetricFamily("mlsignal_live_log_loss", "Live log loss per serving model.", labels=labels)
        prior = GaugeMetricFamily("mlsignal_live_prior_log_loss",
                                  "Log loss of the training class prior on the same candles, per serving model.",
                                  labels=labels)
        expected = GaugeMetricFamily(
            "mlsignal_expected_log_loss",
            "Mean entropy of the scored probabilities per serving model: the log loss calibrated probabilities "
            "expect (a live log loss above it shows calibration drifting).", labels=labels)
        feature_psi = GaugeMetricFamily(
            "mlsignal_feature_psi",
            "Population stability index of each feature over the last MLSIGNAL_DRIFT_WINDOW candles a serving model "
            "served on this replica, against its training rows (above 0.2: a large shift).",
            labels=(*labels, "feature"))
        ood_rate = GaugeMetricFamily(
            "mlsignal_ood_rate",
            "Share of the last MLSIGNAL_DRIFT_WINDOW candles a serving model served on this replica that were out of "
            "distribution (1 % of its training rows are).", labels=labels)
        for symbol, timeframe, model_id in serving():
            key = (symbol, timeframe, model_id)
            if drift is not None:
                candles, psis, rate = drift(model_id)
                if candles:
                    for feature, value in psis:
                        if math.isfinite(value):
                            feature_psi.add_metric((*key, feature), value)
                    if math.isfinite(rate):
                        ood_rate.add_metric(key, rate)
            try:
                n, loss_sum, prior_sum, entropy_sum = summary(model_id)
            except Exception as exc:  # a scrape must not fail because the database is down
                log.warning("metrics: cannot read the live scores of %s: %s", model_id, one_line(exc))
                continue
            scored.add_metric(key, n)
            if n:
                loss.add_metric(key, loss_sum / n)
                prior.add_metric(key, prior_sum / n)
                expected.add_metric(key, entropy_sum / n)
                if prior_sum > 0:
                    ratio.add_metric(key, loss_sum / prior_sum)
        yield from (ratio, scored, loss, prior, expected, feature_psi, ood_rate)
        lost = CounterMetricFamily("mlsignal_journal_dropped",
                                   "Answers the prediction journal could not keep (queue full or database down).")
        lost.add_metric((), dropped())
        yield lost

    metrics.add_callback(collect)


def training_metrics(metrics: Metrics, job_counts: Callable[[], dict[str, int]]) -> Callable[[Any], None]:
    """Training metrics; returns the `on_job_finished(job)` hook for the scheduler.

    `job_counts()` reads the number of jobs per state from the database at scrape time.
    """
    durations = Histogram("mlsignal_training_job_duration_seconds",
                          "Run time of finished training jobs, from start to end, by final state.",
                          ("state",), buckets=JOB_DURATION_BUCKETS, registry=metrics.registry)
    finished = Counter("mlsignal_training_jobs_finished", "Training jobs finished by this process, by final state.",
                       ("state",), registry=metrics.registry)

    def collect() -> Iterator[Metric]:
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

    def on_job_finished(job: Any) -> None:
        finished.labels(job.state).inc()
        if job.started_at_ms is not None and job.finished_at_ms is not None:
            durations.labels(job.state).observe(max(0.0, (job.finished_at_ms - job.started_at_ms) / 1000.0))

    return on_job_finished


def policy_metrics(metrics: Metrics, due: Callable[[], int],
                   serving: Callable[[], Iterable[tuple[str, str, str, int]]],
                   wall_ms: Callable[[], int]) -> Callable[[str, str, str], None]:
    """Retrain policy metrics; returns the `on_outcome(kind, symbol, timeframe)` hook for the policy runner (kind
    started, skipped or failed).

    At scrape time `due()` counts the policies due now and `serving()` yields (symbol, timeframe, model_id,
    created_at_ms) of every SERVING model, whose age is measured against `wall_ms()`.
    """
    labels = ("symbol", "timeframe")
    counters = {
        "started": Counter("mlsignal_policy_jobs_started", "Training jobs started by retrain policies, per market.",
                           labels, registry=metrics.registry),
        "skipped": Counter("mlsignal_policy_skips",
                           "Due retrain policies skipped (no candle after the last model, or its job still running).",
                           labels, registry=metrics.registry),
        "failed": Counter("mlsignal_policy_failures",
                          "Jobs of retrain policies that failed or were cancelled, or could not be queued.",
                          labels, registry=metrics.registry),
    }

    def collect() -> Iterator[Metric]:
        due_now = GaugeMetricFamily("mlsignal_policies_due", "Unpaused retrain policies due now (read on scrape).")
        age = GaugeMetricFamily("mlsignal_serving_model_age_seconds",
                                "Seconds since the serving model of each market was registered (read on scrape).",
                                labels=("symbol", "timeframe", "model_id"))
        try:
            count = due()
            models = list(serving())
        except Exception as exc:  # a scrape must not fail because the database is down
            log.warning("metrics: cannot read the retrain policies or serving models: %s", one_line(exc))
            return
        due_now.add_metric((), count)
        now = wall_ms()
        for symbol, timeframe, model_id, created_ms in models:
            age.add_metric((symbol, timeframe, model_id), max(0.0, (now - created_ms) / 1000.0))
        yield due_now
        yield age

    metrics.add_callback(collect)

    def on_outcome(kind: str, symbol: str, timeframe: str) -> None:
        counters[kind].labels(symbol, timeframe).inc()

    return on_outcome


def promotion_metrics(metrics: Metrics, worse_than_prior: Callable[[], Iterable[tuple[str, str, str]]]
                      ) -> Callable[[str, str, str], None]:
    """Live promotion metrics; returns the `on_decision(decision, symbol, timeframe)` hook of the promotion runner
    (decision promote or reject). `worse_than_prior()` yields (symbol, timeframe, model_id) of every serving model
    the live test last found worse than its class prior."""
    decisions = Counter("mlsignal_shadow_decisions", "Shadows promoted or rejected by the live test, per market.",
                        ("symbol", "timeframe", "decision"), registry=metrics.registry)

    def collect() -> Iterator[Metric]:
        worse = GaugeMetricFamily(
            "mlsignal_serving_worse_than_prior",
            "1 for a serving model the live test finds significantly worse than its class prior.",
            labels=("symbol", "timeframe", "model_id"))
        for symbol, timeframe, model_id in worse_than_prior():
            worse.add_metric((symbol, timeframe, model_id), 1.0)
        yield worse

    metrics.add_callback(collect)

    def on_decision(decision: str, symbol: str, timeframe: str) -> None:
        decisions.labels(symbol, timeframe, decision).inc()

    return on_decision
