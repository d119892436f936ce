"""Model lifecycle in the registry: the gate, promote, rollback, history, research retention, label kind."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from shared.errors import FailedPrecondition, NotFound
from shared.features import FeatureSpec
from shared.labels import CLASSES, TRIPLE_BARRIER, LabelSpec
from shared.params import ForestParams
from shared.store import registry as reg
from shared.store.db import make_engine
from shared.store.db import models as models_table
from shared.store.migrate import upgrade

BTC, ETH = "BTC/USDT", "ETH/USDT"


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


_counter = iter(range(1, 1_000_000))


def register(engine, stage: str, symbol: str = BTC, label: LabelSpec | None = None, reason: str = "") -> str:
    n = next(_counter)
    model_id = f"m{n:04d}"
    record = reg.ModelRecord(
        model_id=model_id, symbol=symbol, timeframe="1h", created_at_ms=1_600_000_000_000 + n, train_start_ms=0,
        train_end_ms=1, label=label or LabelSpec(), feature_spec=FeatureSpec(), params=ForestParams(),
        classes=CLASSES, prior=(0.3, 0.4, 0.3), shrink_weight=0.5, metrics={"log_loss": 1.0},
        artifact=f"{model_id}.onnx", sha256="0" * 64, sklearn_artifact=f"{model_id}.joblib", stage=stage,
        stage_reason=reason or f"registered as {stage}",
    )
    with engine.begin() as conn:
        reg.insert_model(conn, record)
    return model_id


def stages(engine, symbol: str = BTC) -> dict[str, str]:
    return {m.model_id: m.stage for m in reg.list_models(engine, symbol, "1h")}


def test_the_gate_compares_with_the_prior_and_gives_both_numbers():
    stage, reason = reg.gate({"log_loss": 1.0, "prior_log_loss": 1.01})
    assert stage == reg.SERVING and "1.0000 <= prior 1.0100" in reason
    stage, reason = reg.gate({"log_loss": 1.0213, "prior_log_loss": 1.01})
    assert stage == reg.REJECTED and reason == "out-of-sample log loss 1.0213 > prior 1.0100 \u00d7 (1 + 0)"
    assert reg.gate({"log_loss": 1.0, "prior_log_loss": 1.01}, tolerance=-0.5)[0] == reg.REJECTED  # stricter
    assert reg.gate({"log_loss": 1.02, "prior_log_loss": 1.01}, tolerance=0.05)[0] == reg.SERVING
    assert reg.gate({"log_loss": float("nan"), "prior_log_loss": 1.0})[0] == reg.REJECTED
    assert reg.gate({})[0] == reg.REJECTED
    good = {"log_loss": 0.9, "prior_log_loss": 1.0}
    assert reg.registration_stage("production", good, "manual")[0] == reg.CANDIDATE
    assert reg.registration_stage("research", good, "auto")[0] == reg.RESEARCH
    assert reg.registration_stage("production", good, "auto")[0] == reg.SERVING
    with pytest.raises(ValueError, match="promotion"):
        reg.registration_stage("production", good, "sometimes")


def test_one_serving_model_per_market_and_every_change_is_kept(engine):
    a = register(engine, reg.SERVING)
    other_market = register(engine, reg.SERVING, symbol=ETH)
    b = register(engine, reg.SERVING)  # retires a
    c = register(engine, reg.CANDIDATE)
    assert stages(engine) == {a: reg.RETIRED, b: reg.SERVING, c: reg.CANDIDATE}
    assert reg.serving_model(engine, BTC, "1h").model_id == b
    assert reg.serving_model(engine, ETH, "1h").model_id == other_market

    promoted = reg.promote(engine, c, "  ")
    assert promoted.stage == reg.SERVING and promoted.stage_reason == reg.PROMOTED_BY_OPERATOR
    assert stages(engine) == {a: reg.RETIRED, b: reg.RETIRED, c: reg.SERVING}
    assert reg.get_model(engine, b).stage_reason == f"replaced by {c}: {reg.PROMOTED_BY_OPERATOR}"
    assert reg.promote(engine, c, "again").stage_reason == reg.PROMOTED_BY_OPERATOR  # already serving: no change

    back = reg.rollback(engine, BTC, "1h", "worse live")
    assert back.model_id == b and back.stage == reg.SERVING and "worse live" in back.stage_reason
    assert reg.get_model(engine, c).stage == reg.RETIRED
    assert reg.serving_model(engine, ETH, "1h").model_id == other_market  # other markets untouched

    history = reg.stage_history(engine, BTC, "1h")
    assert [(h.model_id, h.stage) for h in history] == [
        (a, reg.SERVING), (a, reg.RETIRED), (b, reg.SERVING), (c, reg.CANDIDATE),
        (b, reg.RETIRED), (c, reg.SERVING), (c, reg.RETIRED), (b, reg.SERVING),
    ]
    assert all(h.reason and h.changed_at_ms > 0 for h in history)
    assert [h.model_id for h in reg.stage_history(engine, BTC, "1h", limit=2)] == [c, b]

    # the database refuses a second SERVING model for one market
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(models_table.update().where(models_table.c.model_id == a).values(stage=reg.SERVING))


def test_rollback_without_a_previous_model_and_promote_of_an_unknown_id(engine):
    with pytest.raises(FailedPrecondition, match="no model is serving"):
        reg.rollback(engine, BTC, "1h")
    only = register(engine, reg.SERVING)
    with pytest.raises(FailedPrecondition, match="nothing to roll back to"):
        reg.rollback(engine, BTC, "1h")
    assert reg.serving_model(engine, BTC, "1h").model_id == only
    with pytest.raises(NotFound):
        reg.promote(engine, "no-such-model")
    # a rejected or research model can be promoted, and then rolled back from
    research = register(engine, reg.RESEARCH)
    assert reg.promote(engine, research, "looks good").stage == reg.SERVING
    assert reg.rollback(engine, BTC, "1h").stage_reason.endswith(reg.ROLLED_BACK_BY_OPERATOR)
    assert reg.serving_model(engine, BTC, "1h").model_id == only


def test_research_retention_retires_all_but_the_newest(engine):
    research = [register(engine, reg.RESEARCH) for _ in range(5)]
    serving = register(engine, reg.SERVING)
    with engine.begin() as conn:
        files = reg.retire_old_research(conn, BTC, "1h", keep=2)
    assert sorted(files) == sorted([f"{m}.onnx" for m in research[:3]] + [f"{m}.joblib" for m in research[:3]])
    got = stages(engine)
    assert [got[m] for m in research] == [reg.RETIRED] * 3 + [reg.RESEARCH] * 2
    assert got[serving] == reg.SERVING
    assert reg.get_model(engine, research[0]).stage_reason == reg.RESEARCH_RETENTION
    # models newer than the cut-off are spared
    with engine.begin() as conn:
        assert reg.retire_old_research(conn, BTC, "1h", keep=1, created_before_ms=0) == []


def test_label_kind_is_kept_and_an_old_manifest_reads_as_fixed_horizon(engine):
    tb = register(engine, reg.CANDIDATE, label=LabelSpec(horizon_bars=12, threshold=0.01, kind=TRIPLE_BARRIER))
    assert reg.get_model(engine, tb).label == LabelSpec(horizon_bars=12, threshold=0.01, kind=TRIPLE_BARRIER)
    old = register(engine, reg.CANDIDATE)
    with engine.begin() as conn:
        text = conn.execute(sa.select(models_table.c.manifest).where(models_table.c.model_id == old)).scalar_one()
        manifest = json.loads(text)
        manifest.pop("label_kind")
        conn.execute(models_table.update().where(models_table.c.model_id == old)
                     .values(manifest=json.dumps(manifest)))
    assert reg.get_model(engine, old).label.kind == "fixed_horizon"
