"""`mlsignal health`: ask a server for its grpc.health.v1 status; exit 0 when SERVING (for container health checks).

Also home of the client security flags (`--tls`, `--ca-cert`, `--token`) that any client command can add with
`add_security_arguments(parser)` and turn into client keyword arguments with `security_kwargs(args)`.
"""

from __future__ import annotations

import sys

from mlsignal.cli.security import add_security_arguments, security_kwargs
from mlsignal.client.channel import check_target_scheme

# Every name an mlsignal server reports a health status for, besides '' (the server as a whole): the inference
# server has InferenceService and, when MLSIGNAL_MODEL_MAX_AGE is set, mlsignal.staleness (NOT_SERVING while a
# serving model is older than that), the training server TrainingService.
KNOWN_SERVICES = ("mlsignal.v1.InferenceService", "mlsignal.staleness", "mlsignal.v1.TrainingService")


def register(sub) -> None:
    p = sub.add_parser(
        "health",
        help="check a service's health (exit 0 when SERVING)",
        description=(
            "Ask the grpc.health.v1 service of a training or inference server for its status and print it. Exit 0 "
            "when it is SERVING, 1 otherwise (NOT_SERVING, unknown service, unreachable or timed out). Health "
            "checks need no token. Suitable as a container health check."
        ),
    )
    p.add_argument("--target", metavar="ADDR",
                   help="server address (default: MLSIGNAL_INFERENCE_ADDR, or MLSIGNAL_TRAINING_ADDR with --training)")
    p.add_argument("--training", action="store_true",
                   help="check the training service at MLSIGNAL_TRAINING_ADDR instead of the inference service")
    p.add_argument("--service", default="", metavar="NAME",
                   help="service to check: mlsignal.v1.InferenceService, or mlsignal.staleness (with "
                        "MLSIGNAL_MODEL_MAX_AGE set) on the inference server, mlsignal.v1.TrainingService on the "
                        "training server (default: the server as a whole)")
    p.add_argument("--timeout", type=float, default=3.0, metavar="SECONDS", help="give up after this long (default 3)")
    add_security_arguments(p)
    p.add_argument("--server-name", metavar="NAME",
                   help="with TLS: the name the server certificate must carry, when it differs from the target host")
    p.set_defaults(func=_health)


def _known_names(stub, refused: str, timeout: float) -> list[str]:
    """The names of KNOWN_SERVICES the server has a health status for (asked one by one), without `refused`."""
    import grpc
    from grpc_health.v1 import health_pb2

    names = []
    for name in KNOWN_SERVICES:
        if name == refused:
            continue
        try:
            stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                continue
            return [n for n in KNOWN_SERVICES if n != refused]  # cannot tell: every name mlsignal servers use
        names.append(name)
    return names


def _channel(target: str, security: dict, server_name: str | None):
    import grpc

    options = []
    if security["tls"]:
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(security["root_certificates"]), options)
    return grpc.insecure_channel(target, options)


def _health(args) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        security = security_kwargs(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    # grpc.health.v1 needs no token, so none is sent: a health probe never puts a credential on the wire.
    target = args.target
    if not target:
        from shared.settings import Settings

        settings = Settings.from_env()
        target = settings.training_addr if args.training else settings.inference_addr
    try:
        check_target_scheme(target)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    channel = _channel(target, security, args.server_name)
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            known = ", ".join(["'' (the server as a whole)", *_known_names(stub, args.service, args.timeout)])
            hint = ""
            if args.service == "mlsignal.staleness" and "mlsignal.v1.InferenceService" in known:
                hint = " (it reports mlsignal.staleness only when MLSIGNAL_MODEL_MAX_AGE is set on the server)"
            print(f"error: {target} has no health status for service {args.service!r}; this server knows "
                  f"{known}{hint}", file=sys.stderr)
        else:
            print(f"error: {target}: {exc.code().name}: {exc.details() or 'no details'}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1
