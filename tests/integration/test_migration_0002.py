"""Migration 0002 (model lifecycle) on a database that already holds candles, jobs and models, SQLite and PostgreSQL."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared.features import FeatureSpec
from shared.params import ForestParams
from shared.store import registry as reg
from shared.store.db import make_engine
from shared.store.migrate import current_revision, head_revision, upgrade

# (model_id, symbol, timeframe, created_at)
MODELS = [
    ("btc-old", "BTC/USD", "1h", 1_000),
    ("btc-mid", "BTC/USD", "1h", 2_000),
    ("btc-new", "BTC/USD", "1h", 3_000),
    ("btc-4h", "BTC/USD", "4h", 1_500),
    ("eth-only", "ETH/USD", "1h", 500),
]


def _fill_0001(url: str) -> None:
    """Rows as the 0001 schema stores them (no stage columns)."""
    engine = make_engine(url)
    manifest = json.dumps({"feature_spec": FeatureSpec().to_dict(), "params": ForestParams().to_dict(),
                           "classes": ["down", "range", "up"], "prior": [0.3, 0.4, 0.3], "shrink_weight": 0.5,
                           "sklearn_artifact": "", "sklearn_sha256": "", "versions": {}})
    try:
        with engine.begin() as conn:
            for model_id, symbol, tf, created in MODELS:
                conn.execute(sa.text(
                    "INSERT INTO models (model_id, symbol, timeframe, created_at, train_start, train_end, "
                    "horizon_bars, threshold, warmup_bars, manifest, metrics, artifact, sha256, job_id) VALUES "
                    "(:id, :s, :tf, :c, 0, 1, 24, 0.02, 100, :m, '{\"log_loss\": 1.0}', :a, :sha, NULL)"),
                    dict(id=model_id, s=symbol, tf=tf, c=created, m=manifest, a=f"{model_id}.onnx", sha="0" * 64))
            conn.execute(sa.text(
                "INSERT INTO candles (symbol, timeframe, open_time, open, high, low, close, volume) VALUES "
                "('BTC/USD', '1h', 0, 1, 2, 0.5, 1.5, 10)"))
            conn.execute(sa.text(
                "INSERT INTO training_jobs (job_id, symbol, timeframe, state, progress, stage, error, model_id, "
                "request, metrics, created_at) VALUES ('job-1', 'BTC/USD', '1h', 'SUCCEEDED', 1.0, 'done', '', "
                "'btc-new', '{}', '{}', 5)"))
    finally:
        engine.dispose()


def _check_migrated(url: str) -> None:
    engine = make_engine(url)
    try:
        assert current_revision(engine) == head_revision()
        got = {m.model_id: (m.stage, m.stage_reason) for m in reg.list_models(engine)}
        assert got == {
            "btc-old": (reg.RETIRED, "migrated"), "btc-mid": (reg.RETIRED, "migrated"),
            "btc-new": (reg.SERVING, "migrated"), "btc-4h": (reg.SERVING, "migrated"),
            "eth-only": (reg.SERVING, "migrated"),
        }
        assert reg.serving_model(engine, "BTC/USD", "1h").model_id == "btc-new"
        history = [(h.model_id, h.stage, h.changed_at_ms) for h in reg.stage_history(engine, "BTC/USD", "1h")]
        assert history[:4] == [("btc-old", reg.SERVING, 1_000), ("btc-old", reg.RETIRED, 2_000),
                               ("btc-mid", reg.SERVING, 2_000), ("btc-mid", reg.RETIRED, 3_000)]
        assert history[4][:2] == ("btc-new", reg.SERVING) and len(history) == 5
        assert [(h.model_id, h.stage) for h in reg.stage_history(engine, "ETH/USD", "1h")] == [
            ("eth-only", reg.SERVING)]
        assert reg.get_model(engine, "btc-new").label.kind == "fixed_horizon"  # manifest without a label kind
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM candles")).scalar() == 1
            assert conn.execute(sa.text("SELECT model_id FROM training_jobs")).scalar() == "btc-new"
        # the lifecycle works on migrated rows
        assert reg.rollback(engine, "BTC/USD", "1h", "check").model_id == "btc-mid"
    finally:
        engine.dispose()


def test_migration_from_0001_keeps_every_model_with_stages_sqlite(tmp_path):
    url = f"sqlite:///{tmp_path}/old.db"
    assert upgrade(url, "0001") == "0001"
    _fill_0001(url)
    upgrade(url)
    _check_migrated(url)
    upgrade(url)  # idempotent
    _check_migrated_again(url)


def _check_migrated_again(url: str) -> None:
    engine = make_engine(url)
    try:
        assert len(reg.list_models(engine)) == len(MODELS)
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_migration_from_0001_keeps_every_model_with_stages_postgresql(pg_server):
    import uuid

    from conftest import _admin_connect

    name = f"t_{uuid.uuid4().hex[:16]}"
    with _admin_connect(pg_server) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = sa.engine.make_url(pg_server).set(database=name).render_as_string(hide_password=False)
    try:
        assert upgrade(url, "0001") == "0001"
        _fill_0001(url)
        upgrade(url)
        _check_migrated(url)
    finally:
        with _admin_connect(pg_server) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
