"""Prediction results to PredictResponse messages."""

from __future__ import annotations

from mlsignal.v1 import inference_pb2
from inference_service.predictor import Result

DOWN, RANGE, UP = 0, 1, 2


def response(model_id: str, r: Result) -> inference_pb2.PredictResponse:
    P = inference_pb2.Prediction
    times = r.open_time_ms.tolist()
    up, down, rng = r.proba[:, UP].tolist(), r.proba[:, DOWN].tolist(), r.proba[:, RANGE].tolist()
    ready, ins = r.ready.tolist(), r.in_sample.tolist()
    return inference_pb2.PredictResponse(
        model_id=model_id,
        predictions=[
            P(open_time_ms=times[i], ml_up_prob=up[i], ml_down_prob=down[i], ml_range_prob=rng[i],
              ready=ready[i], in_sample=ins[i])
            for i in range(len(times))
        ],
    )
