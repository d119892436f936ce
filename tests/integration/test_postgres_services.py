"""Both services on a real PostgreSQL: train, register, serve, cancel, list, and stream == batch."""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
from test_inference_service import candles_of, predict, probs, stream_all

from mlsignal.v1 import common_pb2, inference_pb2, training_pb2
from service_fixtures import load_market, ms, start_services, stop_services, train, ts, wait_job

pytestmark = pytest.mark.postgres


def test_training_and_inference_on_postgresql(pg_url, sample_frame, tmp_path):
    frame = sample_frame[(sample_frame.open_time_ms >= ms("2018-01-01")) &
                         (sample_frame.open_time_ms < ms("2019-03-01"))].reset_index(drop=True)
    load_market(pg_url, frame)
    s = start_services(pg_url, tmp_path / "models")
    try:
        job = train(s.train_stub, start="2018-01-01", end="2019-01-01", horizon_bars=12, threshold=0.01)
        models = s.train_stub.ListModels(training_pb2.ListModelsRequest(symbol="BTC/USD", timeframe="1h")).models
        assert [m.model_id for m in models] == [job.model_id]
        assert (models[0].label.horizon_bars, models[0].label.threshold) == (12, 0.01)
        assert models[0].metrics["prior_log_loss"] > 0

        window = frame[frame.open_time_ms >= ms("2018-12-20")].reset_index(drop=True)
        batch = predict(s.infer_stub, window)
        assert batch.model_id == job.model_id
        streamed = stream_all(s.infer_stub, [window.iloc[i:i + 37] for i in range(0, len(window), 37)])
        assert np.array_equal(np.vstack([probs(r) for r in streamed]), probs(batch), equal_nan=True)
        ready = np.array([p.ready for p in batch.predictions])
        assert len(np.unique(probs(batch)[ready, 2])) > 100

        long = s.train_stub.StartTraining(training_pb2.StartTrainingRequest(
            symbol="BTC/USD", timeframe="1h", params=common_pb2.ModelParams(n_estimators=3000)), timeout=10)
        deadline = time.monotonic() + 60
        while s.train_stub.GetTrainingJob(training_pb2.GetTrainingJobRequest(job_id=long.job_id)).stage != "fitting":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.train_stub.CancelTrainingJob(training_pb2.CancelTrainingJobRequest(job_id=long.job_id), timeout=5)
        assert wait_job(s.train_stub, long.job_id, 10).state == training_pb2.JOB_STATE_CANCELLED
        assert len(s.train_stub.ListModels(training_pb2.ListModelsRequest()).models) == 1
        assert not list((tmp_path / "models").glob("*.partial"))

        with pytest.raises(grpc.RpcError) as err:
            s.infer_stub.Predict(inference_pb2.PredictRequest(symbol="ETH/USD", timeframe="1h",
                                                              candles=candles_of(window.iloc[:5])), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            s.train_stub.StartTraining(training_pb2.StartTrainingRequest(
                symbol="BTC/USD", timeframe="1h", start_time=ts("2018-01-01"), end_time=ts("2018-01-05")), timeout=10)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        stop_services(s)
