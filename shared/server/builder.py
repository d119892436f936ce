"""Building and starting a gRPC server the same way for both services: message-size limits, TLS credentials, the
interceptor (auth, metrics, access logs), health and reflection, and a handle whose `stop` drains calls gracefully."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
from collections.abc import Callable, Coroutine, Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.server.interceptors import ServerInterceptor
from shared.server.metrics import Metrics

if TYPE_CHECKING:
    import sqlalchemy as sa

    from shared.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")

#: HTTP/2 keepalive: the server pings an idle connection every 60 s and drops a peer that does not answer within
#: 20 s, so a client that vanished without closing its streams frees them. Clients may ping as often as every 10 s.
#: There is deliberately no idle or age limit on connections: a healthy stream on daily candles is idle for a day.
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
]


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """Channel options that raise the receive and send limits to `max_bytes`."""
    return [
        ("grpc.max_receive_message_length", max_bytes),
        ("grpc.max_send_message_length", max_bytes),
    ]


def server_options(max_bytes: int) -> list[tuple[str, int]]:
    """Every option of a server: message-size limits, keepalive, and no SO_REUSEPORT (a second server on a port
    that is taken fails to bind instead of silently sharing it)."""
    return [*message_size_options(max_bytes), *KEEPALIVE_OPTIONS, ("grpc.so_reuseport", 0), *PENDING_OPTIONS]


# gRPC cancels calls that arrive while more than 1,000 (soft) / 3,000 (hard) are waiting to be accepted by the
# application, which a candle-close burst of thousands of streams exceeds at once. The stream cap itself is
# MLSIGNAL_MAX_STREAMS; these only keep a burst from being cut short.
PENDING_OPTIONS = [
    ("grpc.server.max_pending_requests", 100_000),
    ("grpc.server.max_pending_requests_hard_limit", 100_000),
]


class ServerLoop:
    """The asyncio event loop that runs this process's gRPC servers, in a background thread.

    Callers in other threads hand it coroutines with `run`. One loop serves every server of the process (gRPC's
    asyncio support polls its completion queue from one loop best); it starts with the first server and stops
    when the last one has stopped.
    """

    _lock = threading.Lock()
    _shared: ServerLoop | None = None
    _users = 0

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="grpc-server-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.run_until_complete(self.loop.shutdown_default_executor())
        finally:
            self.loop.close()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result (call from any thread but the loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @classmethod
    def acquire(cls) -> ServerLoop:
        with cls._lock:
            if cls._shared is None:
                cls._shared = ServerLoop()
            cls._users += 1
            return cls._shared

    @classmethod
    def release(cls) -> None:
        with cls._lock:
            cls._users -= 1
            if cls._users > 0 or cls._shared is None:
                return
            runner, cls._shared = cls._shared, None
            runner.loop.call_soon_threadsafe(runner.loop.stop)
            runner._thread.join(10)


class ServerHandle:
    """A started asyncio server with its health servicer; `stop` flips health to NOT_SERVING before draining calls.

    The server runs on the process's `ServerLoop`; the handle's methods are plain blocking calls for any other
    thread. `metrics` is the server's `Metrics` when MLSIGNAL_METRICS_PORT is set (its `port` is the bound metrics
    port), else None.
    """

    def __init__(self, server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int,
                 services: list[str], runner: ServerLoop, metrics: Metrics | None = None) -> None:
        self.server = server
        self.health = health_servicer
        self.port = port
        self.services = services
        self.metrics = metrics
        self.runner = runner
        self._on_stop: list[Callable[[float], object]] = []
        self._on_stopped: list[Callable[[], object]] = []
        self._stopped = False
        self._terminated = threading.Event()
        self._stop_task: asyncio.Future[None] | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.runner.loop

    def set_serving(self, service: str, serving: bool) -> None:
        """Report `service` SERVING or NOT_SERVING from any thread; ignored once the server is stopping (then every
        service reads NOT_SERVING)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        if not self._stopped:
            asyncio.run_coroutine_threadsafe(self.health.set(service, status), self.loop)

    def on_stop(self, fn: Callable[[float], object]) -> None:
        """Call fn(grace) right after the server stops taking new calls (running calls still drain meanwhile)."""
        self._on_stop.append(fn)

    def on_stopped(self, fn: Callable[[], object]) -> None:
        """Call fn() once every call has finished or was cancelled at the end of the grace period."""
        self._on_stopped.append(fn)

    async def _begin_stop(self, grace: float) -> threading.Event:
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for every service, and it stays so
        done = threading.Event()
        self._stop_task = asyncio.ensure_future(self.server.stop(grace))
        self._stop_task.add_done_callback(lambda _: done.set())
        await asyncio.sleep(0)  # the stop has begun: new calls are refused from here on
        return done

    def stop(self, grace: float) -> None:
        """Refuse new calls, give running ones `grace` seconds, then cancel what is left (blocking)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            done = self.runner.run(self._begin_stop(grace))
            for stopping in self._on_stop:  # in this thread: they may block while calls drain on the loop
                stopping(grace)
            if not done.wait(grace + 5):
                log.warning("the server did not finish stopping within %.1fs", grace + 5)
            for stopped in self._on_stopped:
                stopped()
        finally:
            ServerLoop.release()
            self._terminated.set()

    def wait(self) -> None:
        """Block until `stop` has finished."""
        self._terminated.wait()


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


def _address_in_use(address: str) -> bool:
    """Whether a TCP listen address is taken by another listener (checked before gRPC binds, which would also fail
    but log a line of its own first). Port 0, Unix sockets and unresolvable hosts are left to gRPC."""
    if address.startswith("unix:"):
        return False
    host_text, _, port_text = address.rpartition(":")
    host = host_text.strip("[]") or None
    if not port_text.isdigit() or int(port_text) == 0:
        return False
    try:
        infos = socket.getaddrinfo(host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False
    for family, kind, proto, _name, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is not "in use"
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return True
    return False


async def _start(address: str, add_servicers: Callable[[grpc.aio.Server], object], service_names: list[str],
                 max_message_bytes: int, interceptors: Sequence[grpc.aio.ServerInterceptor],
                 credentials: grpc.ServerCredentials | None,
                 serving: bool = True) -> tuple[grpc.aio.Server, health.aio.HealthServicer, int]:
    server = grpc.aio.server(interceptors=list(interceptors), options=server_options(max_message_bytes))
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if _address_in_use(address):
            port = 0
        elif credentials is not None:
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # grpc raises RuntimeError for an address it cannot bind
        port = 0
    if port == 0:
        await server.stop(None)
        raise OSError(f"cannot listen on {address}: the address is in use or not available here "
                      "(is another server running on it?)")
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:  # before the first call can ask
        await health_servicer.set(name, status)
    await server.start()
    return server, health_servicer, port


def start_server(address: str, add_servicers: Callable[[grpc.aio.Server], object], service_names: list[str],
                 max_message_bytes: int, *, interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None, metrics: Metrics | None = None,
                 serving: bool = True) -> ServerHandle:
    """Build, bind and start an asyncio server on the process's `ServerLoop`. `add_servicers(server)` registers the
    service implementations (asyncio servicers); it runs on the loop.

    With `credentials` the port speaks TLS only. `interceptors` wrap every handler, health and reflection included.
    OSError names the address when it cannot be bound. Health reads SERVING from the start, or NOT_SERVING with
    `serving=False` (until `set_serving`).
    """
    runner = ServerLoop.acquire()
    try:
        server, health_servicer, port = runner.run(
            _start(address, add_servicers, service_names, max_message_bytes, interceptors, credentials, serving), 60)
    except BaseException:
        ServerLoop.release()
        raise
    return ServerHandle(server, health_servicer, port, service_names, runner, metrics)


def listen_host(address: str) -> str:
    """The host part of a gRPC listen address (`0.0.0.0:50051`, `[::]:50051`; loopback for a Unix socket)."""
    if address.startswith("unix:"):
        return "127.0.0.1"
    host = address.rpartition(":")[0].strip("[]")
    return host or "0.0.0.0"


def plaintext_token_problem(settings: Settings, address: str) -> str | None:
    """Why a server must not start with these settings on `address`, or None: a bearer token (MLSIGNAL_AUTH_TOKEN)
    without TLS on an address other machines reach sends every client's token in clear text, and so does a
    token-protected metrics endpoint (MLSIGNAL_METRICS_PORT) on such a host (MLSIGNAL_METRICS_HOST): Prometheus
    sends the token with every scrape. Loopback addresses and Unix sockets are fine; MLSIGNAL_ALLOW_PLAINTEXT_TOKEN=1
    accepts the risk (e.g. behind a TLS-terminating proxy)."""
    from shared.settings import is_loopback_host

    if not settings.auth_token or settings.tls or settings.allow_plaintext_token:
        return None
    if not (address.startswith("unix:") or is_loopback_host(listen_host(address))):
        return (f"refusing to serve a bearer token (MLSIGNAL_AUTH_TOKEN) over plaintext on {address}: clients would "
                "send it unencrypted; set MLSIGNAL_TLS_CERT and MLSIGNAL_TLS_KEY, listen on a loopback address, or "
                "set MLSIGNAL_ALLOW_PLAINTEXT_TOKEN=1 to accept it")
    if settings.metrics_port and not is_loopback_host(settings.metrics_host):
        return (f"refusing to serve metrics that need the bearer token (MLSIGNAL_AUTH_TOKEN) over plaintext HTTP on "
                f"{settings.metrics_host}:{settings.metrics_port}: Prometheus would send it unencrypted; set "
                "MLSIGNAL_TLS_CERT and MLSIGNAL_TLS_KEY (the metrics endpoint then speaks HTTPS), set "
                "MLSIGNAL_METRICS_HOST=127.0.0.1, or set MLSIGNAL_ALLOW_PLAINTEXT_TOKEN=1 to accept it")
    return None


def observability(settings: Settings, service: str,
                  address: str) -> tuple[Metrics | None, list[grpc.aio.ServerInterceptor]]:
    """(Metrics or None, interceptors) for a server: metrics when MLSIGNAL_METRICS_PORT is set, and the interceptor
    that authenticates (MLSIGNAL_AUTH_TOKEN), counts and logs every call, undecodable requests included.

    The metrics endpoint is served at once, on MLSIGNAL_METRICS_HOST (loopback unless configured), behind the bearer
    token when one is set, and over HTTPS with the server's certificate when TLS is configured.

    Refuses (StartupError, after a warning in the log) a token without TLS on a non-loopback address; see
    `plaintext_token_problem`."""
    problem = plaintext_token_problem(settings, address)
    if problem is not None:
        from shared.server.startup import StartupError

        log.warning("%s", problem)
        raise StartupError(problem)
    metrics = None
    if settings.metrics_port:
        try:
            v = version("mlsignal")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
            v = ""
        metrics = Metrics(service, v)
        tls_files = (settings.tls_cert, settings.tls_key) if settings.tls_cert and settings.tls_key else None
        where = f"{settings.metrics_host}:{settings.metrics_port}"
        try:
            metrics.serve(settings.metrics_host, settings.metrics_port, token=settings.auth_token,
                          tls_files=tls_files)
        except OSError as exc:  # the address, or (ssl.SSLError) the certificate
            raise OSError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    return metrics, [ServerInterceptor(metrics, settings.auth_token)]
