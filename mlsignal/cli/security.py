"""TLS and bearer-token options shared by every client-side command."""

from __future__ import annotations

import argparse


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """--tls, --ca-cert, --token and --insecure-token; defaults come from MLSIGNAL_TLS_CA and MLSIGNAL_AUTH_TOKEN."""
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (implied by --ca-cert or MLSIGNAL_TLS_CA; without a CA the system roots "
                        "verify the server)")
    p.add_argument("--ca-cert", metavar="PEM",
                   help="CA certificate that signed the server's (default: MLSIGNAL_TLS_CA)")
    p.add_argument("--token", metavar="TOKEN",
                   help="bearer token (default: MLSIGNAL_AUTH_TOKEN; prefer the variable, arguments are visible to "
                        "other local users). Without TLS it is only sent to a loopback or unix: target")
    p.add_argument("--insecure-token", action="store_true",
                   help="send the token over plaintext to a target on another machine (anyone on the network path "
                        "can read it; only behind a TLS-terminating proxy or on a trusted private network)")


def security_kwargs(args: argparse.Namespace) -> dict:
    """`tls`, `root_certificates`, `token` and `allow_insecure_token` for connect_channel / TrainingClient /
    InferenceClient."""
    from shared.settings import client_security

    kwargs = client_security(getattr(args, "tls", None) or None, getattr(args, "ca_cert", None),
                             getattr(args, "token", None))
    kwargs["allow_insecure_token"] = bool(getattr(args, "insecure_token", False))
    return kwargs
