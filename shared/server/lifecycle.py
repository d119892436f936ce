"""The life of a server process: start-up with one-line failures, serving until SIGTERM or SIGINT, and a graceful
stop that lets running calls drain."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TypeVar

import sqlalchemy as sa
from alembic.util.exc import CommandError

from shared.errors import Unavailable, one_line
from shared.server.builder import RunningServer, ServerHandle
from shared.server.logs import configure_logging
from shared.server.startup import DatabaseGate, StartupError, database_problem
from shared.settings import Settings

log = logging.getLogger(__name__)

R = TypeVar("R", bound=RunningServer)
SIGNAL_POLL_SECONDS = 0.1


def run_until_signalled(handle: ServerHandle, grace: float, failed: threading.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or until `failed` is set), then stop gracefully."""
    done = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d; shutting down (grace %.1fs)", signum, grace)
        done.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    # Python runs signal handlers in the main thread only, and a signal that the kernel delivered to another thread
    # (the server loop, a worker) does not wake a blocked wait here; waking up regularly bounds that delay.
    while not done.wait(SIGNAL_POLL_SECONDS):
        if failed is not None and failed.is_set():
            break
    handle.stop(grace)


def server_main(prog: str, start: Callable[[Settings], R], describe: Callable[[Settings, R], str]) -> int:
    """The body of `mlsignal-training` / `mlsignal-inference`: read settings, set up logging, start (which checks
    the database), print `<prog> listening on port N`, serve until SIGTERM/SIGINT and drain. Start-up failures the
    operator must fix (configuration, a database without the current schema, address in use, unreadable TLS files)
    print one line on stderr and exit 2 (configuration) or 1 (anything else), without a traceback.

    A database server that cannot be reached at start-up is an outage: the server listens NOT_SERVING and retries
    (`shared.server.startup.DatabaseGate`, the `database_gate` of the running server); if the database then turns
    out to lack the schema, the server stops and exits 1 with that line on stderr."""
    try:
        settings = Settings.from_env()
        settings.server_tls_pair()  # the PEM files are readable
    except ValueError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        running = start(settings)
    except StartupError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    except (Unavailable, sa.exc.SQLAlchemyError, CommandError) as exc:
        print(f"{prog}: {database_problem(settings.database_url, exc)}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{prog}: {one_line(exc)}", file=sys.stderr)
        return 1
    logging.getLogger(prog.replace("-", ".")).info("%s", describe(settings, running))
    print(f"{prog} listening on port {running.port}", flush=True)
    if running.handle.metrics is not None:
        print(f"{prog} metrics on port {running.handle.metrics.port}", flush=True)
    gate: DatabaseGate | None = getattr(running, "database_gate", None)
    run_until_signalled(running.handle, settings.grace_seconds, gate.failed if gate is not None else None)
    running.engine.dispose()
    if gate is not None and gate.failure is not None:
        print(f"{prog}: {gate.failure}", file=sys.stderr)
        return 1
    return 0
