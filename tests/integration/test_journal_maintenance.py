"""The prediction journal on a real database, SQLite and PostgreSQL, with a wall clock the test sets: which candles
maintenance prunes (decided from the predictions pending when it runs), what expiry forgets (only what it deleted),
whose predictions are scored (every stage but RESEARCH), and migration 0007 (the journal's markets).

Candles are hourly from T0; candle i is received an hour after it opens (the clock reads its close time). Models
have a 2-candle horizon, so prediction i is scored once candle i + 3 has arrived.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command

from inference_service.domain import CandleBatch, Predictions
from inference_service.journal import MAINTENANCE_SECONDS, PRUNE_GRACE_SECONDS, Journal
from shared.features import FeatureSpec
from shared.labels import CLASSES, LabelSpec, make_labels
from shared.params import ForestParams
from shared.store import live
from shared.store.db import live_candles, live_markets, live_predictions, live_scores, make_engine
from shared.store.migrate import alembic_config, current_revision, head_revision, upgrade
from shared.store.registry import CANDIDATE, RESEARCH, RETIRED, SERVING, ModelRecord, insert_model

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
HORIZON = 2
JOURNAL_TABLES = ("live_predictions", "live_candles", "live_scores")


class Clock:
    """The journal's wall clock, set by the test (milliseconds)."""

    def __init__(self, ms: int = T0) -> None:
        self.ms = ms

    def __call__(self) -> float:
        return self.ms / 1000


def t(i: int) -> int:
    return T0 + i * H


def closes(n: int, seed: int = 0) -> np.ndarray:
    """A random walk with moves large enough to cross the 1 % threshold both ways."""
    return 100 * np.exp(np.cumsum(np.random.default_rng(seed).normal(0, 0.012, n)))


def proba(i: int, model_id: str = "") -> np.ndarray:
    """Probabilities that differ per candle and per model."""
    rng = np.random.default_rng([i, sum(map(ord, model_id))])
    return rng.dirichlet([2, 2, 2])


def register(engine: sa.Engine, symbol: str, stage: str = SERVING, model_id: str | None = None) -> SimpleNamespace:
    """A model in the registry (its artifact is never read here), as the journal receives it with an answer."""
    rec = ModelRecord(
        model_id=model_id or uuid.uuid4().hex, symbol=symbol, timeframe="1h", created_at_ms=T0 - 10 * H,
        train_start_ms=T0 - 1000 * H, train_end_ms=T0 - H, label=LabelSpec(HORIZON, 0.01), feature_spec=FeatureSpec(),
        params=ForestParams(n_estimators=5), classes=CLASSES, prior=(0.25, 0.5, 0.25), shrink_weight=1.0,
        metrics={}, artifact="unused.onnx", sha256="0" * 64, stage=stage)
    with engine.begin() as conn:
        insert_model(conn, rec)
    return SimpleNamespace(record=rec)


def answer(model: SimpleNamespace, rows: list[int], series: np.ndarray,
           ready: bool = True) -> tuple[Predictions, CandleBatch]:
    """An answer over candles `rows` of `series`, with the model's probabilities for each."""
    times = np.array([t(i) for i in rows], dtype=np.int64)
    c = np.asarray(series, dtype=np.float64)[rows]
    n = len(rows)
    nan = np.full(n, np.nan)
    p = np.array([proba(i, model.record.model_id) for i in rows])
    return (Predictions(times.copy(), p, np.full(n, ready), times <= model.record.train_end_ms),
            CandleBatch(times, c, c, c, c, np.ones(n), nan, nan))


def send(journal: Journal, clock: Clock, model: SimpleNamespace, i: int, series: np.ndarray,
         ready: bool = True) -> None:
    """Candle i (one message of a stream) answered and journaled at its close (or now, when that is later)."""
    clock.ms = max(clock.ms, t(i + 1))
    journal.record(model, *answer(model, [i], series, ready))
    journal.flush()


def scores(engine: sa.Engine, model_id: str) -> dict[int, tuple[int, float]]:
    """open time -> (label, loss) of a model's live scores."""
    s = live.read_scores(engine, model_id)
    return {int(k): (int(y), float(v)) for k, y, v in zip(s.open_time_ms, s.label, s.loss, strict=True)}


def expected(series: np.ndarray, received: int, predicted: list[int], model_id: str) -> dict[int, tuple[int, float]]:
    """The independent computation: prediction i is scored when candles 0..received-1 include i + h + 1."""
    labels = make_labels(series[:received], LabelSpec(HORIZON, 0.01), np.array([t(i) for i in range(received)]), H)
    out = {}
    for i in predicted:
        if i + HORIZON + 1 < received and labels[i] >= 0:
            out[t(i)] = (int(labels[i]), float(-np.log(proba(i, model_id)[labels[i]])))
    return out


def rows(engine: sa.Engine, table: sa.Table, *where) -> list[tuple]:
    c = table.c
    cols = [c.open_time] if table is live_candles else [c.model_id, c.open_time]
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.select(*cols).where(*where).order_by(*cols))]


@pytest.fixture
def engine(db_url):
    eng = make_engine(db_url)
    yield eng
    eng.dispose()


# -- pruning ---------------------------------------------------------------------------------------------------------


def test_the_prune_keeps_the_candles_of_predictions_pending_when_it_runs(engine):
    """Everything resolved, then new predictions pending before maintenance runs: the prune spares their candles,
    and after a restart every prediction is scored when its label is realised."""
    model = register(engine, "PRUNE/USD")
    series = closes(20)
    clock = Clock()
    journal = Journal(engine, clock=clock)
    for i in range(6):
        send(journal, clock, model, i, series)
    for i in range(6, 9):  # candles only: they realise predictions 0..5
        send(journal, clock, model, i, series, ready=False)
    assert rows(engine, live_predictions) == []  # everything resolved
    for i in (9, 10):  # new predictions, within the maintenance interval
        send(journal, clock, model, i, series)
    clock.ms += int(PRUNE_GRACE_SECONDS * 1000) + 1
    journal.maintain()
    c = live_candles.c
    assert rows(engine, live_candles, c.symbol == "PRUNE/USD") == [(t(9),), (t(10),)]  # what 9 and 10 need, only

    journal.stop()
    restarted = Journal(engine, clock=clock)  # a restart: a new journal on the same database
    for i in range(11, 14):
        send(restarted, clock, model, i, series, ready=False)
    restarted.stop()
    want = expected(series, 14, [0, 1, 2, 3, 4, 5, 9, 10], model.record.model_id)
    assert t(9) in want and t(10) in want
    got = scores(engine, model.record.model_id)
    assert set(got) == set(want)
    for k, (label, loss) in want.items():
        assert got[k][0] == label and got[k][1] == pytest.approx(loss, rel=1e-12)


def test_recent_candles_outlive_a_prune_for_the_grace_period(engine):
    """A candle no prediction pending here needs survives the prune while it is recent (another replica may not have
    written the prediction that needs it yet), and goes at the first maintenance after the grace period."""
    model = register(engine, "GRACE/USD")
    series = closes(10)
    clock = Clock()
    journal = Journal(engine, clock=clock)
    for i in range(4):
        send(journal, clock, model, i, series, ready=False)  # candles, nothing pending
    c = live_candles.c
    assert rows(engine, live_candles, c.symbol == "GRACE/USD") == [(t(i),) for i in range(4)]  # each the newest
    journal.maintain()
    assert rows(engine, live_candles, c.symbol == "GRACE/USD") == [(t(3),)]  # received within the grace period
    clock.ms += int(max(PRUNE_GRACE_SECONDS, MAINTENANCE_SECONDS) * 1000) + 1
    journal.maintain()
    assert rows(engine, live_candles, c.symbol == "GRACE/USD") == []
    journal.stop()


# -- expiry ----------------------------------------------------------------------------------------------------------


def test_expiry_forgets_only_what_it_deleted(engine):
    """One market's rows pass the retention, another's do not: maintenance deletes the first market's rows, and the
    journal goes on scoring the second from what it holds, without reading the journal's tables again; the expired
    predictions are never scored."""
    old, new = register(engine, "OLD/USD"), register(engine, "NEW/USD")
    series = closes(60, seed=3)
    clock = Clock()
    journal = Journal(engine, retention_days=1, clock=clock)
    for i in range(6):  # OLD: 0..2 scored, 3..5 pending
        send(journal, clock, old, i, series)
    for i in range(48, 54):  # two days later, NEW: 48..50 scored, 51..53 pending
        send(journal, clock, new, i, series)
    assert len(scores(engine, old.record.model_id)) == 3 and len(scores(engine, new.record.model_id)) == 3
    p = live_predictions.c
    new_pending = rows(engine, live_predictions, p.symbol == "NEW/USD")

    journal.maintain()
    assert scores(engine, old.record.model_id) == {}
    assert rows(engine, live_predictions, p.symbol == "OLD/USD") == []
    assert rows(engine, live_candles, live_candles.c.symbol == "OLD/USD") == []
    assert len(scores(engine, new.record.model_id)) == 3
    assert rows(engine, live_predictions, p.symbol == "NEW/USD") == new_pending

    statements: list[str] = []

    def statement(conn, cursor, text, *args) -> None:
        statements.append(text)

    sa.event.listen(engine, "before_cursor_execute", statement)
    try:
        for i in (54, 55):
            send(journal, clock, new, i, series, ready=False)
        for i in range(6, 10):  # OLD's candles come back: they would realise the expired predictions
            send(journal, clock, old, i, series, ready=False)
    finally:
        sa.event.remove(engine, "before_cursor_execute", statement)
    reads = [s for s in statements if s.lstrip().upper().startswith("SELECT") and any(n in s for n in JOURNAL_TABLES)]
    assert reads == []
    assert scores(engine, old.record.model_id) == {}
    got = scores(engine, new.record.model_id)
    assert set(got) == set(expected(series, 56, list(range(48, 54)), new.record.model_id)) == {
        t(i) for i in range(48, 53)}
    journal.stop()


# -- stages ----------------------------------------------------------------------------------------------------------


def test_research_predictions_are_not_scored_production_ones_are(engine):
    """A RESEARCH model pinned by model_id is not scored as live (nor kept pending, nor a research prediction
    journaled by an older version), but the candles its answers carried count; SERVING, SHADOW, CANDIDATE and RETIRED
    models are scored."""
    symbol = "STAGE/USD"
    research = register(engine, symbol, RESEARCH)
    production = [register(engine, symbol, stage) for stage in (CANDIDATE, RETIRED, SERVING)]
    serving = production[-1]
    shadow = SimpleNamespace(record=replace(serving.record, model_id=uuid.uuid4().hex, stage="SHADOW"))
    production.append(shadow)
    with engine.begin() as conn:  # a research prediction journaled before research models were left out
        conn.execute(live_predictions.insert().values(model_id=research.record.model_id, open_time=t(1),
                                                      symbol=symbol, timeframe="1h", p_down=0.2, p_range=0.5,
                                                      p_up=0.3, served_at=T0))
    series = closes(12, seed=5)
    clock = Clock()
    journal = Journal(engine, clock=clock)
    for i in range(5):
        for m in (*production, research):
            send(journal, clock, m, i, series)
    for i in range(5, 8):  # the later candles arrive with research answers only
        send(journal, clock, research, i, series)
    journal.stop()
    assert scores(engine, research.record.model_id) == {}
    p = live_predictions.c
    assert rows(engine, live_predictions, p.model_id == research.record.model_id) == []
    for m in production:
        want = expected(series, 8, list(range(5)), m.record.model_id)
        assert len(want) == 5
        got = scores(engine, m.record.model_id)
        assert set(got) == set(want), m.record.stage
        assert all(got[k][1] == pytest.approx(v[1], rel=1e-12) for k, v in want.items())


# -- migration 0007 ----------------------------------------------------------------------------------------------------


def _migrate_0007(url: str) -> None:
    assert upgrade(url, "0006") == "0006"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            for symbol, times in (("A/USD", (t(0), t(1), t(2))), ("B/USD", (t(5),))):
                for k in times:
                    conn.execute(live_candles.insert().values(symbol=symbol, timeframe="1h", open_time=k, close=1.0,
                                                              received_at=T0))
        assert upgrade(url) == head_revision() == "0007"
        with engine.connect() as conn:
            got = {(r.symbol, r.version, r.last_candle_ms) for r in conn.execute(sa.select(live_markets))}
        assert got == {("A/USD", 1, t(2)), ("B/USD", 1, t(5))}
        cfg = alembic_config(url)
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0006")
        assert current_revision(engine) == "0006"
        assert "live_markets" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(live_candles)).scalar() == 4
        assert upgrade(url) == "0007"
    finally:
        engine.dispose()


def test_migration_0007_up_and_down_sqlite(tmp_path):
    """0007 adds the journal's markets to a database that journaled already (each market's newest candle carried
    over), and comes off again."""
    _migrate_0007(f"sqlite:///{tmp_path}/old.db")


@pytest.mark.postgres
def test_migration_0007_up_and_down_postgresql(pg_server):
    from conftest import _admin_connect

    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        _migrate_0007(sa.engine.make_url(pg_server).set(database=name).render_as_string(hide_password=False))
    finally:
        with _admin_connect(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_the_markets_table_is_the_migrated_one(engine):
    """The schema the migrations build holds the journal's markets as `shared.store.db` declares them."""
    columns = {c["name"]: c for c in sa.inspect(engine).get_columns("live_markets")}
    assert set(columns) == {c.name for c in live_markets.columns}
    assert not columns["version"]["nullable"] and columns["last_candle_ms"]["nullable"]
    assert sa.inspect(engine).get_pk_constraint("live_markets")["constrained_columns"] == ["symbol", "timeframe"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(live_scores)).scalar() == 0
