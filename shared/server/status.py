"""Domain errors to gRPC status: one table, `status_proto` (a `google.rpc.Status` with `google.rpc.BadRequest` field
violations), and the decorator `maps_errors` that applies them to servicer methods.

The table only knows `shared.errors`; database failures reach this module already translated to
`shared.errors.Unavailable` by the store. Anything else a servicer raises is a bug: the call ends INTERNAL with a
short error id, and the server logs that id with the traceback (the client never sees a traceback, and never
UNKNOWN). Request bytes that are not a valid message end INVALID_ARGUMENT (`decoding_checked`, which the server
interceptor applies to every handler), where gRPC itself would answer UNKNOWN.
"""

from __future__ import annotations

import functools
import inspect
import logging
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from shared import errors

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("mlsignal.errors")

STATUS_OF: dict[type[errors.MlsignalError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
}


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a domain error, or None for any other exception."""
    for cls, code in STATUS_OF.items():
        if isinstance(exc, cls):
            return code
    return None


def _rpc_code(code: grpc.StatusCode) -> int:
    """The `google.rpc.Code` number of a gRPC status code."""
    return int(code.value[0])


def status_proto(exc: errors.MlsignalError) -> status_pb2.Status:
    """The error as a `google.rpc.Status`: its code from the table, its message, and, when the error names a field,
    a `google.rpc.BadRequest` field violation in the details. A domain error the table lacks counts as INTERNAL."""
    code = status_for(exc) or grpc.StatusCode.INTERNAL
    message = str(exc)
    status = status_pb2.Status(code=_rpc_code(code), message=message)
    if exc.field:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=message)])
        status.details.add().Pack(bad_request)
    return status


def internal_status(exc: BaseException, where: str) -> status_pb2.Status:
    """INTERNAL for an unexpected exception: logs it with its traceback under a new error id, which is all the
    client is told."""
    error_id = secrets.token_hex(4)
    log.error("%s: internal error %s", where, error_id, exc_info=exc)
    return status_pb2.Status(code=code_pb2.INTERNAL,
                             message=f"internal error (error id {error_id}; the server log has the details)")


def _aborted(context: Any) -> bool:
    """Whether the call already has a final status (the servicer aborted it), so the exception is gRPC's own."""
    try:
        code = context.code()
    except Exception:  # a context without code() (very old gRPC) cannot tell; assume not aborted
        return False
    return code is not None and code != grpc.StatusCode.OK


def _status_of(exc: Exception, context: Any, where: str) -> status_pb2.Status | None:
    """The status that ends the call for `exc`, or None when gRPC must see `exc` itself (an abort in progress)."""
    if isinstance(exc, errors.MlsignalError):
        return status_proto(exc)
    if isinstance(exc, grpc.RpcError) or _aborted(context):
        return None
    return internal_status(exc, where)


def maps_errors(method: F) -> F:
    """Decorate a servicer method so errors end the call with the right status and details.

    Works for `async def` methods and async generators (the asyncio server) as well as plain functions and
    generators (a thread-pool server). Domain errors end the call with their code, message and BadRequest
    details (see `status_proto`); any other exception ends it INTERNAL with a logged error id.
    """
    where = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def async_stream(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            responses = method(self, request, context)
            try:
                async for response in responses:
                    yield response
            except Exception as exc:
                status = _status_of(exc, context, where)
                if status is None:
                    raise
                await context.abort_with_status(rpc_status.to_status(status))
            finally:
                await responses.aclose()

        return async_stream  # type: ignore[return-value]

    if inspect.iscoroutinefunction(method):

        @functools.wraps(method)
        async def async_unary(self: Any, request: Any, context: Any) -> Any:
            try:
                return await method(self, request, context)
            except Exception as exc:
                status = _status_of(exc, context, where)
                if status is None:
                    raise
                await context.abort_with_status(rpc_status.to_status(status))

        return async_unary  # type: ignore[return-value]

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream(self: Any, request: Any, context: Any) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:
                status = _status_of(exc, context, where)
                if status is None:
                    raise
                context.abort_with_status(rpc_status.to_status(status))

        return stream  # type: ignore[return-value]

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: Any) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:
            status = _status_of(exc, context, where)
            if status is None:
                raise
            context.abort_with_status(rpc_status.to_status(status))

    return unary  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------------
# requests that are not protobuf

#: The status message of a request whose bytes are not a valid message of the method's request type.
UNDECODABLE_MESSAGE = "the request is not a valid protobuf message of this method's request type"


class _Undecodable:
    """Stands in for a request message that failed to decode, so the handler can end the call INVALID_ARGUMENT."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _safe_deserializer(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception:  # DecodeError, or anything a corrupt message makes the parser raise
            return _UNDECODABLE

    return safe


async def _decoded(requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
    async for request in requests:
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
        yield request


def _checked(behavior: Callable[..., Any], streaming_request: bool, generator: bool) -> Callable[..., Any]:
    """`behavior` behind the decoding check: an undecodable request (or, on a request stream, message) aborts the
    call INVALID_ARGUMENT when the handler gets to it. `generator`: `behavior` is an async generator of responses."""

    async def checked(request: Any, context: Any) -> Any:
        if streaming_request:
            return _decoded(request, context)
        if request is _UNDECODABLE:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, UNDECODABLE_MESSAGE)
        return request

    if generator:

        async def stream_wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            responses = behavior(await checked(request, context), context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()

        return stream_wrapper

    async def wrapper(request: Any, context: Any) -> Any:
        return await behavior(await checked(request, context), context)

    return wrapper


def decoding_checked(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """`handler` (asyncio) with a request deserializer that never raises: bytes that are not a valid request message
    end the call INVALID_ARGUMENT instead of gRPC's UNKNOWN. Blocking handlers are returned unchanged.

    Interceptors that wrap the result see every call, undecodable ones included (gRPC would otherwise fail the call
    while reading the request, before any of them runs), and a handler built on its deserializer (the
    UNAUTHENTICATED one of `shared.server.auth.denied`) answers without ever decoding."""
    behavior = handler.unary_unary or handler.stream_unary or handler.unary_stream or handler.stream_stream
    if handler.request_deserializer is None or not (
            inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
        return handler
    deserialize = _safe_deserializer(handler.request_deserializer)
    wrapped = _checked(behavior, handler.request_streaming, inspect.isasyncgenfunction(behavior))
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(wrapped, deserialize, handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(wrapped, deserialize, handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(wrapped, deserialize, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrapped, deserialize, handler.response_serializer)
