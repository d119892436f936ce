"""Database schema (SQLAlchemy Core) and engine creation. Alembic migrations in shared/store/migrations create it.

Every engine comes from `make_engine`, which turns a database that cannot be used (unreachable, locked, read-only,
schema missing) into `shared.errors.Unavailable` wherever the store touches it, so callers above the store only see
domain errors.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from shared.errors import Unavailable, one_line

metadata = sa.MetaData()

# Times are UTC epoch milliseconds (BigInteger): exact, portable between SQLite and PostgreSQL.
candles = sa.Table(
    "candles",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("timeframe", sa.String(8), primary_key=True),
    sa.Column("open_time", sa.BigInteger, primary_key=True),
    sa.Column("open", sa.Float(53), nullable=False),
    sa.Column("high", sa.Float(53), nullable=False),
    sa.Column("low", sa.Float(53), nullable=False),
    sa.Column("close", sa.Float(53), nullable=False),
    sa.Column("volume", sa.Float(53), nullable=False),
)

funding_rates = sa.Table(
    "funding_rates",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("time", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.Float(53), nullable=False),
)

open_interest = sa.Table(
    "open_interest",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("time", sa.BigInteger, primary_key=True),
    sa.Column("value", sa.Float(53), nullable=False),
)

training_jobs = sa.Table(
    "training_jobs",
    metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("symbol", sa.String(64), nullable=False),
    sa.Column("timeframe", sa.String(8), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("progress", sa.Float(53), nullable=False, default=0.0),
    sa.Column("stage", sa.String(32), nullable=False, default="queued"),
    sa.Column("error", sa.Text, nullable=False, default=""),
    sa.Column("model_id", sa.String(64), nullable=False, default=""),
    sa.Column("request", sa.Text, nullable=False),  # StartTrainingRequest as JSON, defaults filled in
    sa.Column("metrics", sa.Text, nullable=False, default="{}"),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("started_at", sa.BigInteger, nullable=True),
    sa.Column("finished_at", sa.BigInteger, nullable=True),
    sa.Index("ix_training_jobs_created", "created_at"),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("model_id", sa.String(64), primary_key=True),
    sa.Column("symbol", sa.String(64), nullable=False),
    sa.Column("timeframe", sa.String(8), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("train_start", sa.BigInteger, nullable=False),
    sa.Column("train_end", sa.BigInteger, nullable=False),
    sa.Column("horizon_bars", sa.Integer, nullable=False),
    sa.Column("threshold", sa.Float(53), nullable=False),
    sa.Column("warmup_bars", sa.Integer, nullable=False),
    sa.Column("manifest", sa.Text, nullable=False),  # JSON: feature spec, params, classes, prior, calibration, versions
    sa.Column("metrics", sa.Text, nullable=False),
    sa.Column("artifact", sa.String(255), nullable=False),  # file name inside the model directory
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(64), nullable=True),
    sa.Index("ix_models_key_created", "symbol", "timeframe", "created_at"),
)


def make_engine(url: str) -> sa.Engine:
    """Engine for a URL; creates the directory of a SQLite file and sets SQLite up for concurrent readers.

    Errors that mean the database cannot be used are raised as `Unavailable` (see `unavailable_error`).
    """
    engine = _sqlite_engine(url) if url.startswith("sqlite") else sa.create_engine(url, pool_pre_ping=True)
    password = engine.url.password

    @event.listens_for(engine, "handle_error")
    def _translate(ctx: sa.engine.ExceptionContext) -> BaseException | None:
        if ctx.is_pre_ping:  # a failed ping makes the pool reconnect; that attempt reports its own failure
            return None
        return unavailable_error(ctx.sqlalchemy_exception, ctx.original_exception, password)

    return engine


def _sqlite_engine(url: str) -> sa.Engine:
    db = sa.engine.make_url(url).database
    if db and db != ":memory:":
        Path(db).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(url, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


# SQLSTATE of a missing table on PostgreSQL (SQLite reports it as an OperationalError).
_UNDEFINED_TABLE = "42P01"


def unavailable_error(error: BaseException | None, driver_error: BaseException | None,
                      password: str | None = None) -> Unavailable | None:
    """`Unavailable` for a SQLAlchemy error that means the database cannot be used, else None.

    Such errors are OperationalError and InterfaceError (unreachable host, refused or dropped connection, locked or
    read-only SQLite file, and on SQLite a missing table) and, on PostgreSQL, a missing table. The message is the
    driver's own, without the SQL statement or its parameters, and never shows the password.
    """
    if isinstance(error, sa.exc.ProgrammingError):
        code = getattr(driver_error, "sqlstate", None) or getattr(driver_error, "pgcode", None)
        if code != _UNDEFINED_TABLE:
            return None
    elif not isinstance(error, (sa.exc.OperationalError, sa.exc.InterfaceError)):
        return None
    reason = _driver_message(driver_error) if driver_error is not None else one_line(error)
    if password:
        reason = reason.replace(password, "***")
    return Unavailable(f"the database is unavailable: {reason}")


def _driver_message(driver_error: BaseException) -> str:
    """The driver's message on one line: PostgreSQL's primary message when the driver has one (it leaves out the
    `LINE n:` excerpt of the statement), else the whole text."""
    primary = getattr(getattr(driver_error, "diag", None), "message_primary", None)
    if isinstance(primary, str) and primary.strip():
        return " ".join(primary.split())
    return one_line(driver_error)
