"""The live promotion runner on a real database with live scores written as inference writes them: a shadow that
scores better is promoted, one that scores worse rejected, one with too few pairs waits; two runners (two training
replicas) apply a decision once; a serving model worse than its class prior is reported, and rolled back only with
MLSIGNAL_DEMOTE_WORSE_THAN_PRIOR; the CLI prints the comparison. SQLite and PostgreSQL."""

from __future__ import annotations

import numpy as np
import pytest

from shared.live_comparison import LiveTestSettings
from shared.store import registry
from shared.store.db import live_scores, make_engine
from shared.store.migrate import upgrade
from tiny_models import T0, H, register, write_scores
from training_service.promotion import PromotionRunner

SETTINGS = LiveTestSettings(min_scored=300, max_scored=3000, alpha=0.05)


@pytest.fixture
def engine(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def test_a_better_shadow_is_promoted_a_worse_one_rejected_and_a_young_one_waits(engine, tmp_path):
    rng = np.random.default_rng(3)
    register(engine, tmp_path, "PRM/USD", model_id="serving")
    for shadow in ("better", "worse", "young"):
        register(engine, tmp_path, "PRM/USD", model_id=shadow, stage=registry.SHADOW)
    n = 1200
    write_scores(engine, "serving", "PRM/USD", loss=1.00 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.02))
    write_scores(engine, "better", "PRM/USD", loss=0.90 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.02))
    write_scores(engine, "worse", "PRM/USD", loss=1.10 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.02))
    write_scores(engine, "young", "PRM/USD", loss=0.5 + rng.normal(0, 0.2, 200), prior_loss=np.full(200, 1.02))

    first, second = PromotionRunner(engine, SETTINGS), PromotionRunner(engine, SETTINGS)  # two replicas
    report = first.tick()
    assert report.promoted == ["better"] and report.rejected == [], "the others are compared with it next"
    report = second.tick()
    assert report.promoted == [] and report.rejected == ["worse"] and "young" in report.undecided
    assert first.tick().rejected == [] and second.tick().promoted == [], "a decision is applied once"
    stages = {m.model_id: m.stage for m in registry.list_models(engine, "PRM/USD", "1h")}
    assert stages == {"better": registry.SERVING, "serving": registry.RETIRED, "worse": registry.REJECTED,
                      "young": registry.SHADOW}
    reason = registry.get_model(engine, "better").stage_reason
    assert reason.startswith("live test against serving: better than it; live test after 1,200 paired candles")
    assert "promote" in reason
    history = [(c.model_id, c.stage) for c in registry.stage_history(engine, "PRM/USD", "1h")][-3:]
    assert history == [("serving", registry.RETIRED), ("better", registry.SERVING), ("worse", registry.REJECTED)]


@pytest.mark.parametrize("demote", [False, True])
def test_a_serving_model_worse_than_its_prior_is_reported_and_rolled_back_only_when_asked(engine, tmp_path, demote):
    rng = np.random.default_rng(5)
    register(engine, tmp_path, "BAD/USD", model_id="before")
    register(engine, tmp_path, "BAD/USD", model_id="bad")  # serves now; "before" served before it
    n = 900
    write_scores(engine, "bad", "BAD/USD", loss=1.15 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.05))
    runner = PromotionRunner(engine, SETTINGS, demote_worse_than_prior=demote)
    report = runner.tick()
    assert report.worse_than_prior == ["bad"]
    serving = registry.serving_model(engine, "BAD/USD", "1h")
    if demote:
        assert report.demoted == ["bad"] and serving.model_id == "before"
        assert "worse than its class prior on live candles" in registry.get_model(engine, "bad").stage_reason
        assert runner.worse_than_prior() == []  # it no longer serves
    else:
        assert report.demoted == [] and serving.model_id == "bad"
        assert runner.worse_than_prior() == [("BAD/USD", "1h", "bad")]


def test_the_cli_compares_a_shadow_with_the_serving_model(engine, tmp_path, db_url, capsys):
    from inference_service.server import start
    from mlsignal.cli import main
    from shared.settings import Settings

    rng = np.random.default_rng(9)
    register(engine, tmp_path, "CMP/USD", model_id="incumbent")
    register(engine, tmp_path, "CMP/USD", model_id="challenger", stage=registry.SHADOW)
    n = 800
    write_scores(engine, "incumbent", "CMP/USD", loss=1.0 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.0))
    write_scores(engine, "challenger", "CMP/USD", loss=0.8 + rng.normal(0, 0.2, n), prior_loss=np.full(n, 1.0))
    running = start(Settings(database_url=db_url, model_dir=tmp_path, shadow_min_scored=300,
                             shadow_max_scored=3000), "127.0.0.1:0")
    try:
        target = ["--target", f"127.0.0.1:{running.port}", "--symbol", "CMP/USD", "--timeframe", "1h"]
        assert main(["models", "compare", "challenger", *target]) == 0
        out = capsys.readouterr().out
        assert out.startswith("challenger against incumbent on 800 paired candles: mean log-loss gain +0.")
        assert "decision: promote" in out
        assert main(["models", "compare", "", "challenger", *target]) == 0  # the prior against the shadow
        out = capsys.readouterr().out
        assert out.startswith("the class prior against challenger on 800 paired candles")
        assert "decision: reject" in out
        assert main(["models", "compare", "nope", *target]) == 2
        assert "NOT_FOUND: model_id: no model 'nope'" in capsys.readouterr().err
    finally:
        running.stop(0.5)


def test_scores_fixture_writes_what_the_journal_writes(engine):
    write_scores(engine, "m", "X/USD", loss=np.array([0.5, 0.7]), prior_loss=np.array([1.0, 1.0]))
    with engine.connect() as conn:
        rows = conn.execute(live_scores.select().order_by(live_scores.c.open_time)).all()
    assert [(r.model_id, r.open_time) for r in rows] == [("m", T0), ("m", T0 + H)]
