"""Bearer-token authentication: with MLSIGNAL_AUTH_TOKEN set, every RPC except health checks must carry the token.

Health checks stay open because orchestrators that poll them hold no secret; server reflection needs the token like
any other service. Tokens are compared in constant time. `shared.server.interceptors` applies the check to each call.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Iterable
from typing import Any

import grpc

#: Services that answer without a token.
OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
UNAUTHENTICATED_MESSAGE = "authorization: a valid 'Bearer <token>' is required (MLSIGNAL_AUTH_TOKEN)"


def bearer_token_ok(metadata: Iterable[tuple[str, str | bytes]] | None, token: bytes) -> bool:
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


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover - abort raises


def denied(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` (asyncio server) that ends every call UNAUTHENTICATED."""
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
