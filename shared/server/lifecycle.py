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
from shared.server.startup import StartupError, check_database, database_problem
from shared.settings import Settings

log = logging.getLogger(__name__)

R = TypeVar("R", bound=RunningServer)
SIGNAL_POLL_SECONDS = 0.1


def run_until_signalled(handle: ServerHandle, grace: float) -> None:
    """Serve until SIGTERM or SIGINT, then stop gracefully."""
    done = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("received signal %d; shutting down (grace %.1fs)", signum, grace)
        done.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)
    # Python runs signal handlers in the main thread only, and a signal that the kernel delivered to another thread
    # (the server loop, a worker) does not wake a blocked wait here; waking up regularly bounds that delay.
    while not done.wait(SIGNAL_POLL_SECONDS):
        pass
    handle.stop(grace)


def server_main(prog: str, start: Callable[[Settings], R], describe: Callable[[Settings, R], str]) -> int:
    """The body of `mlsignal-training` / `mlsignal-inference`: read settings, set up logging, check the database,
    start, print `<prog> listening on port N`, serve until SIGTERM/SIGINT and drain. Start-up failures the operator
    must fix (configuration, database, address in use, unreadable TLS files) print one line on stderr and exit 2
    (configuration) or 1 (anything else), without a traceback."""
    try:
        settings = Settings.from_env()
        settings.server_tls_pair()  # the PEM files are readable
    except ValueError as exc:
        print(f"{prog}: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        check_database(settings.database_url)
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
    run_until_signalled(running.handle, settings.grace_seconds)
    running.engine.dispose()
    return 0
