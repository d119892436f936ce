"""InferenceService over real gRPC: columnar batches answer bit for bit what rows answer, and every validation rule
is INVALID_ARGUMENT with a google.rpc.BadRequest field violation naming the field (in a stream: an answer with
`error` set, after which the stream goes on as if the message had not been sent)."""

from __future__ import annotations

import math

import grpc
import numpy as np
import pandas as pd
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from test_inference_service import candles_of

from mlsignal.v1 import common_pb2, inference_pb2
from service_fixtures import ms

SYMBOL, TF = "BTC/USD", "1h"
H = 3_600_000


@pytest.fixture(scope="module")
def frame(sample_frame) -> pd.DataFrame:
    f = sample_frame[sample_frame.open_time_ms >= ms("2019-01-10")].iloc[:1024].reset_index(drop=True)
    f = f.copy()
    f["open_interest"] = np.linspace(1e4, 2e4, len(f))  # a column no model here uses: still sent and kept
    return f


def columns_of(frame: pd.DataFrame) -> common_pb2.CandleColumns:
    cols = common_pb2.CandleColumns(open_time_ms=frame.open_time_ms.tolist())
    for name in ("open", "high", "low", "close", "volume"):
        getattr(cols, name).extend(frame[name].to_numpy(float))
    for name in ("funding_rate", "open_interest"):
        if name in frame:
            getattr(cols, name).extend(frame[name].to_numpy(float))
    return cols


def rows_request(frame, model_id="", first=True) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(symbol=SYMBOL if first else "", timeframe=TF if first else "",
                                        model_id=model_id, candles=candles_of(frame))


def columns_request(frame, model_id="", first=True) -> inference_pb2.PredictRequest:
    return inference_pb2.PredictRequest(symbol=SYMBOL if first else "", timeframe=TF if first else "",
                                        model_id=model_id, columns=columns_of(frame))


def bits(values) -> bytes:
    return np.asarray(list(values), dtype="<f8").tobytes()


def answers(responses) -> dict[str, bytes]:
    """The answers of one or more responses as bytes per field, whether they came as rows or as columns."""
    out: dict[str, list] = {"t": [], "up": [], "down": [], "range": [], "ready": [], "in_sample": []}
    for r in responses:
        if r.HasField("columns"):
            c = r.columns
            out["t"] += list(c.open_time_ms)
            out["up"] += list(c.ml_up_prob)
            out["down"] += list(c.ml_down_prob)
            out["range"] += list(c.ml_range_prob)
            out["ready"] += list(c.ready)
            out["in_sample"] += list(c.in_sample)
        else:
            for p in r.predictions:
                out["t"].append(p.open_time_ms)
                out["up"].append(p.ml_up_prob)
                out["down"].append(p.ml_down_prob)
                out["range"].append(p.ml_range_prob)
                out["ready"].append(p.ready)
                out["in_sample"].append(p.in_sample)
    return {"t": np.array(out["t"], dtype=np.int64).tobytes(), "up": bits(out["up"]), "down": bits(out["down"]),
            "range": bits(out["range"]), "ready": bytes(out["ready"]), "in_sample": bytes(out["in_sample"])}


def test_columnar_predict_equals_row_predict_bit_for_bit(services, frame):
    mid = services.btc_job.model_id
    by_rows = services.infer_stub.Predict(rows_request(frame, mid), timeout=30)
    by_columns = services.infer_stub.Predict(columns_request(frame, mid), timeout=30)
    assert by_columns.HasField("columns") and not by_columns.predictions
    assert not by_rows.HasField("columns") and len(by_rows.predictions) == len(frame)
    assert by_rows.model_id == by_columns.model_id == mid
    assert answers([by_rows]) == answers([by_columns])
    assert sum(by_columns.columns.ready) > 900


def test_columnar_streams_equal_predict_bit_for_bit(services, frame):
    mid = services.btc_job.model_id
    part = frame.iloc[:300]
    expected = answers([services.infer_stub.Predict(rows_request(part, mid), timeout=30)])
    one_by_one = [columns_request(part.iloc[i:i + 1], mid if i == 0 else "", first=i == 0) for i in range(len(part))]
    mixed = [(columns_request if i % 2 else rows_request)(part.iloc[a:b], mid if i == 0 else "", first=i == 0)
             for i, (a, b) in enumerate([(0, 120), (120, 121), (121, 200), (200, 201), (201, 300)])]
    for requests in (one_by_one, mixed):
        responses = list(services.infer_stub.StreamPredict(iter(requests), timeout=120))
        assert len(responses) == len(requests)
        assert [r.HasField("columns") for r in responses] == [r.HasField("columns") for r in requests]
        assert answers(responses) == expected


# (column, index, value, text): one bad value per rule
RULES = [
    ("close", 500, math.nan, "must be finite and > 0"),
    ("low", 500, -1.0, "must be finite and > 0"),
    ("high", 500, 1.0, "is below low"),
    ("open", 500, 1e9, "outside the candle's range"),
    ("close", 500, 1e-6, "outside the candle's range"),
    ("volume", 500, -1.0, "must be finite and >= 0"),
    ("open_interest", 500, 0.0, "must be finite and > 0 when present"),
    ("funding_rate", 500, math.inf, "must be finite when present"),
    ("open_time_ms", 0, 0, "is before 2010-01-01"),
    ("open_time_ms", 0, -H, "is before 2010-01-01"),
    ("open_time_ms", 1023, 7_258_118_400_000, "after the server's clock plus one timeframe"),
    ("open_time_ms", 500, None, "is not after the previous candle's"),
]


def broken(frame: pd.DataFrame, column: str, i: int, value) -> pd.DataFrame:
    f = frame.copy()
    if column == "funding_rate":
        f["funding_rate"] = np.nan
    if value is None:  # a time that repeats the previous one
        value = int(f.open_time_ms[i - 1])
    f.loc[i, column] = value
    return f


def violation(status: status_pb2.Status) -> str:
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            return bad.field_violations[0].field
    raise AssertionError(f"no BadRequest in {status}")


@pytest.mark.parametrize(("column", "i", "value", "text"), RULES)
@pytest.mark.parametrize("columnar", [False, True], ids=["rows", "columns"])
def test_each_rule_is_invalid_argument_naming_the_field(services, frame, column, i, value, text, columnar):
    bad = broken(frame, column, i, value)
    make = columns_request if columnar else rows_request
    if column in ("funding_rate", "open_interest"):
        # Predict checks the optional columns its model reads; a stream keeps (and checks) every column
        responses = list(services.infer_stub.StreamPredict(iter([make(bad)]), timeout=30))
        assert len(responses) == 1 and responses[0].error.code == code_pb2.INVALID_ARGUMENT
        status = responses[0].error
    else:
        with pytest.raises(grpc.RpcError) as err:
            services.infer_stub.Predict(make(bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert text in err.value.details()
        status = rpc_status.from_call(err.value)
    assert text in status.message
    assert violation(status) == (f"columns.{column}[{i}]" if columnar else f"candles[{i}].{column}")


@pytest.mark.parametrize("case", ["both", "unequal", "oversized", "empty"])
def test_malformed_batches_are_invalid_argument(services, frame, case):
    request = columns_request(frame.iloc[:10])
    field = {"both": "columns", "unequal": "columns.volume", "oversized": "columns.open_time_ms",
             "empty": "columns.open_time_ms"}[case]
    if case == "both":
        request.candles.extend(candles_of(frame.iloc[:10]))
    elif case == "unequal":
        del request.columns.volume[-1]
    elif case == "oversized":
        n = services.settings.max_batch + 1
        request = inference_pb2.PredictRequest(symbol=SYMBOL, timeframe=TF, columns=common_pb2.CandleColumns(
            open_time_ms=[0] * n))  # nothing else: the size is refused before any column is read
    else:
        request.ClearField("columns")
        request.columns.SetInParent()
    with pytest.raises(grpc.RpcError) as err:
        services.infer_stub.Predict(request, timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violation(rpc_status.from_call(err.value)) == field


def test_a_refused_stream_message_changes_nothing(services, frame):
    """Bad messages are answered with `error`; the stream goes on, answering what Predict over the good candles
    answers."""
    mid = services.btc_job.model_id
    good = frame.iloc[:260]
    bad_messages = [broken(frame, c, i, v).iloc[i:i + 1] for c, i, v, _ in RULES if 0 < i < 260 and v is not None]
    bad_messages += [broken(frame, "close", 201, 1e-6).iloc[200:202],  # good then bad: nothing of it is kept
                     good.iloc[150:151]]  # back in time
    requests = [columns_request(good.iloc[:200], mid)]
    for k, bad in enumerate(bad_messages):
        requests.append((columns_request if k % 2 else rows_request)(bad, first=False))
    requests += [rows_request(good.iloc[i:i + 1], first=False) for i in range(200, 260)]
    responses = list(services.infer_stub.StreamPredict(iter(requests), timeout=120))
    assert len(responses) == len(requests)
    refused = responses[1:1 + len(bad_messages)]
    assert all(r.error.code == code_pb2.INVALID_ARGUMENT for r in refused)
    assert all(not r.predictions and not r.HasField("columns") for r in refused)
    expected = answers([services.infer_stub.Predict(rows_request(good, mid), timeout=30)])
    assert answers([responses[0], *responses[1 + len(bad_messages):]]) == expected
