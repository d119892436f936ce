"""Columnar batches: `PredictRequest.columns` in, `PredictResponse.columns` out, bit for bit the answers of rows."""

# ruff: noqa: F811  (pytest fixtures imported from test_inference_service_logic are redefined as parameters)
from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_inference_service_logic import (  # noqa: F401  (fixtures)
    MAX_BATCH,
    SYMBOL,
    TF,
    N,
    make_candles,
    model,
    registry,
    service,
    store,
)
from test_inference_validation import columns_request, rows_request

from inference_service.converters import (
    batch_from_request,
    columns_response,
    columns_response_slow,
    response_for,
)
from inference_service.domain import Predictions
from inference_service.service import InferenceService
from inference_service.stream_session import StreamSession
from mlsignal.v1 import inference_pb2
from shared.features import FeatureSpec

times = st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), min_size=0, max_size=40)
probs = st.floats(allow_nan=True, allow_infinity=True, width=64)


def bits(values) -> bytes:
    return np.asarray(list(values), dtype="<f8").tobytes()


@settings(max_examples=200, deadline=None)
@given(times, st.data(), st.text(max_size=200))
def test_the_columns_encoder_equals_the_reference(ts, data, model_id):
    n = len(ts)
    p = np.array(data.draw(st.lists(probs, min_size=3 * n, max_size=3 * n)), dtype=np.float64).reshape(n, 3)
    ready = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    ins = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    score = np.array(data.draw(st.lists(probs, min_size=n, max_size=n)), dtype=np.float64)
    flag = np.array(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=bool)
    r = Predictions(np.array(ts, dtype=np.int64), p, ready, ins, score, flag)
    slow = columns_response_slow(model_id, r)
    wire = columns_response(model_id, r)
    for fast in (wire, inference_pb2.PredictResponse.FromString(wire.SerializeToString())):  # and over the wire
        assert fast.model_id == slow.model_id and fast.HasField("columns") and len(fast.predictions) == 0
        assert list(fast.columns.open_time_ms) == ts
        for f in ("ml_up_prob", "ml_down_prob", "ml_range_prob", "ood_score"):
            assert bits(getattr(fast.columns, f)) == bits(getattr(slow.columns, f))  # NaN payloads included
        assert list(fast.columns.ready) == ready.tolist() and list(fast.columns.in_sample) == ins.tolist()
        assert list(fast.columns.ood) == flag.tolist()


def test_the_wire_encoder_on_a_realistic_batch():
    t = 1_546_300_800_000 + 3_600_000 * np.arange(1024, dtype=np.int64)
    p = np.random.default_rng(0).dirichlet([1, 1, 1], size=1024)
    p[:99] = np.nan
    r = Predictions(t, p, np.arange(1024) >= 99, np.arange(1024) < 500)
    fast = columns_response("BTC-USD_1h_x", r)
    assert fast == columns_response_slow("BTC-USD_1h_x", r)
    assert np.array_equal(np.asarray(fast.columns.ml_up_prob), p[:, 2], equal_nan=True)
    assert np.array_equal(np.asarray(fast.columns.ml_down_prob), p[:, 0], equal_nan=True)


def rows_of(response: inference_pb2.PredictResponse) -> dict[str, bytes]:
    """A response's answers as bytes per field, from rows or from columns alike."""
    if response.HasField("columns"):
        c = response.columns
        return {"t": np.asarray(c.open_time_ms, dtype=np.int64).tobytes(), "up": bits(c.ml_up_prob),
                "down": bits(c.ml_down_prob), "range": bits(c.ml_range_prob),
                "ready": bytes(list(c.ready)), "in_sample": bytes(list(c.in_sample))}
    ps = response.predictions
    return {"t": np.array([p.open_time_ms for p in ps], dtype=np.int64).tobytes(),
            "up": bits(p.ml_up_prob for p in ps), "down": bits(p.ml_down_prob for p in ps),
            "range": bits(p.ml_range_prob for p in ps), "ready": bytes([p.ready for p in ps]),
            "in_sample": bytes([p.in_sample for p in ps])}


def answer(service: InferenceService, request: inference_pb2.PredictRequest) -> inference_pb2.PredictResponse:
    """What the servicer does for one Predict: convert, predict, convert back."""
    m, p = service.predict(request.symbol, request.timeframe, request.model_id,
                           batch_from_request(request, service.max_batch))
    return response_for(request, m.model_id, p)


@pytest.mark.parametrize("spec", [FeatureSpec(), FeatureSpec(use_funding_rate=True, use_open_interest=True)])
def test_columnar_predict_equals_row_predict_bit_for_bit(registry, store, spec):
    registry.register(spec=spec, seed=21)
    service = InferenceService(store, MAX_BATCH)
    candles = make_candles(N, seed=3, funding=True, open_interest=True)
    by_rows, by_columns = answer(service, rows_request(candles)), answer(service, columns_request(candles))
    assert not by_rows.HasField("columns") and len(by_rows.predictions) == N
    assert by_columns.HasField("columns") and len(by_columns.predictions) == 0
    assert by_rows.model_id == by_columns.model_id
    assert rows_of(by_rows) == rows_of(by_columns)
    assert sum(by_rows.predictions[i].ready for i in range(N)) > 0


def test_columnar_streams_equal_row_streams_and_predict(registry, store, model, service):
    """One candle at a time and in chunks, rows and columns mixed in one stream: the answers of one Predict."""
    candles = make_candles(N, seed=4, funding=True, open_interest=True)
    expected = rows_of(answer(service, rows_request(candles)))
    bounds = [int(b) for b in np.cumsum([0, 1, 7, 93, 3, 150, 146])]
    for chunks, columnar in ((list(itertools.pairwise(bounds)), lambda i: i % 2 == 1),
                             ([(i, i + 1) for i in range(N)], lambda i: True),
                             ([(i, i + 1) for i in range(N)], lambda i: i % 3 == 0)):
        session = StreamSession(service)
        parts = []
        for i, (a, b) in enumerate(chunks):
            make = columns_request if columnar(i) else rows_request
            request = make(candles.slice(a, b))
            if i:
                request.symbol = request.timeframe = ""
            m, p = session.step(request.symbol, request.timeframe, "", batch_from_request(request, MAX_BATCH))
            response = response_for(request, m.model_id, p)
            assert response.HasField("columns") == columnar(i)
            parts.append(rows_of(response))
        joined = {k: b"".join(part[k] for part in parts) for k in expected}
        assert joined == expected
