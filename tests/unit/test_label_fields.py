"""The volatility-scaled barrier fields of a label, and the feature set of a training request, cross every boundary:
the request, the job record, the registry (old models without them still read as before) and the reply."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from mlsignal.client.training import _label_message
from mlsignal.v1 import common_pb2, training_pb2
from shared.converters import label_message
from shared.errors import InvalidArgument
from shared.features import FeatureSpec
from shared.labels import CLASSES, TRIPLE_BARRIER, LabelSpec
from shared.params import ForestParams
from shared.store import registry as reg
from shared.store.db import make_engine
from shared.store.db import models as models_table
from shared.store.migrate import upgrade
from training_service.converters import training_request
from training_service.jobs import TrainingRequest

VOL = LabelSpec(horizon_bars=12, threshold=0.02, kind=TRIPLE_BARRIER, volatility_bars=168, volatility_multiple=0.5)


def request(purpose=training_pb2.TRAINING_PURPOSE_RESEARCH, **label) -> training_pb2.StartTrainingRequest:
    return training_pb2.StartTrainingRequest(symbol="BTC/USD", timeframe="1h", label=common_pb2.LabelSpec(**label),
                                             purpose=purpose)


def test_a_research_request_carries_the_volatility_barrier():
    req = training_request(request(horizon_bars=12, kind=common_pb2.LABEL_KIND_TRIPLE_BARRIER, volatility_bars=168,
                                   volatility_multiple=0.5))
    assert req.label == VOL
    assert label_message(req.label) == common_pb2.LabelSpec(
        horizon_bars=12, threshold=0.02, kind=common_pb2.LABEL_KIND_TRIPLE_BARRIER, volatility_bars=168,
        volatility_multiple=0.5)
    assert training_request(request()).label == LabelSpec()  # unset: the fixed threshold


@pytest.mark.parametrize(("label", "purpose", "field"), [
    ({"volatility_bars": 168}, training_pb2.TRAINING_PURPOSE_RESEARCH, "label.volatility_multiple"),
    ({"volatility_multiple": 0.5}, training_pb2.TRAINING_PURPOSE_RESEARCH, "label.volatility_bars"),
    ({"volatility_bars": 1, "volatility_multiple": 0.5}, training_pb2.TRAINING_PURPOSE_RESEARCH,
     "label.volatility_bars"),
    ({"volatility_bars": -5, "volatility_multiple": 0.5}, training_pb2.TRAINING_PURPOSE_RESEARCH,
     "label.volatility_bars"),
    ({"volatility_bars": 24, "volatility_multiple": float("nan")}, training_pb2.TRAINING_PURPOSE_RESEARCH,
     "label.volatility_multiple"),
    ({"volatility_bars": 24, "volatility_multiple": -1.0}, training_pb2.TRAINING_PURPOSE_RESEARCH,
     "label.volatility_multiple"),
    ({"volatility_bars": 24, "volatility_multiple": 0.5}, training_pb2.TRAINING_PURPOSE_PRODUCTION,
     "label.volatility_bars"),
    ({"volatility_bars": 24, "volatility_multiple": 0.5}, training_pb2.TRAINING_PURPOSE_UNSPECIFIED,
     "label.volatility_bars"),
])
def test_bad_volatility_fields_are_refused_by_name(label, purpose, field):
    with pytest.raises(InvalidArgument) as err:
        training_request(request(purpose=purpose, **label))
    assert err.value.field == field


def test_the_job_record_round_trips_the_label():
    for label in (VOL, LabelSpec()):
        req = TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=None, end_ms=None, label=label,
                              params=ForestParams(), purpose="research")
        assert TrainingRequest.from_json(req.to_json()).label == label
    # a record written before the fields existed
    old = json.loads(TrainingRequest(symbol="BTC/USD", timeframe="1h", start_ms=None, end_ms=None,
                                     label=LabelSpec(), params=ForestParams()).to_json())
    assert set(old["label"]) == {"horizon_bars", "threshold", "kind"}


def test_the_client_passes_the_fields():
    msg = _label_message(24, 0.0, None, 168, 0.5)
    assert (msg.volatility_bars, msg.volatility_multiple) == (168, 0.5)
    with pytest.raises(ValueError, match="volatility_bars"):
        _label_message(24, 0.0, None, 16.8, 0.5)
    with pytest.raises(ValueError, match="volatility_multiple"):
        _label_message(24, 0.0, None, 168, "0.5")


def test_the_registry_round_trips_the_label_and_reads_old_manifests(tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    engine = make_engine(url)
    try:
        ids = {}
        for name, label in (("vol", VOL), ("fixed", LabelSpec(6, 0.01))):
            record = reg.ModelRecord(
                model_id=name, symbol="BTC/USD", timeframe="1h", created_at_ms=1_600_000_000_000, train_start_ms=0,
                train_end_ms=1, label=label, feature_spec=FeatureSpec(), params=ForestParams(), classes=CLASSES,
                prior=(0.3, 0.4, 0.3), shrink_weight=0.5, metrics={"log_loss": 1.0}, artifact=f"{name}.onnx",
                sha256="0" * 64, stage=reg.RESEARCH, stage_reason="research")
            with engine.begin() as conn:
                ids[name] = reg.insert_model(conn, record).model_id
        assert reg.get_model(engine, ids["vol"]).label == VOL
        assert reg.get_model(engine, ids["fixed"]).label == LabelSpec(6, 0.01)
        with engine.connect() as conn:
            manifest = json.loads(conn.execute(sa.select(models_table.c.manifest).where(
                models_table.c.model_id == ids["fixed"])).scalar_one())
        assert not any(k.startswith("label_volatility") for k in manifest)  # fixed: the manifest as before
    finally:
        engine.dispose()



def test_the_feature_set_of_a_request_is_validated_and_round_trips():
    from shared.features import CONTEXT_SPEC, TRAINING_SPEC
    from training_service.converters import request_message

    assert training_request(request()).feature_set == TRAINING_SPEC.key == "ohlcv-v1"
    msg = request()
    msg.feature_set = "ohlcv-v2"
    req = training_request(msg)
    assert req.feature_set == CONTEXT_SPEC.key == "ohlcv-v2"
    assert request_message(req).feature_set == "ohlcv-v2"
    assert TrainingRequest.from_json(req.to_json()) == req
    default = training_request(request())
    assert "feature_set" not in json.loads(default.to_json())  # the record as written before the field existed
    assert TrainingRequest.from_json(default.to_json()).feature_set == "ohlcv-v1"
    for bad in ("ohlcv-v3", "OHLCV-V2", " ohlcv-v2"):
        msg.feature_set = bad
        with pytest.raises(InvalidArgument) as err:
            training_request(msg)
        assert err.value.field == "feature_set" and "ohlcv-v2" in str(err.value)
