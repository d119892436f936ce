"""What "beats the prior" means in the tests.

A model's served probabilities are shrunk toward the class prior with a weight w fitted on purged out-of-sample
rows. At w = 0 the model serves the prior itself: its log loss equals the prior's (a ratio of exactly 1), so any
check of the form "served <= bound x prior" with a bound of 1 or more passes for a model that adds nothing. A model
only beats the prior when its weight is above 0 and its served log loss is below the bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


def require_beats_prior(served: float, prior: float, weight: float, bound: float = 1.0, what: str = "model") -> None:
    """AssertionError unless `weight` > 0 and `served` < `bound` x `prior` (log losses; `bound` 1 means strictly
    better than the prior)."""
    assert weight > 0, (f"{what}: shrink weight {weight}: the model serves the class prior itself "
                        f"(log loss {served:.4f} against {prior:.4f}) and beats nothing")
    assert served < bound * prior, (f"{what}: served log loss {served:.4f} is {served / prior:.4f}x the prior's "
                                    f"{prior:.4f}, not below {bound}x")


@dataclass(frozen=True)
class SplitScore:
    """A model's served probabilities on a later period, scored against its training prior."""

    response: Any  # the PredictResponse over the period and the history before it
    test: np.ndarray  # bool per candle of the response: labelled and at or after the split
    served: float  # log loss of the served probabilities on the test candles
    prior: float  # log loss of the model's training class prior on the same candles
    record: Any  # the model's registry record (its prior, shrink weight and label)


def score_after_split(services, sample_frame, model_id: str, label, split: str, end: str,
                      history_from: str = "2018-03-01") -> SplitScore:
    """Predict the sample's candles [history_from, end) with `model_id` pinned, through the inference service, and
    score those from `split` on whose `label` is realised, as training labels them."""
    from test_inference_service import candles_of, probs

    from mlsignal.v1 import inference_pb2
    from service_fixtures import ts
    from shared.calibration import log_loss
    from shared.labels import make_labels
    from shared.store.db import make_engine
    from shared.store.registry import get_model
    from shared.timeframes import timeframe_ms

    engine = make_engine(services.url)
    try:
        rec = get_model(engine, model_id)
    finally:
        engine.dispose()
    t = sample_frame.open_time_ms
    frame = sample_frame[(t >= ts(history_from).ToMilliseconds()) & (t < ts(end).ToMilliseconds())]
    frame = frame.reset_index(drop=True)
    resp = services.infer_stub.Predict(inference_pb2.PredictRequest(
        symbol=rec.symbol, timeframe=rec.timeframe, model_id=model_id, candles=candles_of(frame)), timeout=60)
    y = make_labels(frame.close.to_numpy(), label, frame.open_time_ms.to_numpy(), timeframe_ms(rec.timeframe))
    test = (frame.open_time_ms >= ts(split).ToMilliseconds()).to_numpy() & (y >= 0)
    served = log_loss(probs(resp)[test], y[test].astype(int))
    prior = log_loss(np.tile(rec.prior, (int(test.sum()), 1)), y[test].astype(int))
    return SplitScore(resp, test, served, prior, rec)
