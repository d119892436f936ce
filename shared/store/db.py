"""Database schema (SQLAlchemy Core) and engine creation. Alembic migrations in shared/store/migrations create it."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event

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
    """Engine for a URL; creates the directory of a SQLite file and sets SQLite up for concurrent readers."""
    if url.startswith("sqlite"):
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
    return sa.create_engine(url, pool_pre_ping=True)
