"""Migrations 0005 (retrain policies) and 0006 (their cross-validation switch) up and down on a database that already
holds data, SQLite and PostgreSQL."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest
import sqlalchemy as sa
from alembic import command

from shared.labels import LabelSpec
from shared.params import ForestParams
from shared.store import policies
from shared.store.db import make_engine
from shared.store.migrate import alembic_config, current_revision, upgrade


def _exercise(url: str) -> None:
    assert upgrade(url, "0004") == "0004"
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume) VALUES "
                "('BTC/USD', '1h', 0, 1, 2, 0.5, 1.5, 10)"))
        assert "retrain_policies" not in sa.inspect(engine).get_table_names()

        assert upgrade(url, "0005") == "0005"
        with engine.begin() as conn:  # a policy stored before 0006 keeps running without cross-validation
            conn.execute(sa.text(
                "INSERT INTO retrain_policies (symbol, timeframe, every_ms, window_ms, label, params, next_run_at, "
                "created_at, updated_at) VALUES ('OLD/USD', '1h', 3600000, 86400000000, "
                "'{\"horizon_bars\": 24, \"kind\": \"fixed_horizon\", \"threshold\": 0.02}', '{}', 5, 5, 5)"))
        assert upgrade(url, "0006") == "0006"
        old = policies.get(engine, "OLD/USD", "1h")
        assert old is not None and old.cross_validate is False and old.next_run_at_ms == 5
        assert policies.delete(engine, "OLD/USD", "1h") == old
        stored = policies.put(engine, policies.RetrainPolicy(
            "BTC/USD", "1h", every_ms=86_400_000, window_ms=365 * 86_400_000,
            label=LabelSpec(horizon_bars=12, threshold=0.01, kind="triple_barrier"),
            params=ForestParams(n_estimators=50, max_depth=None), paused=True, cross_validate=True), now_ms=1_000)
        assert stored.next_run_at_ms == 1_000 and stored.paused and stored.last_outcome == ""
        assert stored.cross_validate
        assert policies.get(engine, "BTC/USD", "1h") == stored
        assert stored.label.kind == "triple_barrier" and stored.params.max_depth is None
        assert policies.newest_closed_candle(engine, "BTC/USD", "1h", 3_600_000) == 0
        assert policies.newest_closed_candle(engine, "BTC/USD", "1h", 3_599_999) is None
        # claim, release, replace and delete work on this database
        unpaused = policies.put(engine, replace(stored, paused=False), now_ms=2_000)
        assert unpaused.next_run_at_ms == 1_000 and not unpaused.paused
        claimed = policies.claim(engine, unpaused, "replica-a", now_ms=3_000, lease_ms=60_000)
        assert claimed is not None and claimed.next_run_at_ms == 1_000 + 86_400_000
        assert policies.claim(engine, unpaused, "replica-b", now_ms=3_000, lease_ms=60_000) is None
        assert policies.due(engine, 50_000) == []  # claimed: next due a day later
        owed = policies.due(engine, 63_000)  # the lease expired unreleased: the claim was abandoned, still owed
        assert [(p.lease_owner, p.next_run_at_ms) for p in owed] == [("replica-a", 1_000 + 86_400_000)]
        assert [p.lease_owner for p in policies.due(engine, 2 * 86_400_000)] == ["replica-a"]  # the lease expired
        assert policies.release(engine, claimed, "replica-a", 3_000, last_outcome="skipped: test")
        faster = policies.put(engine, replace(stored, every_ms=3_600_000, paused=False, cross_validate=False),
                              now_ms=4_000)
        assert faster.next_run_at_ms == 4_000 + 3_600_000 and faster.last_outcome == "skipped: test"
        assert not faster.cross_validate
        assert policies.delete(engine, "BTC/USD", "1h") == faster
        assert policies.delete(engine, "BTC/USD", "1h") is None

        with engine.begin() as conn:
            command.downgrade(_config(url, conn), "0004")
        assert current_revision(engine) == "0004"
        assert "retrain_policies" not in sa.inspect(engine).get_table_names()
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM candles")).scalar() == 1
        upgrade(url)
        assert policies.list_policies(engine) == []
    finally:
        engine.dispose()


def _config(url: str, conn: sa.Connection):
    cfg = alembic_config(url)
    cfg.attributes["connection"] = conn
    return cfg


def test_migrations_0005_0006_up_and_down_sqlite(tmp_path):
    _exercise(f"sqlite:///{tmp_path}/old.db")


@pytest.mark.postgres
def test_migrations_0005_0006_up_and_down_postgresql(pg_server):
    from conftest import _admin_connect

    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    try:
        _exercise(url)
    finally:
        with _admin_connect(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_claim_abandoned_by_a_replica_that_stopped_is_run_by_another(tmp_path):
    """Replica A claims a due time and stops before it records a job: once A's lease expires, replica B claims the
    same due time (the schedule is not advanced twice), and A's late release changes nothing."""
    url = f"sqlite:///{tmp_path}/claims.db"
    upgrade(url)
    engine = make_engine(url)
    try:
        day = 86_400_000
        stored = policies.put(engine, policies.RetrainPolicy("BTC/USD", "1h", every_ms=day, window_ms=365 * day),
                              now_ms=1_000)
        a = policies.claim(engine, stored, "replica-a", now_ms=2_000, lease_ms=60_000)
        assert a is not None and a.next_run_at_ms == 1_000 + day
        assert policies.due(engine, 61_999) == []  # A's lease holds
        [owed] = policies.due(engine, 62_000)
        b = policies.claim(engine, owed, "replica-b", now_ms=62_000, lease_ms=60_000)
        assert b is not None and b.next_run_at_ms == 1_000 + day, "the same due time, not the next one"
        assert policies.claim(engine, owed, "replica-c", now_ms=62_000, lease_ms=60_000) is None
        assert not policies.release(engine, a, "replica-a", 70_000, last_outcome="late")
        assert policies.release(engine, b, "replica-b", 70_000, last_job_id="job-b", last_outcome="started: job-b")
        assert policies.due(engine, 10 * 60_000) == []  # released: next due a day after the first due time
        assert policies.get(engine, "BTC/USD", "1h").last_job_id == "job-b"
    finally:
        engine.dispose()
