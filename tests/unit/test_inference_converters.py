"""The numpy wire encoder of PredictResponse equals building the messages one by one."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_service.converters import predict_response, response_slow, response_wire
from inference_service.domain import Predictions

times = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=0, max_size=40)
probs = st.floats(allow_nan=True, allow_infinity=True, width=64)


@settings(max_examples=200, deadline=None)
@given(times, st.data(), st.text(max_size=200), st.booleans())
def test_fast_response_equals_reference(ts, data, model_id, scored):
    n = len(ts)
    p = np.array(data.draw(st.lists(probs, min_size=3 * n, max_size=3 * n)), dtype=np.float64).reshape(n, 3)
    ready = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    ins = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    score = np.array(data.draw(st.lists(probs, min_size=n, max_size=n)), dtype=np.float64) if scored else None
    flag = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool) if scored else None
    r = Predictions(np.array(ts, dtype=np.int64), p, ready, ins, score, flag)
    fast, slow = response_wire(model_id, r), response_slow(model_id, r)
    assert predict_response(model_id, r) == slow
    assert fast.model_id == slow.model_id and len(fast.predictions) == n
    for a, b in zip(fast.predictions, slow.predictions, strict=True):
        assert a.open_time_ms == b.open_time_ms and a.ready == b.ready and a.in_sample == b.in_sample
        assert a.ood == b.ood and a.HasField("ood_score") == b.HasField("ood_score") == scored
        for f in ("ml_up_prob", "ml_down_prob", "ml_range_prob", "ood_score"):
            x, y = getattr(a, f), getattr(b, f)
            assert np.float64(x).tobytes() == np.float64(y).tobytes()  # bit-identical, NaN payloads included
    # Deterministic serialisation agrees too (proto3 drops default fields either way).
    assert fast.SerializeToString(deterministic=True) == slow.SerializeToString(deterministic=True)


def test_realistic_batch():
    t = 1_546_300_800_000 + 3_600_000 * np.arange(1024, dtype=np.int64)
    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=1024)
    p[:99] = np.nan
    r = Predictions(t, p, np.arange(1024) >= 99, np.arange(1024) < 500)
    assert response_wire("BTC-USD_1h_x", r) == response_slow("BTC-USD_1h_x", r) == predict_response("BTC-USD_1h_x", r)
