"""PredictRequest candles to domain candle batches, and predictions to PredictResponse messages.

Both directions avoid Python work per candle where they can. Reading a request's candles costs an attribute access
per candle and field, so `RequestCandles` defers the reading until the batch size has been checked, and then reads
every field in one pass. Building one Prediction object per candle costs about
4 µs each, more than the model itself on a large batch, so `predict_response` writes the protobuf wire format of
the repeated predictions with numpy and lets the C parser build the message (`response_wire`); `response_slow` is
the plain reference it is tested against, and the faster way for small results.

A request may carry its candles as packed columns (`PredictRequest.columns`) instead: each column is copied into a
numpy array in one call, and such a request is answered in columns (`PredictionColumns`), written as packed wire
fields by numpy. The servicer calls `batch_from_request` (which checks the batch size before anything is converted)
and `response_for` (rows or columns, as the request came).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from inference_service.domain import CandleBatch, CandleSource, Predictions, candles_field
from mlsignal.v1 import common_pb2, inference_pb2
from shared.candles import check_batch_size
from shared.converters import candle_batch, columns_batch  # shared with the training service (ImportCandles)
from shared.errors import InvalidArgument

# --------------------------------------------------------------------------------------------------------------------
# requests


class RequestCandles:
    """The candles of one request as a `CandleSource`: read by `candle_batch` once the columns are known."""

    __slots__ = ("_candles",)

    def __init__(self, candles: Sequence[common_pb2.Candle]) -> None:
        self._candles = candles

    def __len__(self) -> int:
        return len(self._candles)

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        return candle_batch(self._candles, funding_rate, open_interest)


class ColumnCandles:
    """The candles of a request that used `columns`, as a `CandleSource` (already read: columns are cheap)."""

    __slots__ = ("batch",)
    columnar = True  # errors name fields as columns.<name>[i]

    def __init__(self, batch: CandleBatch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch)

    def read(self, funding_rate: bool, open_interest: bool) -> CandleBatch:
        return self.batch.read(funding_rate, open_interest)


def uses_columns(request: inference_pb2.PredictRequest) -> bool:
    """Whether a request carries its candles as columns (and is answered in columns)."""
    return request.HasField("columns")


def batch_from_request(request: inference_pb2.PredictRequest, max_batch: int) -> CandleSource:
    """The request's candles as a source, rows or columns, after checking the batch size (INVALID_ARGUMENT).

    The size is read from the message before a single candle is converted, so an oversized request costs nothing
    but its parsing. A request carrying both candles and columns is refused.
    """
    columnar = uses_columns(request)
    if columnar and len(request.candles):
        raise InvalidArgument(
            "candles, columns: a request carries its candles either as candles or as columns, not both",
            field="columns")
    if columnar:
        check_batch_size(len(request.columns.open_time_ms), max_batch, candles_field(True))
        return ColumnCandles(columns_batch(request.columns))
    check_batch_size(len(request.candles), max_batch, candles_field(False))
    return RequestCandles(request.candles)


# --------------------------------------------------------------------------------------------------------------------
# responses

DOWN, RANGE, UP = 0, 1, 2

# Wire tags: PredictResponse.predictions (field 2, length-delimited); Prediction fields 1..6.
_PREDICTION_TAG = 0x12
_T, _UP, _DOWN, _RANGE, _READY, _IN_SAMPLE, _OOD_SCORE, _OOD = 0x08, 0x11, 0x19, 0x21, 0x28, 0x30, 0x39, 0x40


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
    scored = r.ood_score is not None
    extra = 11 if scored else 0  # the OOD score and flag: a tagged double and a tagged bool
    body = 1 + tlen + 27 + 4 + extra  # tag+varint time, three tagged doubles, two tagged bools
    # Row layout: [0x12, len, 0x08, t(10, masked), 0x11, d(8), 0x19, d(8), 0x21, d(8), 0x28, b, 0x30, b] and, for a
    # model with the score, [0x39, d(8), 0x40, b]
    width = 2 + 1 + 10 + 27 + 4 + extra
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
    if scored:
        score, flag = r.ood_columns()
        m[:, 44] = _OOD_SCORE
        m[:, 45:53] = np.ascontiguousarray(score, dtype="<f8").view(np.uint8).reshape(n, 8)
        m[:, 53] = _OOD
        m[:, 54] = flag
    return m[keep].tobytes()


# Below this many predictions the numpy encoder's fixed cost exceeds building the objects directly.
WIRE_ENCODE_MIN = 48


def predict_response(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The PredictResponse for predictions, built by whichever way is faster for their size."""
    if len(r.open_time_ms) < WIRE_ENCODE_MIN:
        return response_slow(model_id, r)
    return response_wire(model_id, r)


def response_for(request: inference_pb2.PredictRequest, model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The answer to a request: in columns when the request used columns, otherwise one Prediction per candle."""
    if uses_columns(request):
        return columns_response(model_id, r)
    return predict_response(model_id, r)


# Wire tags: PredictResponse.columns (field 3, length-delimited); PredictionColumns fields 1..6, all packed.
_COLUMNS_TAG = 0x1A
_COL_T, _COL_UP, _COL_DOWN, _COL_RANGE, _COL_READY, _COL_IN_SAMPLE = 0x0A, 0x12, 0x1A, 0x22, 0x2A, 0x32
_COL_OOD_SCORE, _COL_OOD = 0x3A, 0x42


_SHIFTS = np.arange(10, dtype=np.uint64) * np.uint64(7)
_VARINT_LIMITS = np.uint64(1) << _SHIFTS[1:]  # 2**7 .. 2**63: a value below limit k takes k + 1 bytes


def _packed_varints(values: np.ndarray) -> bytes:
    """The varints of int64 values back to back (a packed repeated int64 field's payload)."""
    u = np.ascontiguousarray(values, dtype=np.int64).view(np.uint64)
    length = np.searchsorted(_VARINT_LIMITS, u, side="right") + 1
    width, shortest = int(length.max()), int(length.min())
    groups = ((u[:, None] >> _SHIFTS[:width]) & np.uint64(0x7F)).astype(np.uint8)
    if shortest == width:  # the usual case: every open time takes the same number of bytes
        groups[:, :width - 1] |= np.uint8(0x80)
        return groups.tobytes()
    more = np.arange(width)[None, :] < (length[:, None] - 1)
    groups |= more.astype(np.uint8) << np.uint8(7)
    return groups[np.arange(width)[None, :] < length[:, None]].tobytes()


def _packed(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + _varint(len(data)) + data if data else b""


def encode_prediction_columns(r: Predictions) -> bytes:
    """The bytes of a PredictionColumns message for predictions: packed fields, doubles bit for bit."""
    n = len(r.open_time_ms)
    if n == 0:
        return b""
    times = _packed_varints(r.open_time_ms)
    doubles = [np.ascontiguousarray(r.proba[:, k], dtype="<f8").tobytes() for k in (UP, DOWN, RANGE)]
    score, flag = r.ood_columns() if r.ood_score is not None else (np.empty(0), np.empty(0, dtype=bool))
    return b"".join([
        _packed(_COL_T, times),
        _packed(_COL_UP, doubles[0]), _packed(_COL_DOWN, doubles[1]), _packed(_COL_RANGE, doubles[2]),
        _packed(_COL_READY, np.asarray(r.ready, dtype=np.uint8).tobytes()),
        _packed(_COL_IN_SAMPLE, np.asarray(r.in_sample, dtype=np.uint8).tobytes()),
        _packed(_COL_OOD_SCORE, np.ascontiguousarray(score, dtype="<f8").tobytes()),
        _packed(_COL_OOD, np.asarray(flag, dtype=np.uint8).tobytes()),
    ])


# Below this many predictions building the columns message directly is faster than encoding it with numpy.
COLUMNS_WIRE_MIN = 16


def columns_response(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The PredictResponse that answers a columnar request: `columns` set (even when empty), `predictions` empty."""
    if len(r.open_time_ms) < COLUMNS_WIRE_MIN:
        return columns_response_slow(model_id, r)
    mid = model_id.encode()
    body = encode_prediction_columns(r)
    head = b"\x0a" + _varint(len(mid)) + mid if mid else b""
    return inference_pb2.PredictResponse.FromString(head + bytes((_COLUMNS_TAG,)) + _varint(len(body)) + body)


def columns_response_slow(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """The columns answer built field by field: the reference `columns_response` must equal."""
    response = inference_pb2.PredictResponse(model_id=model_id)
    cols = response.columns
    cols.SetInParent()
    cols.open_time_ms.extend(r.open_time_ms.tolist())
    cols.ml_up_prob.extend(r.proba[:, UP].tolist())
    cols.ml_down_prob.extend(r.proba[:, DOWN].tolist())
    cols.ml_range_prob.extend(r.proba[:, RANGE].tolist())
    cols.ready.extend(r.ready.tolist())
    cols.in_sample.extend(r.in_sample.tolist())
    if r.ood_score is not None:
        score, flag = r.ood_columns()
        cols.ood_score.extend(score.tolist())
        cols.ood.extend(flag.tolist())
    return response


def response_slow(model_id: str, r: Predictions) -> inference_pb2.PredictResponse:
    """One Prediction object per candle: the reference `predict_response` must equal."""
    P = inference_pb2.Prediction
    times = r.open_time_ms.tolist()
    up, down, rng = r.proba[:, UP].tolist(), r.proba[:, DOWN].tolist(), r.proba[:, RANGE].tolist()
    ready, ins = r.ready.tolist(), r.in_sample.tolist()
    if r.ood_score is None:
        return inference_pb2.PredictResponse(
            model_id=model_id,
            predictions=[
                P(open_time_ms=times[i], ml_up_prob=up[i], ml_down_prob=down[i], ml_range_prob=rng[i],
                  ready=ready[i], in_sample=ins[i])
                for i in range(len(times))
            ],
        )
    score, flag = (a.tolist() for a in r.ood_columns())
    return inference_pb2.PredictResponse(
        model_id=model_id,
        predictions=[
            P(open_time_ms=times[i], ml_up_prob=up[i], ml_down_prob=down[i], ml_range_prob=rng[i],
              ready=ready[i], in_sample=ins[i], ood_score=score[i], ood=flag[i])
            for i in range(len(times))
        ],
    )
