"""A triple-barrier model trained and served end to end through gRPC, on the bundled BTC/USD 1h sample."""

from __future__ import annotations

import numpy as np

from mlsignal.v1 import common_pb2, training_pb2
from prior_checks import require_beats_prior, score_after_split
from service_fixtures import ts, wait_job
from shared.labels import LabelSpec
from shared.store.db import make_engine

TRAIN = ("2017-07-01", "2018-04-01")  # the second period the defaults were checked on (README "Probability quality")
END = "2018-10-01"
# Measured 0.9237 x the prior's log loss with the defaults (0.8964 with the context features of feature set v2): a
# regression that gives back most of that margin fails.
BOUND = 0.95


def train_research(stub, start: str, end: str, feature_set: str = "", **label) -> training_pb2.TrainingJob:
    """A research model (it never takes over serving from the session's models; requests pin it by id)."""
    req = training_pb2.StartTrainingRequest(
        symbol="BTC/USD", timeframe="1h", start_time=ts(start), end_time=ts(end),
        label=common_pb2.LabelSpec(**label), params=common_pb2.ModelParams(),
        purpose=training_pb2.TRAINING_PURPOSE_RESEARCH, feature_set=feature_set,
    )
    done = wait_job(stub, stub.StartTraining(req, timeout=30).job_id)
    assert done.state == training_pb2.JOB_STATE_SUCCEEDED, done.error
    return done


def test_triple_barrier_model_records_its_kind_and_beats_the_prior_out_of_sample(services, sample_frame):
    start, split = TRAIN
    job = train_research(services.train_stub, start, split, kind=common_pb2.LABEL_KIND_TRIPLE_BARRIER)
    assert job.request.label.kind == common_pb2.LABEL_KIND_TRIPLE_BARRIER
    models = services.train_stub.ListModels(training_pb2.ListModelsRequest(symbol="BTC/USD", timeframe="1h")).models
    info = next(m for m in models if m.model_id == job.model_id)
    assert info.label.kind == common_pb2.LABEL_KIND_TRIPLE_BARRIER
    assert (info.label.horizon_bars, info.label.threshold) == (24, 0.02)
    assert info.metrics["cv_folds"] >= 4
    assert info.metrics["dropped_gap_labels"] == 0 and info.metrics["window_gaps"] == 0

    label = LabelSpec(24, 0.02, "triple_barrier")
    score = score_after_split(services, sample_frame, job.model_id, label, split, END)
    assert score.record.label.kind == "triple_barrier"
    assert score.response.model_id == job.model_id
    assert score.test.sum() > 4000
    assert not np.array([p.in_sample for p in score.response.predictions])[score.test].any()
    require_beats_prior(score.served, score.prior, score.record.shrink_weight, bound=BOUND,
                        what="triple-barrier BTC/USD 1h on 2018-04..10")


# Measured 0.9965 x the prior's log loss (1.0104 with the default feature set v1): with the context features the
# default parameters beat the prior on this split too.
CONTEXT_BOUND = 1.0


def test_the_context_feature_set_beats_the_prior_on_the_second_period(services, sample_frame):
    start, split = TRAIN
    job = train_research(services.train_stub, start, split, feature_set="ohlcv-v2")
    assert job.request.feature_set == "ohlcv-v2"
    models = services.train_stub.ListModels(training_pb2.ListModelsRequest(symbol="BTC/USD", timeframe="1h")).models
    info = next(m for m in models if m.model_id == job.model_id)
    assert info.feature_set == "ohlcv-v2" and info.warmup_bars == 721
    assert list(info.features[-8:]) == ["ctx_ret_168", "ctx_range_168", "ctx_pos_168", "ctx_vol_168",
                                        "ctx_ret_720", "ctx_range_720", "ctx_pos_720", "ctx_vol_720"]
    score = score_after_split(services, sample_frame, job.model_id, LabelSpec(24, 0.02), split, END)
    ready = np.array([p.ready for p in score.response.predictions])
    assert not ready[:720].any() and ready[720]  # 720 candles of history before the first answer
    assert score.test.sum() > 4000
    require_beats_prior(score.served, score.prior, score.record.shrink_weight, bound=CONTEXT_BOUND,
                        what="feature set v2, BTC/USD 1h on 2018-04..10")


def test_train_flags_reach_the_service_and_a_volatility_scaled_label_round_trips(services, capsys):
    from mlsignal.cli import main as cli_main
    from shared.store.registry import get_model

    base = ["train", "--symbol", "BTC/USD", "--timeframe", "1h", "--target", f"127.0.0.1:{services.training.port}"]
    assert cli_main([*base, "--feature-set", "ohlcv-v3"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "feature_set" in err and "ohlcv-v2" in err
    assert cli_main([*base, "--volatility-bars", "168", "--volatility-multiple", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "label.volatility_bars" in err and "research" in err
    assert cli_main([*base, "--volatility-bars", "168", "--research"]) == 2
    assert "label.volatility_multiple" in capsys.readouterr().err

    before = {m.model_id for m in services.train_stub.ListModels(training_pb2.ListModelsRequest()).models}
    assert cli_main([*base, "--start", "2018-01-01", "--end", "2018-04-01", "--trees", "10", "--label",
                     "triple-barrier", "--volatility-bars", "24", "--volatility-multiple", "0.5", "--research"]) == 0
    capsys.readouterr()
    new = [m for m in services.train_stub.ListModels(training_pb2.ListModelsRequest()).models
           if m.model_id not in before]
    assert len(new) == 1 and new[0].stage == common_pb2.MODEL_STAGE_RESEARCH
    assert (new[0].label.kind, new[0].label.volatility_bars, new[0].label.volatility_multiple) == (
        common_pb2.LABEL_KIND_TRIPLE_BARRIER, 24, 0.5)
    engine = make_engine(services.url)
    rec = get_model(engine, new[0].model_id)
    engine.dispose()
    assert rec.label == LabelSpec(24, 0.02, "triple_barrier", volatility_bars=24, volatility_multiple=0.5)
    assert 0 <= rec.shrink_weight <= 1
