"""The candle store: stored candles, funding rates and open interest, and how they are read back for modelling.

Candles come back with funding rate and open interest joined as of each candle's close, backward only: a candle sees
the latest value published at or before its close and never one published later, so no feature can peek into the
future. Where no value had been published yet the column stays NaN; nothing is filled from later values or from
statistics of the whole series.

Inserts are idempotent (a key that is already stored is skipped, never updated) and happen in one transaction, so a
re-import changes nothing and a failed import stores nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from shared.errors import FailedPrecondition, InvalidArgument, Unavailable
from shared.store.db import candles, funding_rates, open_interest
from shared.store.importers import SERIES_KINDS, check_candles, check_series
from shared.symbols import validate_symbol
from shared.timeframes import TIMEFRAME_MS, timeframe_ms

CANDLE_FRAME_COLUMNS = ("open_time_ms", "open", "high", "low", "close", "volume", "funding_rate", "open_interest")
SERIES_TABLES: dict[str, sa.Table] = {"funding-rate": funding_rates, "open-interest": open_interest}
# Rows per progress step. SQLAlchemy splits each chunk further into statements below the dialect's parameter limit
# (PostgreSQL 65535, SQLite 32766 or 999 before 3.32).
_CHUNK_ROWS = 5_000


def _timeframe(timeframe: str) -> int:
    try:
        return timeframe_ms(timeframe)
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="timeframe") from None


def _series_table(kind: str) -> sa.Table:
    try:
        return SERIES_TABLES[kind]
    except KeyError:
        raise InvalidArgument(
            f"kind {kind!r} is not a series; expected one of {', '.join(SERIES_KINDS)}", field="kind"
        ) from None


def _range_filter(col, start_ms: int | None, end_ms: int | None) -> list:
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise InvalidArgument(f"start_ms {start_ms} must be before end_ms {end_ms}", field="start_ms")
    conds = []
    if start_ms is not None:
        conds.append(col >= int(start_ms))
    if end_ms is not None:
        conds.append(col < int(end_ms))
    return conds


# --------------------------------------------------------------------------------------------------------------------
# reading


def load_candles(
    engine: sa.Engine, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
) -> pd.DataFrame:
    """Candles with open time in [start_ms, end_ms), oldest first, with funding rate and open interest as of each close.

    Columns: open_time_ms (int64); open, high, low, close, volume, funding_rate, open_interest (float64, NaN where no
    value had been published by the candle's close).
    """
    validate_symbol(symbol)
    tf_ms = _timeframe(timeframe)
    col = candles.c
    query = (
        sa.select(col.open_time, col.open, col.high, col.low, col.close, col.volume)
        .where(col.symbol == symbol, col.timeframe == timeframe, *_range_filter(col.open_time, start_ms, end_ms))
        .order_by(col.open_time)
    )
    with engine.connect() as conn:
        open_time, o, h, lo, c, v = _columns(conn.execute(query).all(), 6)
        closes = open_time + tf_ms
        joined = {kind: _asof(conn, SERIES_TABLES[kind], symbol, closes) for kind in SERIES_KINDS}
    return pd.DataFrame(
        {
            "open_time_ms": open_time,
            "open": o,
            "high": h,
            "low": lo,
            "close": c,
            "volume": v,
            "funding_rate": joined["funding-rate"],
            "open_interest": joined["open-interest"],
        }
    )


def _columns(rows: Sequence[Sequence[Any]], n: int) -> list[np.ndarray]:
    """Rows (time, value, ...) of n columns each as column arrays: the first int64, the rest float64."""
    cols = list(zip(*rows, strict=True)) or [()] * n
    return [np.array(col, dtype=np.int64 if i == 0 else np.float64) for i, col in enumerate(cols)]


def _asof(conn: sa.Connection, table: sa.Table, symbol: str, closes: np.ndarray) -> np.ndarray:
    """For each close time the value with the greatest time <= close, else NaN.

    Only the rows that can matter are read: those up to the last close, starting from the latest one at or before the
    first close.
    """
    out = np.full(closes.shape, np.nan)
    if closes.size == 0:
        return out
    first_close, last_close = int(closes[0]), int(closes[-1])
    t = table.c
    anchor = sa.select(sa.func.max(t.time)).where(t.symbol == symbol, t.time <= first_close).scalar_subquery()
    query = (
        sa.select(t.time, t.value)
        .where(t.symbol == symbol, t.time <= last_close, t.time >= sa.func.coalesce(anchor, first_close))
        .order_by(t.time)
    )
    times, values = _columns(conn.execute(query).all(), 2)
    if times.size == 0:
        return out
    idx = np.searchsorted(times, closes, side="right") - 1
    seen = idx >= 0
    out[seen] = values[idx[seen]]
    return out


def load_series(
    engine: sa.Engine, kind: str, symbol: str, start_ms: int | None = None, end_ms: int | None = None
) -> pd.DataFrame:
    """A stored series with time in [start_ms, end_ms), oldest first: columns time_ms (int64), value (float64)."""
    validate_symbol(symbol)
    t = _series_table(kind).c
    query = (
        sa.select(t.time, t.value)
        .where(t.symbol == symbol, *_range_filter(t.time, start_ms, end_ms))
        .order_by(t.time)
    )
    with engine.connect() as conn:
        times, values = _columns(conn.execute(query).all(), 2)
    return pd.DataFrame({"time_ms": times, "value": values})


def count_candles(
    engine: sa.Engine, symbol: str, timeframe: str, start_ms: int | None = None, end_ms: int | None = None
) -> int:
    """Number of stored candles with open time in [start_ms, end_ms)."""
    validate_symbol(symbol)
    _timeframe(timeframe)
    c = candles.c
    query = sa.select(sa.func.count()).where(
        c.symbol == symbol, c.timeframe == timeframe, *_range_filter(c.open_time, start_ms, end_ms)
    )
    with engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def summarize(engine: sa.Engine) -> list[dict]:
    """One dict per stored (symbol, timeframe): symbol, timeframe, first_ms, last_ms, rows, gaps.

    gaps counts the missing candle slots between the first and the last candle (None for a timeframe this version
    does not know).
    """
    c = candles.c
    query = sa.select(
        c.symbol, c.timeframe, sa.func.min(c.open_time), sa.func.max(c.open_time), sa.func.count()
    ).group_by(c.symbol, c.timeframe)
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    out = []
    for symbol, timeframe, first, last, n in rows:
        tf_ms = TIMEFRAME_MS.get(timeframe)
        gaps = None if tf_ms is None else (int(last) - int(first)) // tf_ms + 1 - int(n)
        out.append(
            {"symbol": symbol, "timeframe": timeframe, "first_ms": int(first), "last_ms": int(last), "rows": int(n),
             "gaps": gaps}
        )  # fmt: skip
    out.sort(key=lambda d: (d["symbol"], TIMEFRAME_MS.get(d["timeframe"], 0), d["timeframe"]))
    return out


def summarize_series(engine: sa.Engine) -> list[dict]:
    """One dict per stored (kind, symbol) of funding rates and open interest: kind, symbol, first_ms, last_ms, rows."""
    out = []
    with engine.connect() as conn:
        for kind, table in SERIES_TABLES.items():
            t = table.c
            query = sa.select(t.symbol, sa.func.min(t.time), sa.func.max(t.time), sa.func.count()).group_by(t.symbol)
            for symbol, first, last, n in conn.execute(query).all():
                out.append(
                    {"kind": kind, "symbol": symbol, "first_ms": int(first), "last_ms": int(last), "rows": int(n)}
                )
    out.sort(key=lambda d: (d["symbol"], d["kind"]))
    return out


# --------------------------------------------------------------------------------------------------------------------
# writing


def insert_candles(
    engine: sa.Engine,
    symbol: str,
    timeframe: str,
    df: pd.DataFrame,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Store validated candles in one transaction; returns (added, duplicates skipped).

    A candle whose (symbol, timeframe, open_time) is already stored is skipped and left as it is. `progress` is called
    with the number of rows written after each chunk.
    """
    validate_symbol(symbol)
    _timeframe(timeframe)
    frame = check_candles(df, timeframe)
    cols = [frame[name].tolist() for name in ("open_time_ms", "open", "high", "low", "close", "volume")]
    records = [(symbol, timeframe, *values) for values in zip(*cols, strict=True)]
    added = _insert_ignoring_existing(engine, candles, records, progress)
    return added, len(records) - added


def insert_series(
    engine: sa.Engine,
    kind: str,
    symbol: str,
    df: pd.DataFrame,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[int, int]:
    """Store a validated funding-rate or open-interest series (time_ms, value) in one transaction.

    Returns (added, duplicates skipped); a time already stored for the symbol is skipped and left as it is.
    """
    table = _series_table(kind)
    validate_symbol(symbol)
    frame = check_series(df, kind)
    records = [(symbol, t, v) for t, v in zip(frame["time_ms"].tolist(), frame["value"].tolist(), strict=True)]
    added = _insert_ignoring_existing(engine, table, records, progress)
    return added, len(records) - added


def _insert_ignoring_existing(
    engine: sa.Engine, table: sa.Table, records: list[tuple], progress: Callable[[int], None] | None
) -> int:
    """INSERT ... ON CONFLICT DO NOTHING of records (in table column order), all in one transaction; returns rows added.

    PostgreSQL with psycopg streams the rows with COPY into a temporary table and inserts from there, about ten times
    faster than bound parameters. Otherwise the rows go in chunks of executemany, which SQLAlchemy splits into
    multi-row VALUES statements below the dialect's parameter limit; RETURNING counts what was added, because
    executemany rowcount is not portable.
    """
    if not records:
        return 0
    insert = _insert_skipping_existing(engine.dialect.name, table)
    names = [c.name for c in table.columns]
    report = progress or (lambda n: None)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql" and engine.dialect.driver == "psycopg":
            stage = sa.table(f"_import_{table.name}", *(sa.column(n) for n in names))
            conn.exec_driver_sql(f"CREATE TEMP TABLE {stage.name} (LIKE {table.name}) ON COMMIT DROP")
            quoted = ", ".join(f'"{n}"' for n in names)
            driver_conn = conn.connection.driver_connection
            if driver_conn is None:  # only an invalidated connection has none
                raise Unavailable("the database connection was lost during the import")
            with driver_conn.cursor() as cur, cur.copy(f"COPY {stage.name} ({quoted}) FROM STDIN") as copy:
                for start in range(0, len(records), _CHUNK_ROWS):
                    part = records[start : start + _CHUNK_ROWS]
                    for record in part:
                        copy.write_row(record)
                    report(len(part))
            from_stage = insert.from_select(names, sa.select(stage))
            return conn.execute(from_stage.execution_options(preserve_rowcount=True)).rowcount
        counting = insert.returning(*table.primary_key.columns)
        added = 0
        for start in range(0, len(records), _CHUNK_ROWS):
            part = records[start : start + _CHUNK_ROWS]
            added += len(conn.execute(counting, [dict(zip(names, r, strict=True)) for r in part]).all())
            report(len(part))
        return added


def _insert_skipping_existing(dialect: str, table: sa.Table) -> sa.Insert:
    """INSERT ... ON CONFLICT DO NOTHING into table for the dialect."""
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    raise FailedPrecondition(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")
