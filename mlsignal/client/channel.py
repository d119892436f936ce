"""Channels to the services: message limits, load balancing, TLS and the bearer token in one place.

Both clients (and tools such as the load generator) connect through `connect_channel`, so a deployment's security
settings mean the same everywhere.

The bearer token is only ever sent where it cannot be read on the way: over TLS, or over gRPC's local credentials to
a loopback address (127.0.0.0/8, ::1, localhost) or a Unix socket, where it never leaves the machine. A token for any
other plaintext target is refused before a channel exists, unless the caller explicitly accepts sending it in clear
text (`allow_insecure_token=True`, the CLI's ``--insecure-token``), e.g. behind a TLS-terminating proxy on a private
network.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, Self

import grpc

from mlsignal.client.errors import called_service, error_from_rpc, is_method_not_found, wrong_service_note
from shared.settings import is_loopback_host

__all__ = ["DEFAULT_TIMEOUT", "MAX_MESSAGE_BYTES", "ServiceClient", "check_target_scheme", "connect_channel",
           "is_local_target"]

# Large enough for a Predict over the service's default maximum batch of candles.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0

_UNIX_SCHEMES = ("unix:", "unix-abstract:")


def _target_hosts(target: str) -> list[str] | None:
    """The host part of every address a gRPC target names, or None for a Unix socket."""
    t = target.strip()
    if t.startswith(_UNIX_SCHEMES):
        return None
    if t.startswith(("ipv4:", "ipv6:")):
        addresses = t.split(":", 1)[1].split(",")
    elif t.startswith("dns:"):
        rest = t[len("dns:"):]
        if rest.startswith("//"):  # dns://authority/host:port (the authority names a DNS server, not the target)
            rest = rest[2:].partition("/")[2]
        addresses = [rest]
    else:
        addresses = [t]
    hosts = []
    for address in addresses:
        a = address.strip()
        if a.startswith("["):  # [::1]:50052
            hosts.append(a[1:].partition("]")[0])
        elif a.count(":") > 1:  # a bare IPv6 address without a port
            hosts.append(a)
        else:
            hosts.append(a.partition(":")[0])
    return hosts


def is_local_target(target: str) -> bool:
    """Whether every address of a gRPC target is on this machine: a Unix socket (``unix:``), localhost, or a
    loopback address (127.0.0.0/8, ::1), also in the ``dns:///``, ``ipv4:`` and ``ipv6:`` forms."""
    hosts = _target_hosts(target)
    return hosts is None or (bool(hosts) and all(is_loopback_host(h) for h in hosts))


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
    """Adds fixed metadata (the bearer token) to every call on a plaintext channel to another machine.

    Only used with ``allow_insecure_token=True``: gRPC itself refuses call credentials on such a channel, because
    anyone on the path can read the token.
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
    allow_insecure_token: bool = False,
) -> grpc.Channel:
    """A channel to an mlsignal service, with 64 MiB messages and round-robin load balancing.

    `target` is passed to gRPC unchanged: ``host:port``, ``dns:///host:port`` (every address the name resolves to is
    used, round robin), ``ipv4:10.0.0.1:50052,10.0.0.2:50052`` or ``unix:/path/to/socket``. With `tls` the server
    certificate is checked against `root_certificates` (PEM; None means the system roots). `options` are extra gRPC
    channel arguments and override the defaults. `load_balancing` None leaves gRPC's default (pick_first).

    A `token` is sent as ``authorization: Bearer <token>`` on every call, as gRPC call credentials, and only

    - over TLS (`tls=True`), or
    - to a loopback or Unix-socket target (see `is_local_target`), over gRPC local credentials: plaintext that never
      leaves the machine (gRPC checks that the connection really is local).

    A token for any other plaintext target raises ValueError here, before a channel is created, unless
    `allow_insecure_token` is True: then the token travels in clear text (only for a trusted network, e.g. behind a
    TLS-terminating proxy).

    Example::

        >>> channel = connect_channel("dns:///inference.internal:50052", tls=True, token=os.environ["MLSIGNAL_TOKEN"])
        ... # doctest: +SKIP
        >>> stub = inference_pb2_grpc.InferenceServiceStub(channel)        # doctest: +SKIP
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be an address like 127.0.0.1:50052 or dns:///host:port, got {target!r}")
    check_target_scheme(target)
    if token is not None and (not isinstance(token, str) or not token or "\n" in token or "\r" in token):
        raise ValueError("token must be a non-empty string without line breaks")
    if root_certificates is not None and not tls:
        raise ValueError("root_certificates only apply with tls=True")
    local = is_local_target(target)
    if token is not None and not tls and not local and not allow_insecure_token:
        raise ValueError(
            f"refusing to send the bearer token in clear text to {target}: connect with TLS (tls=True, --tls or "
            "--ca-cert / MLSIGNAL_TLS_CA), or accept plaintext explicitly with allow_insecure_token=True "
            "(CLI: --insecure-token). Without TLS a token is only sent to loopback or unix: targets")
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
    if token is not None and local:
        kind = grpc.LocalConnectionType.UDS if _target_hosts(target) is None else grpc.LocalConnectionType.LOCAL_TCP
        creds = grpc.composite_channel_credentials(grpc.local_channel_credentials(kind),
                                                   grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, creds, options=channel_options)
    channel = grpc.insecure_channel(target, options=channel_options)
    if token is not None:  # allow_insecure_token: the caller accepted a clear-text token
        channel = grpc.intercept_channel(channel, _MetadataInterceptor([("authorization", f"Bearer {token}")]))
    return channel


def check_target_scheme(target: str) -> None:
    """ValueError for a URL given as a gRPC target (``http://host:port``): gRPC targets have no http:// prefix."""
    scheme = target.strip().lower().partition("://")[0]
    if scheme in ("http", "https") and "://" in target:
        raise ValueError(f"{target}: use host:port (no {scheme}:// prefix)")


class ServiceClient:
    """What the training and inference clients share: one channel, a deadline for unary calls, typed errors.

    A context manager, so a strategy's ``with`` block closes the channel (and cancels open streams) on the way out.
    The security arguments are those of `connect_channel`: a token for a plaintext target that is not on this machine
    raises ValueError unless `allow_insecure_token` is True.
    """

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = (), allow_insecure_token: bool = False):
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.target = target
        self.timeout = timeout
        self.channel = connect_channel(target, tls=tls, root_certificates=root_certificates, token=token,
                                       options=options, allow_insecure_token=allow_insecure_token)

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
            if is_method_not_found(err):
                wrong = wrong_service_note(self.channel, called_service(method), self.target)
                note = f"{note}; {wrong}" if note and wrong else note or wrong
            raise error_from_rpc(err, note) from err
