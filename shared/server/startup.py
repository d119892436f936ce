"""Start-up checks of the server processes: a database that cannot be used stops the start with one clear line
(password hidden) instead of a traceback or a server that answers UNAVAILABLE to every call."""

from __future__ import annotations

import sqlalchemy as sa

from shared.errors import Unavailable, one_line
from shared.store.db import make_engine


class StartupError(Exception):
    """A server cannot start for a reason the operator must fix; the message is one line."""


def database_label(url: str) -> str:
    """The database URL with its password hidden, for messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is shown by the name of its setting
        return "MLSIGNAL_DATABASE_URL"


def database_problem(url: str, exc: BaseException) -> str:
    """One line saying that the database at `url` cannot be used, and the driver's reason."""
    cause = exc.__cause__ if isinstance(exc, Unavailable) else None  # the store keeps the driver's error as the cause
    return f"cannot use the database {database_label(url)}: {one_line(cause or exc)}"


def check_database(url: str) -> None:
    """Connect once and run SELECT 1; StartupError (one line, password hidden) when the database cannot be used."""
    try:
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
    except (Unavailable, sa.exc.SQLAlchemyError, OSError) as exc:
        raise StartupError(database_problem(url, exc)) from None
