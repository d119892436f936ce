"""Channels to the services: message limits, load balancing, TLS and the bearer token in one place.

Both clients (and tools such as the load generator) connect through `connect_channel`, so a deployment's security
settings mean the same everywhere.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, Self

import grpc

from mlsignal.client.errors import error_from_rpc

__all__ = ["DEFAULT_TIMEOUT", "MAX_MESSAGE_BYTES", "ServiceClient", "connect_channel"]

# Large enough for a Predict over the service's default maximum batch of candles.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call on an insecure channel.

    gRPC only attaches call credentials to TLS channels, so a token over plain TCP (e.g. inside a private network or
    behind a TLS-terminating proxy) needs this interceptor.
    """

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._metadata = tuple(metadata)

    def _details(self, d: Any) -> _CallDetails:
        metadata = (*(d.metadata or ()), *self._metadata)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any], client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], client_call_details: Any,
                               request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any], client_call_details: Any,
                                request_iterator: Any) -> Any:
        return continuation(self._details(client_call_details), request_iterator)


def connect_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    load_balancing: str | None = "round_robin",
) -> grpc.Channel:
    """A channel to an mlsignal service, with 64 MiB messages and round-robin load balancing.

    `target` is passed to gRPC unchanged: ``host:port``, ``dns:///host:port`` (every address the name resolves to is
    used, round robin) or ``ipv4:10.0.0.1:50052,10.0.0.2:50052``. With `tls` the server certificate is checked against
    `root_certificates` (PEM; None means the system roots). A `token` is sent as ``authorization: Bearer <token>`` on
    every call. `options` are extra gRPC channel arguments and override the defaults. `load_balancing` None leaves
    gRPC's default (pick_first).

    Example::

        >>> channel = connect_channel("dns:///inference.internal:50052", tls=True, token=os.environ["MLSIGNAL_TOKEN"])
        ... # doctest: +SKIP
        >>> stub = inference_pb2_grpc.InferenceServiceStub(channel)        # doctest: +SKIP
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be an address like 127.0.0.1:50052 or dns:///host:port, got {target!r}")
    if token is not None and (not isinstance(token, str) or not token or "\n" in token or "\r" in token):
        raise ValueError("token must be a non-empty string without line breaks")
    if root_certificates is not None and not tls:
        raise ValueError("root_certificates only apply with tls=True")
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
    if load_balancing:
        opts["grpc.lb_policy_name"] = load_balancing
    opts.update(dict(options))
    channel_options = list(opts.items())
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        if token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, creds, options=channel_options)
    channel = grpc.insecure_channel(target, options=channel_options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor([("authorization", f"Bearer {token}")]))
    return channel


class ServiceClient:
    """What the training and inference clients share: one channel, a deadline for unary calls, typed errors.

    A context manager, so a strategy's ``with`` block closes the channel (and cancels open streams) on the way out.
    """

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = ()):
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.target = target
        self.timeout = timeout
        self.channel = connect_channel(target, tls=tls, root_certificates=root_certificates, token=token,
                                       options=options)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: Callable[..., Any], request: Any, note: str = "") -> Any:
        """One unary call with the client's deadline; a failure raises the typed MlsignalClientError."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            raise error_from_rpc(err, note) from err
