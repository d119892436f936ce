"""PredictRequest candles to domain candle batches, and predictions to PredictResponse messages.

Both directions avoid Python work per candle where they can. Reading a request's candles costs an attribute access
per candle and field, so `request_candles` defers the reading until the service knows which optional columns its
model uses, and then reads the required fields in one pass. Building one Prediction object per candle costs about
4 µs each, more than the model itself on a large batch, so `predict_response` writes the protobuf wire format of
the repeated predictions with numpy and lets the C parser build the message (`response_wire`); `response_slow` is
the plain reference it is tested against, and the faster way for small results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from inference_service.domain import CandleBatch, Predictions
from mlsignal.v1 import common_pb2, inference_pb2

# --------------------------------------------------------------------------------------------------------------------
# requests


def candle_batch(
    candles: Sequence[common_pb2.Candle], funding_rate: bool = True, open_interest: bool = True
) -> CandleBatch:
    """Columns from repeated Candle messages; unset optional fields become NaN.

    Reading a field costs a Python attribute access per candle, so optional fields a model does not use are
    not read at all (left NaN), and the required ones are read in one pass, straight into their columns.
    """
    n = len(candles)
    t = np.array([c.open_time_ms for c in candles], dtype=np.int64) if n else np.empty(0, np.int64)
    values = np.empty((7, n))  # open, high, low, close, volume, funding_rate, open_interest
    if n:
        values[:5].T[...] = [(c.open, c.high, c.low, c.close, c.volume) for c in candles]
    nan = math.nan
    if funding_rate:
        values[5] = [c.funding_rate if c.HasField("funding_rate") else nan for c in candles]
    else:
        values[5] = nan
    if open_interest:
        values[6] = [c.open_interest if c.HasField("open_interest") else nan for c in candles]
    else:
        values[6] = nan
    return CandleBatch(t, *values)


class RequestCandles:
    """The candles of one request as a `CandleSource`: read by `candle_batch` once the columns are known."""

    __slots__ = ("_candles",)

    def __init__(self, candles: Sequence[common_pb2.Candle]) -> None:
        self._candles = candles

    def __len__(self) -> int:
        return len(self._candles)

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        return candle_batch(self._candles, funding_rate, open_interest)


def request_candles(request: inference_pb2.PredictRequest) -> RequestCandles:
    return RequestCandles(request.candles)


# --------------------------------------------------------------------------------------------------------------------
# responses

DOWN, RANGE, UP = 0, 1, 2

# Wire tags: PredictResponse.predictions (field 2, length-delimited); Prediction fields 1..6.
_PREDICTION_TAG = 0x12
_T, _UP, _DOWN, _RANGE, _READY, _IN_SAMPLE = 0x08, 0x11, 0x19, 0x21, 0x28, 0x30


def _varint_bytes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Varint encoding of int64 values: a (n, 10) uint8 matrix and each value's length in bytes."""
    u = values.astype(np.int64).view(np.uint64)
    groups = (u[:, None] >> (np.arange(10, dtype=np.uint64) * np.uint64(7))) & np.uint64(0x7F)
    # Length: one byte per 7 significant bits, at least one.
    length = np.ones(len(u), dtype=np.int64)
    for k in range(1, 10):
        length += (u >> np.uint64(7 * k)) > 0
    more = np.arange(10)[None, :] < (length[:, None] - 1)
    return (groups | (more.astype(np.uint64) << np.uint64(7))).astype(np.uint8), length


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def response_wire(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The message parsed from numpy-encoded wire bytes (what `predict_response` uses for large results)."""
    mid = model_id.encode()
    head = b"\x0a" + _varint(len(mid)) + mid if mid else b""
    return inference_pb2.PredictResponse.FromString(head + encode_predictions(r))


def encode_predictions(r: Predictions) -> bytes:
    """The bytes of `repeated Prediction predictions = 2` for predictions (every field written explicitly)."""
    n = len(r.open_time_ms)
    if n == 0:
        return b""
    tvar, tlen = _varint_bytes(r.open_time_ms)
    doubles = np.ascontiguousarray(r.proba[:, [UP, DOWN, RANGE]], dtype="<f8").view(np.uint8).reshape(n, 24)
    body = 1 + tlen + 27 + 4  # tag+varint time, three tagged doubles, two tagged bools
    # Row layout: [0x12, len, 0x08, t(10, masked), 0x11, d(8), 0x19, d(8), 0x21, d(8), 0x28, b, 0x30, b]
    width = 2 + 1 + 10 + 27 + 4
    m = np.zeros((n, width), dtype=np.uint8)
    keep = np.ones((n, width), dtype=bool)
    m[:, 0] = _PREDICTION_TAG
    m[:, 1] = body  # always < 128, so one length byte
    m[:, 2] = _T
    m[:, 3:13] = tvar
    keep[:, 3:13] = np.arange(10)[None, :] < tlen[:, None]
    for j, tag in enumerate((_UP, _DOWN, _RANGE)):
        m[:, 13 + 9 * j] = tag
        m[:, 14 + 9 * j: 22 + 9 * j] = doubles[:, 8 * j: 8 * j + 8]
    m[:, 40] = _READY
    m[:, 41] = r.ready
    m[:, 42] = _IN_SAMPLE
    m[:, 43] = r.in_sample
    return m[keep].tobytes()


# Below this many predictions the numpy encoder's fixed cost exceeds building the objects directly.
WIRE_ENCODE_MIN = 48


def predict_response(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The PredictResponse for predictions, built by whichever way is faster for their size."""
    if len(r.open_time_ms) < WIRE_ENCODE_MIN:
        return response_slow(model_id, r)
    return response_wire(model_id, r)


def response_slow(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """One Prediction object per candle: the reference `predict_response` must equal."""
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
