"""The operator CLI `mlsignal`. Each sub-module registers its own sub-commands.

The base install (`pip install mlsignal`) runs the client-side commands. Commands that need an extra either declare
the modules they need (`set_defaults(needs=...)`, checked before they run) or fail on a missing module that an extra
brings; both end in one line naming the extra to install and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import traceback

# Modules under mlsignal.cli that each define register(subparsers).
COMMAND_MODULES = ("db", "data", "training", "policies", "inference", "stream", "monitor", "demo", "backtest", "health",
                   "loadtest", "report")

# Top-level modules that only an extra brings: module -> (extra, what the extra is for in messages).
EXTRA_MODULES: dict[str, tuple[str, str]] = {
    "sqlalchemy": ("inference", "database"),
    "alembic": ("inference", "database"),
    "psycopg": ("inference", "database"),
    "onnxruntime": ("inference", "inference"),
    "prometheus_client": ("inference", "server"),
    "grpc_reflection": ("inference", "server"),
    "grpc_status": ("inference", "server"),
    "sklearn": ("training", "training"),
    "joblib": ("training", "training"),
    "onnx": ("training", "training"),
    "skl2onnx": ("training", "training"),
    "matplotlib": ("research", "research"),
    "dask": ("dask", "Dask"),
    "distributed": ("dask", "Dask"),
}
# Extras that bring other extras along, so a message never asks for both.
IMPLIED_EXTRAS = {"training": ("inference",), "research": ("inference",), "dask": ("training", "inference")}

# What a command declares with set_defaults(needs=...): the database layer, or everything both services need.
DATABASE = ("sqlalchemy", "alembic")
SERVICES = ("sqlalchemy", "alembic", "onnxruntime", "sklearn", "skl2onnx")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlsignal",
        description="Operate mlsignal: database, market data, training, inference and backtests.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mlsignal.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mlsignal.cli.{name}":
                continue
            raise
        module.register(sub)
    _verbose_everywhere(parser)
    return parser


VERBOSE_HELP = "show the traceback of an error (by default an error is one line); accepted anywhere on the line"


def _verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept -v/--verbose after the sub-command too (`mlsignal predict ... --verbose`), not only before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if "--verbose" not in child._option_string_actions:
                    flags = ["--verbose"] if "-v" in child._option_string_actions else ["-v", "--verbose"]
                    # SUPPRESS: a sub-command without the flag keeps the value given before it.
                    child.add_argument(*flags, action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP)
                _verbose_everywhere(child)


def command_name(args: argparse.Namespace) -> str:
    """The command as typed, like `mlsignal data import`."""
    words = ["mlsignal", args.command]
    action = getattr(args, f"{args.command.replace('-', '_')}_command", None)
    if action:
        words.append(action)
    return " ".join(words)


def missing_extras_message(command: str, modules: list[str]) -> str:
    """`error: '<command>' needs the <what> extras: pip install 'mlsignal[<extras>]'` for the missing modules."""
    extras: list[str] = []
    for module in modules:
        extra = EXTRA_MODULES[module][0]
        if extra not in extras:
            extras.append(extra)
    implied = {e for extra in extras for e in IMPLIED_EXTRAS.get(extra, ())}
    extras = [e for e in extras if e not in implied]
    what: list[str] = []
    for module in modules:
        extra, purpose = EXTRA_MODULES[module]
        if extra in extras and purpose not in what:
            what.append(purpose)
    listed = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
    return f"error: '{command}' needs the {listed} extras: pip install 'mlsignal[{','.join(sorted(extras))}]'"


def _missing(modules) -> list[str]:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def _extra_module(exc: ModuleNotFoundError) -> str | None:
    """The top-level module an extra brings that `exc` reports as not installed, if that is what it reports."""
    top = (exc.name or "").split(".")[0]
    if top in EXTRA_MODULES and importlib.util.find_spec(top) is None:
        return top
    return None


def _refused_call(exc: BaseException) -> bool:
    """Whether `exc` is what a command's error handler reports in one line: a refused call or a bad input."""
    from mlsignal.client import MlsignalClientError

    return isinstance(exc, MlsignalClientError | ValueError) and not isinstance(exc, ModuleNotFoundError)


def _one_line(exc: BaseException) -> str:
    """The line a command's error handler prints for `exc` (after `error: `)."""
    from mlsignal.client import MlsignalClientError

    if isinstance(exc, MlsignalClientError):
        status = exc.code.name if exc.code is not None else "ERROR"
        note = f" ({exc.note})" if exc.note else ""
        return f"{status}: {exc.details}{note}"
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    from shared.errors import MlsignalError

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # a database error is reported once, as the command's error line
        logging.getLogger("shared.store.db").setLevel(logging.ERROR)
    missing = _missing(getattr(args, "needs", ()))
    if missing:
        print(missing_extras_message(command_name(args), missing), file=sys.stderr)
        return 2
    func = args.func
    if args.verbose:
        # Refused calls are normally reported in one line by the command's own error handler; unwrap it so the
        # traceback can be shown too.
        func = getattr(func, "__wrapped__", func)
    try:
        return int(func(args) or 0)
    except MlsignalError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        module = _extra_module(exc)
        if module is None:
            raise
        print(missing_extras_message(command_name(args), [module]), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not args.verbose or func is args.func or not _refused_call(exc):
            raise
        traceback.print_exc()
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
