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


def register(engine, stage: str, symbol: str = BTC, label: LabelSpec | None = None, reason: str = "",
             shadow: bool = False) -> str:
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
        inserted = reg.insert_model(conn, record, shadow=shadow)
    assert inserted.model_id == model_id and inserted.stage in (stage, reg.SHADOW)
    return model_id


def stages(engine, symbol: str = BTC) -> dict[str, str]:
    return {m.model_id: m.stage for m in reg.list_models(engine, symbol, "1h")}


def test_the_gate_compares_with_the_prior_and_gives_both_numbers():
    stage, reason = reg.gate({"log_loss": 1.0, "prior_log_loss": 1.01})
    assert stage == reg.SERVING and "1.0000 < prior 1.0100" in reason
    stage, reason = reg.gate({"log_loss": 1.0213, "prior_log_loss": 1.01})
    assert stage == reg.REJECTED and reason == "out-of-sample log loss 1.0213 >= prior 1.0100 \u00d7 (1 + 0)"
    assert reg.gate({"log_loss": 1.0, "prior_log_loss": 1.01}, tolerance=-0.5)[0] == reg.REJECTED  # stricter
    assert reg.gate({"log_loss": 1.02, "prior_log_loss": 1.01}, tolerance=0.05)[0] == reg.SERVING
    assert reg.gate({"log_loss": float("nan"), "prior_log_loss": 1.0})[0] == reg.REJECTED
    assert reg.gate({})[0] == reg.REJECTED
    good = {"log_loss": 0.9, "prior_log_loss": 1.0}
    assert reg.registration_stage("production", good, "manual")[0] == reg.CANDIDATE
    assert reg.registration_stage("research", good, "auto")[0] == reg.RESEARCH
    assert reg.registration_stage("production", good, "auto")[0] == reg.SERVING
    assert reg.registration_stage("production", good, "shadow")[0] == reg.SERVING  # SHADOW is decided at insert
    with pytest.raises(ValueError, match="promotion"):
        reg.registration_stage("production", good, "sometimes")


def test_the_gate_is_strict_and_refuses_a_forest_calibrated_away():
    # a log loss equal to the prior's is no better than the prior: rejected
    stage, reason = reg.gate({"log_loss": 1.01, "prior_log_loss": 1.01})
    assert stage == reg.REJECTED and reason == "out-of-sample log loss 1.0100 >= prior 1.0100 \u00d7 (1 + 0)"
    assert reg.gate({"log_loss": 1.05, "prior_log_loss": 1.0}, tolerance=0.05)[0] == reg.REJECTED  # equal again
    assert reg.gate({"log_loss": 1.0499, "prior_log_loss": 1.0}, tolerance=0.05)[0] == reg.SERVING
    # calibration weight 0: the model predicts the class prior, whatever its log loss
    for name in ("eval_shrink_weight", "shrink_weight"):
        stage, reason = reg.gate({"log_loss": 0.9, "prior_log_loss": 1.0, name: 0.0})
        assert stage == reg.REJECTED and f"weight 0 ({name})" in reason and "0.9000" in reason
        assert reg.gate({"log_loss": 0.9, "prior_log_loss": 1.0, name: 0.0}, tolerance=0.5)[0] == reg.REJECTED
        assert reg.gate({"log_loss": 0.9, "prior_log_loss": 1.0, name: 0.25})[0] == reg.SERVING
    assert reg.gate({"log_loss": 0.9, "prior_log_loss": 1.0, "eval_shrink_weight": 0.3,
                     "shrink_weight": 0.0})[0] == reg.REJECTED
    assert reg.gate({"log_loss": 0.9, "prior_log_loss": 1.0, "shrink_weight": float("nan")})[0] == reg.REJECTED
    assert reg.registration_stage("production", {"log_loss": 0.9, "prior_log_loss": 1.0, "shrink_weight": 0.0},
                                  "shadow")[0] == reg.REJECTED


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


def history_of(engine, symbol: str = BTC) -> list[tuple[str, str]]:
    return [(h.model_id, h.stage) for h in reg.stage_history(engine, symbol, "1h")]


def test_a_second_model_past_the_gate_shadows_the_serving_one(engine):
    a = register(engine, reg.SERVING, shadow=True)  # nothing serves the market: it serves at once
    assert reg.get_model(engine, a).stage == reg.SERVING
    b = register(engine, reg.SERVING, reason="out-of-sample log loss 0.9000 < prior", shadow=True)
    shadowing = reg.get_model(engine, b)
    assert shadowing.stage == reg.SHADOW
    assert shadowing.stage_reason == f"out-of-sample log loss 0.9000 < prior; shadows {a} until live candles decide"
    assert reg.serving_model(engine, BTC, "1h").model_id == a
    assert history_of(engine) == [(a, reg.SERVING), (b, reg.SHADOW)]
    # only a model past the gate shadows; other stages are inserted as they are
    rejected = register(engine, reg.REJECTED, shadow=True)
    assert reg.get_model(engine, rejected).stage == reg.REJECTED
    # without shadow (MLSIGNAL_PROMOTION=auto) a new model replaces the serving one
    c = register(engine, reg.SERVING)
    assert stages(engine) == {a: reg.RETIRED, b: reg.SHADOW, rejected: reg.REJECTED, c: reg.SERVING}
    assert reg.get_model(engine, a).stage_reason == f"replaced by {c}"
    # a shadow promoted (by the live test or an operator) serves, and a rollback brings back the one it replaced
    assert reg.promote(engine, b, "beats the serving model on live candles").stage == reg.SERVING
    assert reg.rollback(engine, BTC, "1h").model_id == c


def test_rollbacks_walk_back_through_the_promotions(engine):
    a, b, c = (register(engine, reg.CANDIDATE) for _ in range(3))
    for m in (a, b, c):
        reg.promote(engine, m, f"promote {m}")
    assert reg.rollback(engine, BTC, "1h", "c is worse").model_id == b
    assert stages(engine) == {a: reg.RETIRED, b: reg.SERVING, c: reg.RETIRED}
    back = reg.rollback(engine, BTC, "1h", "b is worse")
    assert back.model_id == a and back.stage_reason == f"rolled back from {b}: b is worse"
    assert stages(engine) == {a: reg.SERVING, b: reg.RETIRED, c: reg.RETIRED}
    before = reg.stage_history(engine, BTC, "1h")
    with pytest.raises(FailedPrecondition, match=f"before {a}: there is nothing to roll back to") as err:
        reg.rollback(engine, BTC, "1h")
    assert err.value.field == "symbol"
    assert reg.stage_history(engine, BTC, "1h") == before
    assert reg.serving_model(engine, BTC, "1h").model_id == a
    # a promotion after the rollbacks pushes onto what is left: rolling it back gives a again
    reg.promote(engine, c, "c after all")
    assert reg.rollback(engine, BTC, "1h").model_id == a
    # promote a, b, a: the stack is a, b, a; rollbacks walk b, then a
    reg.promote(engine, b)
    reg.promote(engine, a)
    assert reg.rollback(engine, BTC, "1h").model_id == b
    assert reg.rollback(engine, BTC, "1h").model_id == a
    with pytest.raises(FailedPrecondition, match="nothing to roll back to"):
        reg.rollback(engine, BTC, "1h")


def test_an_operator_reason_cannot_pass_for_a_rollback(engine):
    a, b, c = (register(engine, reg.CANDIDATE) for _ in range(3))
    reg.promote(engine, a)
    reg.promote(engine, b)
    reg.promote(engine, c, f"rolled back from {b}: by hand")  # a promotion, whatever its reason says
    with engine.connect() as conn:
        assert reg.serving_stack(conn, BTC, "1h") == [a, b, c]
    assert reg.rollback(engine, BTC, "1h").model_id == b
    with engine.connect() as conn:
        assert reg.serving_stack(conn, BTC, "1h") == [a, b]


def test_history_keeps_the_order_of_changes_in_one_millisecond_and_when_the_clock_steps_back(engine, monkeypatch):
    monkeypatch.setattr(reg, "now_ms", lambda: 1_700_000_000_000)  # every change in the same millisecond
    a = register(engine, reg.SERVING)
    b = register(engine, reg.SERVING)
    reg.promote(engine, a)
    expected = [(a, reg.SERVING), (a, reg.RETIRED), (b, reg.SERVING), (b, reg.RETIRED), (a, reg.SERVING)]
    assert history_of(engine) == expected
    clock = iter(range(1_700_000_000_000, 0, -1000))  # a clock that steps back at every change
    monkeypatch.setattr(reg, "now_ms", lambda: next(clock))
    c = register(engine, reg.CANDIDATE)
    reg.promote(engine, c)
    reg.promote(engine, b)
    expected += [(c, reg.CANDIDATE), (a, reg.RETIRED), (c, reg.SERVING), (c, reg.RETIRED), (b, reg.SERVING)]
    assert history_of(engine) == expected
    assert [(h.model_id, h.stage) for h in reg.stage_history(engine, BTC, "1h", limit=3)] == expected[-3:]
    assert [h.stage for h in reg.stage_history(engine, model_id=c)] == [reg.CANDIDATE, reg.SERVING, reg.RETIRED]
    # and rollbacks replay it in that order too: b, then c, then a
    assert reg.rollback(engine, BTC, "1h").model_id == c
    assert reg.rollback(engine, BTC, "1h").model_id == a
    assert reg.rollback(engine, BTC, "1h").model_id == b


def test_promote_and_rollback_change_nothing_when_the_artifact_is_refused(engine):
    a, b = register(engine, reg.CANDIDATE), register(engine, reg.CANDIDATE)
    reg.promote(engine, a)
    reg.promote(engine, b)
    checked: list[tuple[str, str, str]] = []

    def refuse(model_id: str, artifact: str, sha256: str) -> None:
        checked.append((model_id, artifact, sha256))
        raise FailedPrecondition(f"model file {artifact} is missing", field="model_id")

    before = reg.stage_history(engine, BTC, "1h")
    version = reg.version(engine)
    with pytest.raises(FailedPrecondition, match=f"{a}.onnx is missing"):
        reg.promote(engine, a, verify=refuse)
    with pytest.raises(FailedPrecondition, match=f"{a}.onnx is missing"):
        reg.rollback(engine, BTC, "1h", verify=refuse)  # the model it would bring back is checked
    assert checked == [(a, f"{a}.onnx", "0" * 64)] * 2
    assert reg.stage_history(engine, BTC, "1h") == before and reg.version(engine) == version
    assert reg.serving_model(engine, BTC, "1h").model_id == b
    assert reg.promote(engine, b, verify=refuse).stage == reg.SERVING  # already serving: nothing to check
    assert len(checked) == 2
    accepted: list[str] = []
    assert reg.rollback(engine, BTC, "1h", verify=lambda m, *_: accepted.append(m)).model_id == a
    assert accepted == [a]


def test_a_model_retired_by_research_retention_cannot_serve(engine):
    old, newer = register(engine, reg.RESEARCH), register(engine, reg.RESEARCH)
    with engine.begin() as conn:
        assert reg.retire_old_research(conn, BTC, "1h", keep=1) == [f"{old}.onnx", f"{old}.joblib"]
    with pytest.raises(FailedPrecondition, match="research retention") as err:
        reg.promote(engine, old, verify=lambda *_: None)
    assert err.value.field == "model_id"
    assert stages(engine) == {old: reg.RETIRED, newer: reg.RESEARCH}
    assert reg.promote(engine, newer).stage == reg.SERVING
