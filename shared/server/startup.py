"""Start-up checks of the server processes.

A database the server cannot use because of its configuration (no mlsignal schema, an older migration than this
version's, a SQLite file that does not exist) stops the start with one clear line that says what to do (password
hidden) instead of a server that answers UNAVAILABLE to every call. A server never creates a database: only
`mlsignal db upgrade` and `mlsignal data import` do.

A database server that cannot be reached (PostgreSQL down) is an outage, not a configuration error: `DatabaseGate`
lets the server start NOT_SERVING and retries with backoff until the database answers. A server that answers but
refuses the connection for good (wrong credentials, no such database or role) is a configuration error.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable

import sqlalchemy as sa

from shared.errors import Unavailable, one_line
from shared.store.db import make_engine, sqlite_path

log = logging.getLogger(__name__)

#: Backoff of the start-up retries against an unreachable database: the first wait, doubled up to the last.
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 10.0


#: What PostgreSQL says when it is up but refuses this connection for a reason retrying cannot fix.
_REFUSED_FOR_GOOD = re.compile(
    r"password authentication failed|authentication failed for user|no pg_hba\.conf entry|"
    r"database \"[^\"]*\" does not exist|role \"[^\"]*\" does not exist", re.IGNORECASE)


class StartupError(Exception):
    """A server cannot start for a reason the operator must fix; the message is one line."""


def database_label(url: str) -> str:
    """The database URL with its password hidden, for messages; a relative SQLite path also as the absolute file it
    names from here, since the same URL means another file in another working directory."""
    try:
        label = sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown by the name of its setting
        return "MLSIGNAL_DATABASE_URL"
    path = sqlite_path(url)
    if path is not None and not path.is_absolute():
        label += f" (the file {path.resolve()}: the path is relative to the working directory)"
    return label


def database_problem(url: str, exc: BaseException) -> str:
    """One line saying that the database at `url` cannot be used, and the driver's reason."""
    cause = exc.__cause__ if isinstance(exc, Unavailable) else None  # the store keeps the driver's error as the cause
    return f"cannot use the database {database_label(url)}: {one_line(cause or exc)}"


def check_database(url: str) -> None:
    """Check that this version can use the database at `url`, without creating anything.

    StartupError (one line, password hidden, naming `mlsignal db upgrade` where that is the fix) when it lacks the
    mlsignal schema, is at another migration than this version's head, or is a SQLite file that does not exist or
    cannot be opened. Unavailable when a database server cannot be reached: an outage, worth retrying.
    """
    from shared.store.migrate import current_revision, schema_problem

    label = database_label(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        where = "" if path.is_absolute() else " (run it in the directory the services run in, or use an absolute path)"
        raise StartupError(f"cannot use the database {label}: the file does not exist; create it with "
                           f"`mlsignal db upgrade`{where}")
    quiet = logging.getLogger("alembic.runtime.migration")  # "Context impl SQLiteImpl." is no news to an operator
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        engine = make_engine(url)
        try:
            current = current_revision(engine)
        finally:
            engine.dispose()
    except Unavailable as exc:
        if url.startswith("sqlite"):  # a file is there or not: nothing to wait for
            raise StartupError(database_problem(url, exc)) from None
        if _REFUSED_FOR_GOOD.search(str(exc.__cause__ or exc)):
            raise StartupError(database_problem(url, exc) + "; check MLSIGNAL_DATABASE_URL") from None
        raise
    except (sa.exc.SQLAlchemyError, OSError, ValueError) as exc:
        raise StartupError(database_problem(url, exc)) from None
    finally:
        quiet.setLevel(level)
    problem = schema_problem(current)
    if problem is not None:
        raise StartupError(f"cannot use the database {label}: {problem}")


class DatabaseGate:
    """The database a server needs before it serves.

    `check()` tries once: True when the database can be used, False when it cannot be reached (then the server
    starts NOT_SERVING and calls `wait_in_background`), StartupError when it can be reached but not used.
    `wait_in_background(on_ready)` retries with backoff (0.5 s doubling to 10 s) until the database answers, then
    checks it again: when it can be used it calls `on_ready()` (which reports SERVING); when it cannot (say the
    schema is missing), `failure` holds the one-line reason and `failed` is set, and the process exits non-zero.
    The cause of the outage is logged once, and so is its end.
    """

    def __init__(self, url: str, first_delay: float | None = None, max_delay: float | None = None):
        self.url = url
        self.first_delay = RETRY_FIRST_SECONDS if first_delay is None else first_delay
        self.max_delay = RETRY_MAX_SECONDS if max_delay is None else max_delay
        self.failed = threading.Event()
        self.failure: str | None = None
        self.reason = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> bool:
        try:
            check_database(self.url)
        except Unavailable as exc:
            self.reason = one_line(exc.__cause__ or exc)
            return False
        return True

    def wait_in_background(self, on_ready: Callable[[], object]) -> None:
        log.warning("cannot reach the database %s: %s; not serving until it answers (retrying with backoff)",
                    database_label(self.url), self.reason)
        self._thread = threading.Thread(target=self._retry, args=(on_ready,), name="database-gate", daemon=True)
        self._thread.start()

    def _retry(self, on_ready: Callable[[], object]) -> None:
        delay = self.first_delay
        while not self._stop.wait(delay):
            delay = min(delay * 2, self.max_delay)
            try:
                if not self.check():
                    continue
                on_ready()
            except Unavailable:  # gone again while the server got ready: keep waiting
                continue
            except StartupError as exc:
                self._fail(str(exc))
                return
            except Exception as exc:  # getting ready failed for another reason: the process cannot serve
                self._fail(f"cannot start: {one_line(exc, with_type=True)}")
                return
            log.warning("the database %s answers; serving", database_label(self.url))
            return

    def _fail(self, message: str) -> None:
        self.failure = message
        log.error("%s", message)
        self.failed.set()

    def stop(self, _grace: float = 0.0) -> None:
        """End the retries (the server is stopping)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
