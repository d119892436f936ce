"""The committed generated code is what the pinned generator makes of protos/ (run `make protos` after editing one)."""

from __future__ import annotations

import subprocess

from client_venv import REPO, require_client_python
from mlsignal.protogen import OLDEST_GRPC
from mlsignal.v1 import common_pb2, inference_pb2, training_pb2

COMMITTED = REPO / "mlsignal" / "v1"


def test_generated_code_is_up_to_date(tmp_path):
    """Regenerate with grpcio-tools OLDEST_GRPC in .venv-client and compare byte for byte with mlsignal/v1."""
    python = require_client_python()
    # Run from the checkout so the checkout's generator (not an installed copy) compiles the checkout's protos.
    run = subprocess.run(
        [str(python), "-m", "mlsignal.protogen", "--out", str(tmp_path), "--protos", str(REPO / "protos")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    fresh_dir = tmp_path / "mlsignal" / "v1"
    fresh = sorted(p.name for p in fresh_dir.iterdir() if p.is_file())
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_file())
    assert fresh, "protoc produced nothing"
    assert committed == fresh, "mlsignal/v1 holds other files than protoc makes: run `make protos` and commit them"
    stale = [name for name in fresh if (COMMITTED / name).read_bytes() != (fresh_dir / name).read_bytes()]
    assert not stale, (
        f"mlsignal/v1/{', '.join(stale)} differ from what grpcio-tools {OLDEST_GRPC} generates: run `make protos` "
        "and commit the result"
    )


def test_committed_code_comes_from_the_pinned_generator():
    """The generated code records the generator; newer gencode would refuse older protobuf and grpcio runtimes."""
    for name in ("common", "inference", "training"):
        grpc_code = (COMMITTED / f"{name}_pb2_grpc.py").read_text()
        assert f"GRPC_GENERATED_VERSION = '{OLDEST_GRPC}'" in grpc_code, f"{name}_pb2_grpc.py: run `make protos`"


def test_contract_names_are_the_documented_ones():
    svc = training_pb2.DESCRIPTOR.services_by_name["TrainingService"]
    assert [m.name for m in svc.methods] == [
        "StartTraining", "GetTrainingJob", "WatchTrainingJob", "CancelTrainingJob", "ListTrainingJobs", "ListModels",
        "PromoteModel", "RollbackModel", "ListModelStageChanges", "SetRetrainPolicy", "ListRetrainPolicies",
        "DeleteRetrainPolicy", "ImportCandles"]
    imports = svc.methods_by_name["ImportCandles"]
    assert imports.client_streaming and not imports.server_streaming
    policy = training_pb2.RetrainPolicy.DESCRIPTOR
    assert [f.name for f in policy.fields] == [
        "symbol", "timeframe", "every", "window", "label", "params", "paused", "next_run_at", "last_job_id",
        "last_outcome", "cross_validate"]
    assert [f.name for f in training_pb2.ImportCandlesResponse.DESCRIPTOR.fields] == [
        "inserted", "unchanged", "conflicting", "last_open_time_ms"]
    inf = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert [m.name for m in inf.methods] == ["Predict", "StreamPredict", "GetModel", "GetLivePerformance",
                                             "CompareLivePerformance"]
    assert [f.name for f in inference_pb2.LiveComparison.DESCRIPTOR.fields][:7] == [
        "model_id", "baseline_model_id", "paired", "mean_log_loss_difference", "standard_error", "statistic",
        "decision"]
    assert [f.name for f in inference_pb2.CompareLivePerformanceRequest.DESCRIPTOR.fields] == [
        "symbol", "timeframe", "model_id", "baseline_model_id"]
    stream = inf.methods_by_name["StreamPredict"]
    assert stream.client_streaming and stream.server_streaming
    candle = common_pb2.Candle.DESCRIPTOR
    assert [(f.name, f.number) for f in candle.fields] == [
        ("open_time_ms", 1), ("open", 2), ("high", 3), ("low", 4), ("close", 5), ("volume", 6),
        ("funding_rate", 7), ("open_interest", 8)]
    pred = inference_pb2.Prediction.DESCRIPTOR
    assert [(f.name, f.number) for f in pred.fields] == [
        ("open_time_ms", 1), ("ml_up_prob", 2), ("ml_down_prob", 3), ("ml_range_prob", 4), ("ready", 5),
        ("in_sample", 6), ("ood_score", 7), ("ood", 8)]
    assert [v.name for v in training_pb2.JobState.DESCRIPTOR.values] == [
        "JOB_STATE_UNSPECIFIED", "JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED",
        "JOB_STATE_CANCELLED"]
    assert [v.name for v in common_pb2.ModelStage.DESCRIPTOR.values] == [
        "MODEL_STAGE_UNSPECIFIED", "MODEL_STAGE_CANDIDATE", "MODEL_STAGE_SERVING", "MODEL_STAGE_REJECTED",
        "MODEL_STAGE_RETIRED", "MODEL_STAGE_RESEARCH", "MODEL_STAGE_SHADOW"]
    assert [v.name for v in common_pb2.LabelKind.DESCRIPTOR.values] == [
        "LABEL_KIND_UNSPECIFIED", "LABEL_KIND_FIXED_HORIZON", "LABEL_KIND_TRIPLE_BARRIER"]
    assert [f.name for f in training_pb2.StartTrainingRequest.DESCRIPTOR.fields] == [
        "symbol", "timeframe", "start_time", "end_time", "label", "params", "purpose", "feature_set"]
    assert [(f.name, f.number) for f in common_pb2.LabelSpec.DESCRIPTOR.fields] == [
        ("horizon_bars", 1), ("threshold", 2), ("kind", 3), ("volatility_bars", 4), ("volatility_multiple", 5)]
    assert [v.name for v in training_pb2.TrainingPurpose.DESCRIPTOR.values] == [
        "TRAINING_PURPOSE_UNSPECIFIED", "TRAINING_PURPOSE_PRODUCTION", "TRAINING_PURPOSE_RESEARCH"]
    request = inference_pb2.PredictRequest.DESCRIPTOR.fields_by_name
    assert request["columns"].message_type.full_name == "mlsignal.v1.CandleColumns"
    response = inference_pb2.PredictResponse.DESCRIPTOR.fields_by_name
    assert response["columns"].message_type.full_name == "mlsignal.v1.PredictionColumns"
    assert response["error"].message_type.full_name == "google.rpc.Status"
