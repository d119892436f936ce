"""The operator CLI `mlsignal`. Each sub-module registers its own sub-commands."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules under mlsignal.cli that each define register(subparsers).
COMMAND_MODULES = ("db", "data", "training", "inference", "demo", "backtest", "health", "loadtest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsignal",
        description="Operate mlsignal: database, market data, training, inference and backtests.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mlsignal.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mlsignal.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from shared.errors import MlsignalError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MlsignalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
