"""Live outcome monitoring tables: the prediction journal and the live scores (see `inference_service.journal`).

* `live_markets`: per market, a version that grows with every change to its candles or pending predictions, and the
  newest candle received; a journal locks the rows of the markets it changes until its transaction ends
  (`lock_markets`), so journals sharing the database (inference replicas) take turns per market and each can tell
  whether another changed a market since it last did;
* `live_candles`: per market, the last close received for each candle, kept while a pending prediction may need it;
* `live_predictions`: ready, out-of-sample predictions served and not scored yet, the last version per model and
  candle;
* `live_scores`: one row per model and candle, written once (a second score for the same key is ignored, whichever
  journal writes it).

Times are UTC epoch milliseconds. Every write of one journal batch happens in one transaction, after the rows of its
markets are locked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from shared.calibration import EPS
from shared.store.db import live_candles, live_markets, live_predictions, live_scores

# Rows per statement when rows are deleted by key.
_CHUNK = 500

Market = tuple[str, str]  # (symbol, timeframe)


def _insert(dialect: str, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise NotImplementedError(f"live monitoring supports SQLite and PostgreSQL, not {dialect}")


def _upsert(conn: sa.Connection, table: sa.Table, rows: list[dict], update: Sequence[str]) -> None:
    """INSERT ... ON CONFLICT (primary key) DO UPDATE SET the `update` columns."""
    if not rows:
        return
    stmt = _insert(conn.dialect.name, table)
    stmt = stmt.on_conflict_do_update(index_elements=[c.name for c in table.primary_key.columns],
                                      set_={name: stmt.excluded[name] for name in update})
    conn.execute(stmt, rows)


def _insert_new(conn: sa.Connection, table: sa.Table, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: a key already stored keeps its row."""
    if rows:
        conn.execute(_insert(conn.dialect.name, table).on_conflict_do_nothing(), rows)


# -- markets --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MarketRow:
    """A market's row: its version and the newest candle any journal received for it (None: none yet)."""

    version: int
    last_candle_ms: int | None


def lock_markets(conn: sa.Connection, keys: Iterable[Market], *, bump: bool = True) -> dict[Market, MarketRow]:
    """Lock the row of each market (created when missing) until the transaction ends, and with `bump` advance its
    version: a journal that changes a market's candles or pending predictions bumps it, one that only deletes what no
    journal needs does not. The rows are locked in key order, so two transactions never wait on each other in a
    cycle. Returns each market's row as it is now."""
    ordered = sorted(set(keys))
    m = live_markets.c
    step = 1 if bump else 0
    out: dict[Market, MarketRow] = {}
    for start in range(0, len(ordered), _CHUNK):  # one statement per chunk: its rows are locked in their order
        stmt = _insert(conn.dialect.name, live_markets).values(
            [{"symbol": s, "timeframe": tf, "version": step, "last_candle_ms": None}
             for s, tf in ordered[start:start + _CHUNK]])
        stmt = stmt.on_conflict_do_update(index_elements=["symbol", "timeframe"], set_={"version": m.version + step})
        for row in conn.execute(stmt.returning(m.symbol, m.timeframe, m.version, m.last_candle_ms)):
            out[(row[0], row[1])] = MarketRow(int(row[2]), None if row[3] is None else int(row[3]))
    return out


# -- one journal batch ----------------------------------------------------------------------------------------------


@dataclass
class JournalWrite:
    """Everything one journal batch writes, in one transaction."""

    candles: list[dict] = field(default_factory=list)  # symbol, timeframe, open_time, close, received_at
    predictions: list[dict] = field(default_factory=list)  # model_id, open_time, symbol, timeframe, p_*, served_at
    scores: list[dict] = field(default_factory=list)  # the live_scores columns
    resolved: list[tuple[str, int]] = field(default_factory=list)  # (model_id, open_time) no longer pending
    last_candles: dict[Market, int] = field(default_factory=dict)  # a market's newest candle, where it advanced

    def __bool__(self) -> bool:
        return bool(self.candles or self.predictions or self.scores or self.resolved or self.last_candles)


def write(conn: sa.Connection, batch: JournalWrite) -> None:
    """Store one journal batch in the caller's transaction (the markets locked): candles and pending predictions (the
    newest version wins), new scores (a key already scored keeps its score), the predictions no longer pending
    removed, and each market's newest candle."""
    _upsert(conn, live_candles, batch.candles, ("close", "received_at"))
    _upsert(conn, live_predictions, batch.predictions, ("p_down", "p_range", "p_up", "served_at"))
    _insert_new(conn, live_scores, batch.scores)
    if batch.resolved:
        p = live_predictions.c
        stmt = sa.delete(live_predictions).where(p.model_id == sa.bindparam("m"), p.open_time == sa.bindparam("t"))
        for start in range(0, len(batch.resolved), _CHUNK):
            conn.execute(stmt, [{"m": m, "t": t} for m, t in batch.resolved[start:start + _CHUNK]])
    if batch.last_candles:
        m = live_markets.c
        conn.execute(sa.update(live_markets)
                     .where(m.symbol == sa.bindparam("s"), m.timeframe == sa.bindparam("tf"))
                     .values(last_candle_ms=sa.bindparam("last")),
                     [{"s": s, "tf": tf, "last": last} for (s, tf), last in batch.last_candles.items()])


@dataclass
class MarketJournal:
    """What the journal holds for one market: pending predictions per model (times sorted, probabilities (n, 3) in
    CLASSES order) and the candles at or after the oldest of them (times sorted, closes)."""

    pending: dict[str, tuple[np.ndarray, np.ndarray]]
    candle_times: np.ndarray
    candle_closes: np.ndarray


def read_market(conn: sa.Connection, symbol: str, timeframe: str) -> MarketJournal:
    p, c = live_predictions.c, live_candles.c
    rows = conn.execute(
        sa.select(p.model_id, p.open_time, p.p_down, p.p_range, p.p_up)
        .where(p.symbol == symbol, p.timeframe == timeframe).order_by(p.model_id, p.open_time)
    ).all()
    pending: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    by_model: dict[str, list] = {}
    for row in rows:
        by_model.setdefault(row[0], []).append(row[1:])
    for model_id, items in by_model.items():
        arr = np.array(items, dtype=np.float64)
        pending[model_id] = (np.array([r[0] for r in items], dtype=np.int64), arr[:, 1:4].copy())
    times = np.empty(0, np.int64)
    closes = np.empty(0)
    if pending:
        oldest = min(int(t[0]) for t, _ in pending.values())
        candle_rows = conn.execute(
            sa.select(c.open_time, c.close)
            .where(c.symbol == symbol, c.timeframe == timeframe, c.open_time >= oldest).order_by(c.open_time)
        ).all()
        if candle_rows:
            times = np.array([r[0] for r in candle_rows], dtype=np.int64)
            closes = np.array([r[1] for r in candle_rows], dtype=np.float64)
    return MarketJournal(pending, times, closes)


def scored_times(conn: sa.Connection, model_id: str) -> np.ndarray:
    """Open times already scored for a model, sorted."""
    s = live_scores.c
    rows = conn.execute(sa.select(s.open_time).where(s.model_id == model_id).order_by(s.open_time)).all()
    return np.array([r[0] for r in rows], dtype=np.int64)


# -- reading scores -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreSummary:
    scored: int
    loss_sum: float
    prior_loss_sum: float
    entropy_sum: float = 0.0  # of the scored probabilities: the log loss they expect


def _entropy_sum(dialect: str, s) -> sa.ColumnElement:
    """SUM over rows of -sum_c p_c ln(max(p_c, EPS)), as `shared.drift.entropy` computes it."""
    floor = sa.func.greatest if dialect == "postgresql" else sa.func.max  # SQLite's two-argument max is scalar
    terms = [col * sa.func.ln(floor(col, EPS)) for col in (s.p_down, s.p_range, s.p_up)]
    return -sa.func.sum(terms[0] + terms[1] + terms[2])


def summaries(engine: sa.Engine, model_ids: Iterable[str]) -> dict[str, ScoreSummary]:
    """Count and sums of log loss, prior log loss and entropy per model (models without scores are left out)."""
    ids = list(dict.fromkeys(model_ids))
    s = live_scores.c
    out: dict[str, ScoreSummary] = {}
    entropy = _entropy_sum(engine.dialect.name, s)
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            q = (sa.select(s.model_id, sa.func.count(), sa.func.sum(s.loss), sa.func.sum(s.prior_loss), entropy)
                 .where(s.model_id.in_(ids[start:start + _CHUNK])).group_by(s.model_id))
            for model_id, n, loss, prior, ent in conn.execute(q):
                out[model_id] = ScoreSummary(int(n), float(loss or 0.0), float(prior or 0.0), float(ent or 0.0))
    return out


@dataclass(frozen=True)
class Scores:
    """A model's live scores, oldest first."""

    open_time_ms: np.ndarray  # int64
    proba: np.ndarray  # (n, 3) in CLASSES order
    label: np.ndarray  # int8 class codes
    loss: np.ndarray
    prior_loss: np.ndarray
    brier: np.ndarray


def read_scores(engine: sa.Engine, model_id: str) -> Scores:
    s = live_scores.c
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(s.open_time, s.p_down, s.p_range, s.p_up, s.label, s.loss, s.prior_loss, s.brier)
            .where(s.model_id == model_id).order_by(s.open_time)
        ).all()
    arr = np.array(rows, dtype=np.float64).reshape(len(rows), 8)
    return Scores(np.array([r[0] for r in rows], dtype=np.int64), arr[:, 1:4].copy(), arr[:, 4].astype(np.int8),
                  arr[:, 5].copy(), arr[:, 6].copy(), arr[:, 7].copy())


# -- maintenance ----------------------------------------------------------------------------------------------------


def prune_candles(conn: sa.Connection, keys: Iterable[Market], received_before: int) -> int:
    """Delete each market's candles that no prediction pending now needs (those before the oldest pending one; all of
    them when none is pending), except those received at or after `received_before`. The bound is read in the same
    statement as the delete, with the markets locked by the caller (`lock_markets`), so a prediction written by a
    batch in between is always seen. Returns the candles deleted."""
    c, p = live_candles.c, live_predictions.c
    deleted = 0
    for symbol, timeframe in keys:
        oldest = (sa.select(sa.func.min(p.open_time)).where(p.symbol == symbol, p.timeframe == timeframe)
                  .scalar_subquery())
        q = sa.delete(live_candles).where(c.symbol == symbol, c.timeframe == timeframe,
                                          c.received_at < received_before,
                                          sa.or_(oldest.is_(None), c.open_time < oldest))
        deleted += int(conn.execute(q).rowcount or 0)
    return deleted


def expire_scores(conn: sa.Connection, before_ms: int) -> list[tuple[str, int]]:
    """Delete the scores scored before `before_ms` (wall clock); returns their (model_id, open_time)."""
    s = live_scores.c
    rows = conn.execute(sa.delete(live_scores).where(s.scored_at < before_ms).returning(s.model_id, s.open_time))
    return [(r[0], int(r[1])) for r in rows]


def expiring_markets(conn: sa.Connection, before_ms: int) -> list[Market]:
    """The markets with predictions served or candles received before `before_ms` (wall clock)."""
    p, c = live_predictions.c, live_candles.c
    q = sa.union(sa.select(p.symbol, p.timeframe).where(p.served_at < before_ms),
                 sa.select(c.symbol, c.timeframe).where(c.received_at < before_ms))
    return sorted((r[0], r[1]) for r in conn.execute(q))


@dataclass(frozen=True)
class Expired:
    """What expiry deleted from one market: pending predictions (model_id, open_time) and candles (open times)."""

    predictions: list[tuple[str, int]]
    candles: list[int]


def expire_market(conn: sa.Connection, key: Market, before_ms: int) -> Expired:
    """Delete one market's predictions served and candles received before `before_ms` (the market locked by the
    caller); returns what was deleted."""
    symbol, timeframe = key
    p, c = live_predictions.c, live_candles.c
    preds = conn.execute(sa.delete(live_predictions)
                         .where(p.symbol == symbol, p.timeframe == timeframe, p.served_at < before_ms)
                         .returning(p.model_id, p.open_time))
    predictions = [(r[0], int(r[1])) for r in preds]
    candles = conn.execute(sa.delete(live_candles)
                           .where(c.symbol == symbol, c.timeframe == timeframe, c.received_at < before_ms)
                           .returning(c.open_time))
    return Expired(predictions, sorted(int(r[0]) for r in candles))
