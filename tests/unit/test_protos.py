"""The committed generated code matches protos/ (run `make protos` after editing a .proto)."""

from __future__ import annotations

import re
from pathlib import Path

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from mlsignal.protogen import ROOT, generate

# Lines that only record which protoc/grpcio-tools produced the file.
VERSION_LINE = re.compile(r"Protobuf Python Version|GRPC_GENERATED_VERSION =|^\s*\d+,\s*$")


def _normalised(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if not VERSION_LINE.search(line)]


def test_generated_code_is_up_to_date(tmp_path):
    generate(tmp_path)
    fresh = sorted((tmp_path / "mlsignal" / "v1").glob("*_pb2*.py*"))
    committed_dir = ROOT / "mlsignal" / "v1"
    assert fresh, "protoc produced nothing"
    assert sorted(p.name for p in committed_dir.glob("*_pb2*.py*")) == [p.name for p in fresh]
    for path in fresh:
        assert _normalised(committed_dir / path.name) == _normalised(path), (
            f"mlsignal/v1/{path.name} is stale: run `make protos` and commit the result"
        )


def test_contract_names_are_the_documented_ones():
    svc = training_pb2.DESCRIPTOR.services_by_name["TrainingService"]
    assert [m.name for m in svc.methods] == [
        "StartTraining", "GetTrainingJob", "WatchTrainingJob", "CancelTrainingJob", "ListTrainingJobs", "ListModels"]
    inf = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert [m.name for m in inf.methods] == ["Predict", "StreamPredict", "GetModel"]
    assert inf.methods_by_name["StreamPredict"].client_streaming and inf.methods_by_name["StreamPredict"].server_streaming
    candle = common_pb2.Candle.DESCRIPTOR
    assert [(f.name, f.number) for f in candle.fields] == [
        ("open_time_ms", 1), ("open", 2), ("high", 3), ("low", 4), ("close", 5), ("volume", 6),
        ("funding_rate", 7), ("open_interest", 8)]
    pred = inference_pb2.Prediction.DESCRIPTOR
    assert [(f.name, f.number) for f in pred.fields] == [
        ("open_time_ms", 1), ("ml_up_prob", 2), ("ml_down_prob", 3), ("ml_range_prob", 4), ("ready", 5),
        ("in_sample", 6)]
    assert [v.name for v in training_pb2.JobState.DESCRIPTOR.values] == [
        "JOB_STATE_UNSPECIFIED", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED"]
