"""Database schema (SQLAlchemy Core) and engine creation. Alembic migrations in shared/store/migrations create it.

Every engine comes from `make_engine`, which turns a database that cannot be used (unreachable, locked, read-only,
schema missing) into `shared.errors.Unavailable` wherever the store touches it, so callers above the store only see
domain errors.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

from shared.errors import Unavailable, one_line

log = logging.getLogger(__name__)
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
    # Lifecycle (shared.store.registry): CANDIDATE, SERVING, REJECTED, RETIRED or RESEARCH, and why.
    sa.Column("stage", sa.String(16), nullable=False, server_default="CANDIDATE"),
    sa.Column("stage_reason", sa.Text, nullable=False, server_default=""),
    sa.Index("ix_models_key_created", "symbol", "timeframe", "created_at"),
    # At most one SERVING model per (symbol, timeframe).
    sa.Index(
        "ux_models_serving", "symbol", "timeframe", unique=True,
        sqlite_where=sa.text("stage = 'SERVING'"), postgresql_where=sa.text("stage = 'SERVING'"),
    ),
)

# Every stage change of every model, with its time (epoch ms) and reason.
model_stage_changes = sa.Table(
    "model_stage_changes",
    metadata,
    sa.Column("change_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_id", sa.String(64), nullable=False),
    sa.Column("symbol", sa.String(64), nullable=False),
    sa.Column("timeframe", sa.String(8), nullable=False),
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("changed_at", sa.BigInteger, nullable=False),
    # The registry version this change bumped to (`registry_version`); NULL for changes older than migration 0004.
    sa.Column("version", sa.BigInteger, nullable=True),
    sa.Index("ix_model_stage_changes_key", "symbol", "timeframe", "changed_at"),
    sa.Index("ix_model_stage_changes_model", "model_id"),
    sa.Index("ix_model_stage_changes_version", "version"),
)

# One row (id 1): a counter that every registry change bumps inside its own transaction. On PostgreSQL the row lock
# orders the bumps as the commits, so a reader that sees version V sees every change up to V.
registry_version = sa.Table(
    "registry_version",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("version", sa.BigInteger, nullable=False),
)


def make_engine(url: str, *, create: bool = False) -> sa.Engine:
    """Engine for a URL; sets SQLite up for concurrent readers.

    A SQLite file is only opened, never created: a missing file (never created, deleted or moved away while the
    service runs) raises `Unavailable` "the database file is missing". Only `create=True` (`mlsignal db upgrade`,
    `mlsignal data import`) creates the file and its directory. A connection whose file was deleted or replaced
    (a restored backup) is dropped at its next checkout, so every session uses the file now at the path.

    Errors that mean the database cannot be used are raised as `Unavailable` (see `unavailable_error`); the first of
    an incident is logged once (a warning naming the cause), and so is the first success after it.
    """
    engine = _sqlite_engine(url, create) if url.startswith("sqlite") else _server_engine(url)
    password = engine.url.password
    incidents = _Incidents(engine.url.render_as_string(hide_password=True))

    @event.listens_for(engine, "handle_error")
    def _translate(ctx: sa.engine.ExceptionContext) -> BaseException | None:
        if ctx.is_pre_ping:  # a failed ping makes the pool reconnect; that attempt reports its own failure
            return None
        error = unavailable_error(ctx.sqlalchemy_exception, ctx.original_exception, password)
        if error is not None:
            incidents.failed(str(error))
        return error

    @event.listens_for(engine, "after_cursor_execute")
    def _succeeded(*_args: object) -> None:
        if incidents.current is not None:
            incidents.succeeded()

    return engine


class _Incidents:
    """Logs a database outage once: the cause when the first call fails, and the first success after it."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.current: str | None = None
        self._lock = threading.Lock()

    def failed(self, reason: str) -> None:
        with self._lock:
            if self.current is not None:
                return
            self.current = reason
        log.warning("database %s: %s (logged once until it works again)", self.label, reason)

    def succeeded(self) -> None:
        with self._lock:
            if self.current is None:
                return
            self.current = None
        log.warning("database %s works again", self.label)


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases, in-memory ones and `file:` URIs)."""
    if not url.startswith("sqlite"):
        return None
    db = sa.engine.make_url(url).database
    if not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db)


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


#: Seconds a new PostgreSQL connection may take before it fails (libpq waits forever by default, so a database host
#: that drops packets would hold a worker until TCP gives up). A `connect_timeout` in the URL wins.
CONNECT_TIMEOUT_SECONDS = 10


def _server_engine(url: str) -> sa.Engine:
    parsed = sa.engine.make_url(url)
    connect_args = {}
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_SECONDS
    return sa.create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)


def _sqlite_engine(url: str, create: bool) -> sa.Engine:
    path = sqlite_path(url)
    if path is None:
        engine = sa.create_engine(url, connect_args={"timeout": 30})
    elif create:
        path.parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"timeout": 30})
    else:
        engine = sa.create_engine(url, creator=_open_existing(str(path.absolute())))
    if path is not None:
        watched = str(path.absolute())

        @event.listens_for(engine, "connect")
        def _remember_file(_dbapi_conn, record):  # pragma: no cover - trivial
            record.info["sqlite_file"] = _file_id(watched)
            # SQLite opens a write-protected file read-only, even with mode=rw, and the connection stays so
            record.info["sqlite_writable"] = os.access(watched, os.W_OK)

        @event.listens_for(engine, "checkout")
        def _same_file(_dbapi_conn, record, _proxy):
            if _file_id(watched) != record.info.get("sqlite_file"):  # deleted, moved away or replaced meanwhile
                raise sa.exc.DisconnectionError(f"the database file {watched} was removed or replaced")
            if not record.info.get("sqlite_writable", True) and os.access(watched, os.W_OK):
                raise sa.exc.DisconnectionError(f"the connection to {watched} was opened read-only while the file "
                                                "refused writes; it takes writes again")

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_conn, _record):  # pragma: no cover - trivial
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    return engine


def _open_existing(path: str) -> Callable[[], sqlite3.Connection]:
    """A connection factory that opens the SQLite file at `path` read-write but never creates it."""
    uri = f"file:{urllib.parse.quote(path)}?mode=rw"

    def connect() -> sqlite3.Connection:
        if not os.path.exists(path):
            raise sqlite3.OperationalError(f"the database file is missing: {path}")
        return sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)

    return connect


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
    if isinstance(error, sa.exc.ProgrammingError) or reason.startswith("no such table"):
        reason += " (the schema is missing or older than this version: run `mlsignal db upgrade`)"
    return Unavailable(f"the database is unavailable: {reason}")


def _driver_message(driver_error: BaseException) -> str:
    """The driver's message on one line: PostgreSQL's primary message when the driver has one (it leaves out the
    `LINE n:` excerpt of the statement), else the whole text."""
    primary = getattr(getattr(driver_error, "diag", None), "message_primary", None)
    if isinstance(primary, str) and primary.strip():
        return " ".join(primary.split())
    return one_line(driver_error)


# -- live outcome monitoring (shared.store.live; written by inference_service.journal) ------------------------------
# Candles inference received, kept while a pending prediction may need them: the last close received per candle.
live_candles = sa.Table(
    "live_candles",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("timeframe", sa.String(8), primary_key=True),
    sa.Column("open_time", sa.BigInteger, primary_key=True),
    sa.Column("close", sa.Float(53), nullable=False),
    sa.Column("received_at", sa.BigInteger, nullable=False),
)

# Ready, out-of-sample predictions served and not scored yet: the last probabilities served per model and candle.
live_predictions = sa.Table(
    "live_predictions",
    metadata,
    sa.Column("model_id", sa.String(64), primary_key=True),
    sa.Column("open_time", sa.BigInteger, primary_key=True),
    sa.Column("symbol", sa.String(64), nullable=False),
    sa.Column("timeframe", sa.String(8), nullable=False),
    sa.Column("p_down", sa.Float(53), nullable=False),
    sa.Column("p_range", sa.Float(53), nullable=False),
    sa.Column("p_up", sa.Float(53), nullable=False),
    sa.Column("served_at", sa.BigInteger, nullable=False),
    sa.Index("ix_live_predictions_market", "symbol", "timeframe", "open_time"),
    sa.Index("ix_live_predictions_served", "served_at"),
)

# One score per model and candle: the probabilities served (final version), the realised label (0 down, 1 range,
# 2 up), and per row the log loss, the training prior's log loss and the multiclass Brier score.
live_scores = sa.Table(
    "live_scores",
    metadata,
    sa.Column("model_id", sa.String(64), primary_key=True),
    sa.Column("open_time", sa.BigInteger, primary_key=True),
    sa.Column("symbol", sa.String(64), nullable=False),
    sa.Column("timeframe", sa.String(8), nullable=False),
    sa.Column("label", sa.SmallInteger, nullable=False),
    sa.Column("p_down", sa.Float(53), nullable=False),
    sa.Column("p_range", sa.Float(53), nullable=False),
    sa.Column("p_up", sa.Float(53), nullable=False),
    sa.Column("loss", sa.Float(53), nullable=False),
    sa.Column("prior_loss", sa.Float(53), nullable=False),
    sa.Column("brier", sa.Float(53), nullable=False),
    sa.Column("scored_at", sa.BigInteger, nullable=False),
    sa.Index("ix_live_scores_scored", "scored_at"),
)

# One row per market the journal has seen: `version` grows with every change to the market's candles or pending
# predictions (a journal whose copy is older reads them again), and its row is locked while a journal changes them,
# so the replicas sharing the database take turns per market; `last_candle_ms` is the newest candle any of them
# received.
live_markets = sa.Table(
    "live_markets",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("timeframe", sa.String(8), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("last_candle_ms", sa.BigInteger, nullable=True),
)

# -- retrain policies (shared.store.policies; run by training_service.policies) -------------------------------------
# One policy per market: retrain every `every_ms` on the last `window_ms` of closed candles. `label` and `params` are
# JSON as training requests store them. `next_run_at` is when it is next due; a replica that claims a due policy
# advances it and holds the lease (`lease_owner` until `lease_until`) while it submits the job. `last_job_state` is
# the state of `last_job_id` as last recorded (QUEUED or RUNNING until its end has been recorded in `last_outcome`).
retrain_policies = sa.Table(
    "retrain_policies",
    metadata,
    sa.Column("symbol", sa.String(64), primary_key=True),
    sa.Column("timeframe", sa.String(8), primary_key=True),
    sa.Column("every_ms", sa.BigInteger, nullable=False),
    sa.Column("window_ms", sa.BigInteger, nullable=False),
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("params", sa.Text, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("cross_validate", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("next_run_at", sa.BigInteger, nullable=False),
    sa.Column("last_job_id", sa.String(64), nullable=False, server_default=""),
    sa.Column("last_job_state", sa.String(16), nullable=False, server_default=""),
    sa.Column("last_outcome", sa.Text, nullable=False, server_default=""),
    sa.Column("lease_owner", sa.String(64), nullable=True),
    sa.Column("lease_until", sa.BigInteger, nullable=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("updated_at", sa.BigInteger, nullable=False),
    sa.Index("ix_retrain_policies_due", "next_run_at"),
)
