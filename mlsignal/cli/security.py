"""TLS and bearer-token options shared by every client-side command."""

from __future__ import annotations

import argparse


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    """--tls, --ca-cert and --token; their defaults come from MLSIGNAL_TLS_CA and MLSIGNAL_AUTH_TOKEN."""
    p.add_argument("--tls", action="store_true",
                   help="connect with TLS (implied by --ca-cert or MLSIGNAL_TLS_CA; without a CA the system roots "
                        "verify the server)")
    p.add_argument("--ca-cert", metavar="PEM",
                   help="CA certificate that signed the server's (default: MLSIGNAL_TLS_CA)")
    p.add_argument("--token", metavar="TOKEN",
                   help="bearer token (default: MLSIGNAL_AUTH_TOKEN; prefer the variable, arguments are visible to "
                        "other local users)")


def security_kwargs(args: argparse.Namespace) -> dict:
    """`tls`, `root_certificates` and `token` for connect_channel / TrainingClient / InferenceClient."""
    from shared.settings import client_security

    return client_security(getattr(args, "tls", None) or None, getattr(args, "ca_cert", None),
                           getattr(args, "token", None))
