"""The one interceptor (asyncio) every handler of a server goes through: the bearer-token check, RPC metrics, and
access logs, for every call, including one whose request bytes are not a valid message.

- **decoding**: the handler's request deserializer never raises (`shared.server.status.decoding_checked`), so a call
  with undecodable bytes is authenticated, counted and logged like any other; when it is let through, it ends
  INVALID_ARGUMENT (where gRPC alone would answer UNKNOWN without the interceptor seeing the call).
- **auth** (with a token configured): see `shared.server.auth`; calls without the token end UNAUTHENTICATED, whatever
  their request bytes.
- **metrics** (when `Metrics` is given): RPCs started and handled by method and status code, messages received and
  sent on streams, the handling time of each RPC, and for bidirectional streams the time of each message from its
  request arriving to its response leaving.
- **access log**: one line per RPC (per stream, not per message) on the `mlsignal.access` logger with the fields
  `method`, `status`, `duration_ms`, and `model_id` / `job_id` when the request or response carries one. With
  MLSIGNAL_LOG_FORMAT=json each is a JSON object. Status details and message contents (candles) are never logged.
  Health checks and reflection are logged at DEBUG.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from time import perf_counter
from typing import Any

import grpc

from shared.server.auth import OPEN_SERVICES, bearer_token_ok, denied
from shared.server.metrics import Metrics
from shared.server.status import decoding_checked

ACCESS_LOG = logging.getLogger("mlsignal.access")
#: Services whose access-log lines are DEBUG rather than INFO (orchestrators poll them every few seconds).
QUIET_SERVICES = frozenset({"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection",
                            "grpc.reflection.v1.ServerReflection"})


def _grpc_type(handler: grpc.RpcMethodHandler) -> str:
    if handler.request_streaming and handler.response_streaming:
        return "bidi_stream"
    if handler.request_streaming:
        return "client_stream"
    if handler.response_streaming:
        return "server_stream"
    return "unary"


class _Method:
    """Everything about one RPC method that does not change between calls, resolved once."""

    __slots__ = ("_handled", "_metrics", "full", "handling", "kind", "level", "name", "open", "received", "sent",
                 "service", "started", "stream_message")
    # the metric children of this method, or None without metrics
    started: Any
    handling: Any
    received: Any
    sent: Any
    stream_message: Any

    def __init__(self, full: str, handler: grpc.RpcMethodHandler, metrics: Metrics | None) -> None:
        self.full = full
        service, _, name = full.lstrip("/").rpartition("/")
        self.service, self.name = service, name
        self.kind = _grpc_type(handler)
        self.open = service in OPEN_SERVICES
        self.level = logging.DEBUG if service in QUIET_SERVICES else logging.INFO
        self._metrics = metrics
        self._handled: dict[grpc.StatusCode, Any] = {}
        if metrics is not None:
            labels = (self.kind, service, name)
            self.started = metrics.started.labels(*labels)
            self.handling = metrics.handling.labels(*labels)
            self.received = metrics.received.labels(*labels)
            self.sent = metrics.sent.labels(*labels)
            self.stream_message = metrics.stream_message.labels(service, name)
        else:
            self.started = self.handling = self.received = self.sent = self.stream_message = None

    def handled(self, code: grpc.StatusCode) -> Any:
        child = self._handled.get(code)
        if child is None:
            assert self._metrics is not None  # only called when the server has metrics
            child = self._handled.setdefault(
                code, self._metrics.handled.labels(self.kind, self.service, self.name, code.name))
        return child


class _Call:
    __slots__ = ("arrived", "n_in", "n_out", "request", "response", "start")

    def __init__(self) -> None:
        self.start = perf_counter()
        self.n_in = 0
        self.n_out = 0
        self.arrived: float | None = None
        self.request: Any = None
        self.response: Any = None


def _code_after_error(context: grpc.aio.ServicerContext, exc: BaseException) -> grpc.StatusCode:
    """The status a call ends with when its handler raised `exc` (an abort has set the code already)."""
    code = context.code()
    if code is not None and code != grpc.StatusCode.OK:
        return code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


def _final_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    return context.code() or grpc.StatusCode.OK


def _ids(*messages: Any) -> dict[str, str]:
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


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Auth, metrics and access logging for every RPC of one server (see the module docstring)."""

    def __init__(self, metrics: Metrics | None = None, token: str | None = None,
                 access_log: logging.Logger = ACCESS_LOG) -> None:
        self._metrics = metrics
        self._token = token.encode("ascii") if token else None
        self._log = access_log
        self._methods: dict[str, _Method] = {}

    def _method(self, full: str, handler: grpc.RpcMethodHandler) -> _Method:
        m = self._methods.get(full)
        if m is None:
            m = self._methods.setdefault(full, _Method(full, handler, self._metrics))
        return m

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        handler = decoding_checked(handler)  # first, so that no request bytes can end a call before it is counted
        m = self._method(handler_call_details.method, handler)
        if self._token is not None and not m.open and not bearer_token_ok(
                handler_call_details.invocation_metadata, self._token):
            return self._wrap(denied(handler), m)
        return self._wrap(handler, m)

    # -- bookkeeping ---------------------------------------------------------------------------------------------
    def _begin(self, m: _Method) -> _Call:
        if m.started is not None:
            m.started.inc()
        return _Call()

    def _finish(self, m: _Method, call: _Call, code: grpc.StatusCode, context: grpc.aio.ServicerContext) -> None:
        elapsed = perf_counter() - call.start
        if self._metrics is not None:
            m.handled(code).inc()
            m.handling.observe(elapsed)
        level = m.level
        if code in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS):
            level = logging.WARNING
        if not self._log.isEnabledFor(level):
            return
        extra: dict[str, Any] = {"method": m.full, "status": code.name, "duration_ms": round(elapsed * 1000.0, 3)}
        extra.update(_ids(call.response, call.request))
        if m.kind != "unary":
            extra["messages_in"], extra["messages_out"] = call.n_in, call.n_out
        with contextlib.suppress(Exception):  # the peer is informative only
            extra["peer"] = context.peer()
        ids = "".join(f" {k}={extra[k]}" for k in ("job_id", "model_id") if k in extra)
        self._log.log(level, "rpc %s %s %.1fms%s", m.full, code.name, elapsed * 1000.0, ids, extra=extra)

    async def _requests(self, m: _Method, call: _Call, iterator: AsyncIterator[Any]) -> AsyncIterator[Any]:
        counting = self._metrics is not None
        async for request in iterator:
            call.n_in += 1
            call.arrived = perf_counter()
            if call.request is None:
                call.request = request
            if counting:
                m.received.inc()
            yield request

    # -- wrappers ------------------------------------------------------------------------------------------------
    def _wrap(self, handler: grpc.RpcMethodHandler, m: _Method) -> grpc.RpcMethodHandler:
        behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            # a blocking handler runs in gRPC's thread pool and is passed through as it is (counted only)
            if m.started is not None:
                m.started.inc()
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, m), handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, m, streaming_request=True),
                handler.request_deserializer, handler.response_serializer)
        streaming_request = handler.stream_stream is not None
        wrap = self._streaming if inspect.isasyncgenfunction(behavior) else self._writing
        wrapped = wrap(behavior, m, streaming_request)
        if streaming_request:
            return grpc.stream_stream_rpc_method_handler(wrapped, handler.request_deserializer,
                                                         handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(wrapped, handler.request_deserializer,
                                                    handler.response_serializer)

    def _start_call(self, m: _Method, request: Any, streaming_request: bool) -> tuple[_Call, Any]:
        call = self._begin(m)
        if streaming_request:
            request = self._requests(m, call, request)
        else:
            call.request = request
        return call, request

    def _unary(self, behavior: Callable[..., Awaitable[Any]], m: _Method,
               streaming_request: bool = False) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call, request = self._start_call(m, request, streaming_request)
            code = grpc.StatusCode.OK
            try:
                call.response = await behavior(request, context)
                code = _final_code(context)
                return call.response
            except BaseException as exc:
                code = _code_after_error(context, exc)
                raise
            finally:
                self._finish(m, call, code, context)

        return wrapper

    def _streaming(self, behavior: Callable[..., AsyncGenerator[Any, None]], m: _Method,
                   streaming_request: bool = False) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
        """Wrap a handler that is an async generator of responses."""
        metrics = self._metrics

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, request = self._start_call(m, request, streaming_request)
            code = grpc.StatusCode.OK
            responses = behavior(request, context)
            try:
                async for response in responses:
                    call.n_out += 1
                    call.response = response
                    if metrics is not None:
                        m.sent.inc()
                        if call.arrived is not None:
                            m.stream_message.observe(perf_counter() - call.arrived)
                    call.arrived = None
                    yield response
                code = _final_code(context)
            except BaseException as exc:
                code = _code_after_error(context, exc)
                raise
            finally:
                with contextlib.suppress(Exception):
                    await responses.aclose()
                self._finish(m, call, code, context)

        return wrapper

    def _writing(self, behavior: Callable[..., Awaitable[None]], m: _Method,
                 streaming_request: bool = False) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[None]]:
        """Wrap a streaming handler that writes its responses with `context.write` (the health service's Watch);
        its messages are not counted."""

        async def wrapper(request: Any, context: grpc.aio.ServicerContext) -> None:
            call, request = self._start_call(m, request, streaming_request)
            code = grpc.StatusCode.OK
            try:
                await behavior(request, context)
                code = _final_code(context)
            except BaseException as exc:
                code = _code_after_error(context, exc)
                raise
            finally:
                self._finish(m, call, code, context)

        return wrapper
