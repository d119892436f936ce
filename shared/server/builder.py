"""Building and starting a gRPC server the same way for both services: message-size limits, TLS credentials, the
interceptor (auth, metrics, access logs), health and reflection, and a handle whose `stop` drains calls gracefully."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent import futures
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.server.interceptors import ServerInterceptor
from shared.server.metrics import Metrics

if TYPE_CHECKING:
    import sqlalchemy as sa

    from shared.settings import Settings


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """Channel options that raise the receive and send limits to `max_bytes`."""
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


class ServerHandle:
    """A started server with its health servicer; `stop` flips health to NOT_SERVING before draining calls.

    `metrics` is the server's `Metrics` when MLSIGNAL_METRICS_PORT is set (its `port` is the bound metrics port), else
    None.
    """

    def __init__(self, server: grpc.Server, health_servicer: health.HealthServicer, port: int, services: list[str],
                 metrics: Metrics | None = None) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.services = services
        self.metrics = metrics
        self._on_stop: list[Callable[[float], object]] = []
        self._on_stopped: list[Callable[[], object]] = []
        self._stopped = False

    def on_stop(self, fn: Callable[[float], object]) -> None:
        """Call fn(grace) right after the server stops taking new calls (running calls still drain meanwhile)."""
        self._on_stop.append(fn)

    def on_stopped(self, fn: Callable[[], object]) -> None:
        """Call fn() once every call has finished or was cancelled at the end of the grace period."""
        self._on_stopped.append(fn)

    def stop(self, grace: float) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, and it stays so
        event = self.server.stop(grace)  # new calls are refused from here on; running calls get `grace` seconds
        for stopping in self._on_stop:
            stopping(grace)
        event.wait(grace + 1)
        for stopped in self._on_stopped:
            stopped()

    def wait(self) -> None:
        self.server.wait_for_termination()


class RunningServer:
    """A started service: its server handle and database engine; `stop` drains the server, then closes the pool."""

    def __init__(self, handle: ServerHandle, engine: sa.Engine) -> None:
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


def start_server(address: str, add_servicers: Callable[[grpc.Server], object], service_names: list[str],
                 max_message_bytes: int, max_workers: int = 32, *,
                 interceptors: Sequence[grpc.ServerInterceptor] = (), credentials: grpc.ServerCredentials | None = None,
                 metrics: Metrics | None = None) -> ServerHandle:
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


def observability(settings: Settings, service: str, address: str) -> tuple[Metrics | None, list[ServerInterceptor]]:
    """(Metrics or None, interceptors) for a server: metrics when MLSIGNAL_METRICS_PORT is set, the bearer-token check
    when MLSIGNAL_AUTH_TOKEN is set, and the access log always. The metrics endpoint is served at once."""
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
