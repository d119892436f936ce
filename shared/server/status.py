"""Domain errors to gRPC status codes: one table, and the decorator that applies it to servicer methods.

The table only knows `shared.errors`; anything else a servicer raises (a bug) ends as UNKNOWN. Database failures reach
this module already translated to `shared.errors.Unavailable` by the store.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from shared import errors

F = TypeVar("F", bound=Callable[..., Any])

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


def _abort(context: grpc.ServicerContext, exc: errors.MlsignalError) -> None:
    """End the call with the error's status code (context.abort raises); re-raise an error the table lacks."""
    code = status_for(exc)
    if code is None:
        raise exc
    context.abort(code, str(exc))


def maps_errors(method: F) -> F:
    """Decorate a servicer method (unary or streaming) so domain errors end the call with their status code."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except errors.MlsignalError as exc:
                _abort(context, exc)

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except errors.MlsignalError as exc:
            _abort(context, exc)

    return wrapper  # type: ignore[return-value]
