"""Live outcome monitoring tables: the prediction journal and the live scores (see `inference_service.journal`).

* `live_candles`: per market, the last close received for each candle, kept while a pending prediction may need it;
* `live_predictions`: ready, out-of-sample predictions served and not scored yet, the last version per model and
  candle;
* `live_scores`: one row per model and candle, written once (a second score for the same key is ignored).

Times are UTC epoch milliseconds. Every write of one journal batch happens in one transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from shared.store.db import live_candles, live_predictions, live_scores

# Rows per statement when rows are deleted by key.
_CHUNK = 500


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


@dataclass
class JournalWrite:
    """Everything one journal batch writes, in one transaction."""

    candles: list[dict] = field(default_factory=list)  # symbol, timeframe, open_time, close, received_at
    predictions: list[dict] = field(default_factory=list)  # model_id, open_time, symbol, timeframe, p_*, served_at
    scores: list[dict] = field(default_factory=list)  # the live_scores columns
    resolved: list[tuple[str, int]] = field(default_factory=list)  # (model_id, open_time) no longer pending

    def __bool__(self) -> bool:
        return bool(self.candles or self.predictions or self.scores or self.resolved)


def write(engine: sa.Engine, batch: JournalWrite) -> None:
    """Store one journal batch: candles and pending predictions (the newest version wins), new scores (a key already
    scored keeps its score), and remove the predictions that were scored or expired."""
    with engine.begin() as conn:
        _upsert(conn, live_candles, batch.candles, ("close", "received_at"))
        _upsert(conn, live_predictions, batch.predictions, ("p_down", "p_range", "p_up", "served_at"))
        _insert_new(conn, live_scores, batch.scores)
        if batch.resolved:
            p = live_predictions.c
            stmt = sa.delete(live_predictions).where(p.model_id == sa.bindparam("m"),
                                                     p.open_time == sa.bindparam("t"))
            for start in range(0, len(batch.resolved), _CHUNK):
                conn.execute(stmt, [{"m": m, "t": t} for m, t in batch.resolved[start:start + _CHUNK]])


@dataclass
class MarketJournal:
    """What the journal holds for one market: pending predictions per model (times sorted, probabilities (n, 3) in
    CLASSES order) and the candles at or after the oldest of them (times sorted, closes)."""

    pending: dict[str, tuple[np.ndarray, np.ndarray]]
    candle_times: np.ndarray
    candle_closes: np.ndarray
    last_candle_ms: int | None


def read_market(engine: sa.Engine, symbol: str, timeframe: str) -> MarketJournal:
    p, c = live_predictions.c, live_candles.c
    with engine.connect() as conn:
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
            pending[model_id] = (arr[:, 0].astype(np.int64), arr[:, 1:4].copy())
        last = conn.execute(sa.select(sa.func.max(c.open_time))
                            .where(c.symbol == symbol, c.timeframe == timeframe)).scalar()
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
    return MarketJournal(pending, times, closes, None if last is None else int(last))


def scored_times(engine: sa.Engine, model_id: str) -> np.ndarray:
    """Open times already scored for a model, sorted."""
    s = live_scores.c
    with engine.connect() as conn:
        rows = conn.execute(sa.select(s.open_time).where(s.model_id == model_id).order_by(s.open_time)).all()
    return np.array([r[0] for r in rows], dtype=np.int64)


@dataclass(frozen=True)
class ScoreSummary:
    scored: int
    loss_sum: float
    prior_loss_sum: float


def summaries(engine: sa.Engine, model_ids: Iterable[str]) -> dict[str, ScoreSummary]:
    """Count and sums of log loss and prior log loss per model (models without scores are left out)."""
    ids = list(dict.fromkeys(model_ids))
    s = live_scores.c
    out: dict[str, ScoreSummary] = {}
    with engine.connect() as conn:
        for start in range(0, len(ids), _CHUNK):
            q = (sa.select(s.model_id, sa.func.count(), sa.func.sum(s.loss), sa.func.sum(s.prior_loss))
                 .where(s.model_id.in_(ids[start:start + _CHUNK])).group_by(s.model_id))
            for model_id, n, loss, prior in conn.execute(q):
                out[model_id] = ScoreSummary(int(n), float(loss or 0.0), float(prior or 0.0))
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
    return Scores(arr[:, 0].astype(np.int64), arr[:, 1:4].copy(), arr[:, 4].astype(np.int8), arr[:, 5].copy(),
                  arr[:, 6].copy(), arr[:, 7].copy())


def prune_candles(engine: sa.Engine, keep_from: dict[tuple[str, str], int | None]) -> None:
    """Delete each market's candles before the time given (all of them for None: nothing pending needs them)."""
    c = live_candles.c
    with engine.begin() as conn:
        for (symbol, timeframe), start in keep_from.items():
            q = sa.delete(live_candles).where(c.symbol == symbol, c.timeframe == timeframe)
            if start is not None:
                q = q.where(c.open_time < start)
            conn.execute(q)


def expire(engine: sa.Engine, before_ms: int) -> tuple[int, int, int]:
    """Delete scores scored, predictions served and candles received before `before_ms` (wall clock);
    returns the rows deleted from each, in that order."""
    with engine.begin() as conn:
        scores = conn.execute(sa.delete(live_scores).where(live_scores.c.scored_at < before_ms)).rowcount
        pending = conn.execute(
            sa.delete(live_predictions).where(live_predictions.c.served_at < before_ms)).rowcount
        candles = conn.execute(sa.delete(live_candles).where(live_candles.c.received_at < before_ms)).rowcount
    return int(scores or 0), int(pending or 0), int(candles or 0)
