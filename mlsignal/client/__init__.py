"""Client SDK for strategy engines: typed errors, channels, and the training and inference clients.

Backtest: add ML_UP_PROB / ML_DOWN_PROB / ML_RANGE_PROB to a candle frame and combine them with other indicators::

    >>> from mlsignal.client import InferenceClient
    >>> with InferenceClient("127.0.0.1:50052") as c:                      # doctest: +SKIP
    ...     out = c.predict(df, "BTC/USDT", "1h")
    >>> honest = out[~out.ML_IN_SAMPLE]                                     # doctest: +SKIP
    >>> long = (honest.ML_UP_PROB > 0.6) & (rsi < 70)                      # doctest: +SKIP

Live: one prediction per candle as it closes (or as a still-forming candle is updated)::

    >>> with InferenceClient("127.0.0.1:50052") as c:                      # doctest: +SKIP
    ...     for p in c.stream(exchange_candles(), "BTC/USDT", "1h"):
    ...         if p.ready and p.up > 0.6:
    ...             go_long()

Retraining::

    >>> with TrainingClient("127.0.0.1:50051") as t:                       # doctest: +SKIP
    ...     job = t.train("BTC/USDT", "1h", "2017-07-01", "2019-01-01").wait()
    >>> job.model_id, job.metrics["log_loss"], job.metrics["prior_log_loss"]  # doctest: +SKIP

Every call that fails on the server raises a subclass of `MlsignalClientError` that carries the gRPC status `code`
and the server's `details`. Input the client can check itself (a tz-naive index, a missing column) raises
`ValueError` before anything is sent. Probabilities are never filled in: a candle that is not ready has NaN.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import numpy as np
import pandas as pd

from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc, training_pb2, training_pb2_grpc
from shared.timeframes import ms_to_datetime, parse_time

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_MESSAGE_BYTES",
    "ML_COLUMNS",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InferenceClient",
    "InvalidArgumentError",
    "LivePrediction",
    "MlsignalClientError",
    "NotFoundError",
    "ProtocolError",
    "ResourceExhaustedError",
    "TrainingClient",
    "TrainingFailedError",
    "TrainingJobHandle",
    "UnauthenticatedError",
    "UnavailableError",
    "batch_plan",
    "connect_channel",
    "error_from_rpc",
    "frame_times_ms",
    "frame_to_candles",
    "is_final",
    "job_state_name",
    "predictions_to_frame",
    "to_epoch_ms",
]

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
ML_COLUMNS = ("ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB", "ML_READY", "ML_IN_SAMPLE", "ML_MODEL_ID")
REQUIRED_COLUMNS = ("open", "high", "low", "close", "volume")
OPTIONAL_COLUMNS = ("funding_rate", "open_interest")
TIME_COLUMNS = ("open_time", "timestamp")
# Epoch milliseconds below this (1973-03-03) are almost certainly epoch seconds passed by mistake.
_MIN_PLAUSIBLE_MS = 10**11
_FINAL_STATES = frozenset(
    {training_pb2.JOB_STATE_SUCCEEDED, training_pb2.JOB_STATE_FAILED, training_pb2.JOB_STATE_CANCELLED}
)


# ----------------------------------------------------------------------------------------------------------------------
# errors


class MlsignalClientError(Exception):
    """A failed call: `code` is the grpc.StatusCode (None when the failure is not a gRPC status), `details` the message.

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     out = client.predict(df, "BTC/USDT", "1h")
        ... except NotFoundError:
        ...     out = None          # no model yet: trade without the ML filter
        ... except MlsignalClientError as exc:
        ...     log.error("mlsignal failed: %s (%s)", exc.details, exc.code)
    """

    def __init__(self, code: grpc.StatusCode | None, details: str, note: str = ""):
        self.code = code
        self.details = details
        self.note = note
        super().__init__(self._text())

    def __reduce__(self):
        return (self.__class__, (self.code, self.details, self.note))

    def _text(self) -> str:
        head = f"{self.code.name}: {self.details}" if self.code is not None else self.details
        return f"{head} ({self.note})" if self.note else head


class InvalidArgumentError(MlsignalClientError):
    """INVALID_ARGUMENT: the request is malformed; `details` names the field and what was expected."""


class NotFoundError(MlsignalClientError):
    """NOT_FOUND: no model for the symbol and timeframe, or an unknown job or model id."""


class FailedPreconditionError(MlsignalClientError):
    """FAILED_PRECONDITION: e.g. no candles stored for the range, or the job already finished."""


class ResourceExhaustedError(MlsignalClientError):
    """RESOURCE_EXHAUSTED: the training queue is full, or a message is too large; retry later or send less."""


class UnavailableError(MlsignalClientError):
    """UNAVAILABLE: the service (or its database) cannot be reached; usually worth a retry with back-off."""


class UnauthenticatedError(MlsignalClientError):
    """UNAUTHENTICATED: the bearer token is missing or was refused."""


class DeadlineExceededError(MlsignalClientError):
    """DEADLINE_EXCEEDED: the call took longer than the client's `timeout`."""


class DataLossError(MlsignalClientError):
    """DATA_LOSS: stored data is damaged, e.g. a model artifact whose sha256 does not verify."""


class ProtocolError(MlsignalClientError):
    """The server answered something that breaks the contract (wrong count, order or model); `code` is None."""


class TrainingFailedError(MlsignalClientError):
    """A training job ended FAILED or CANCELLED; `job` is the final TrainingJob message and `details` its error.

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     job = training.train("BTC/USDT", "1h").wait()
        ... except TrainingFailedError as exc:
        ...     print(job_state_name(exc.job.state), exc.job.error)
    """

    def __init__(self, job: training_pb2.TrainingJob):
        self.job = job
        state = job_state_name(job.state)
        super().__init__(None, job.error or f"job {job.job_id} ended {state}", note=f"job {job.job_id} {state}")

    def __reduce__(self):
        return (self.__class__, (self.job,))


_ERROR_CLASSES: dict[grpc.StatusCode, type[MlsignalClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.DATA_LOSS: DataLossError,
}


def error_from_rpc(err: grpc.RpcError, note: str = "") -> MlsignalClientError:
    """The typed exception for a grpc.RpcError (MlsignalClientError itself for codes without a subclass).

    Example::

        >>> try:                                                            # doctest: +SKIP
        ...     stub.GetModel(request)
        ... except grpc.RpcError as rpc_error:
        ...     raise error_from_rpc(rpc_error) from rpc_error
    """
    code_fn = getattr(err, "code", None)
    details_fn = getattr(err, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = details_fn() if callable(details_fn) else None
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    cls = _ERROR_CLASSES.get(code, MlsignalClientError)
    return cls(code, details or str(err) or code.name, note=note)


def _raise_rpc(err: grpc.RpcError, note: str = ""):
    raise error_from_rpc(err, note) from err


# ----------------------------------------------------------------------------------------------------------------------
# channels


class _CallDetails(
    collections.namedtuple(
        "_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class _MetadataInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds fixed metadata (the bearer token) to every call on an insecure channel."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._metadata = tuple(metadata)

    def _details(self, d):
        metadata = (*(d.metadata or ()), *self._metadata)
        return _CallDetails(d.method, d.timeout, metadata, d.credentials,
                            getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def connect_channel(
    target: str,
    *,
    tls: bool = False,
    root_certificates: bytes | None = None,
    token: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    load_balancing: str | None = "round_robin",
) -> grpc.Channel:
    """A channel to an mlsignal service, with 64 MiB messages and round-robin load balancing.

    `target` is passed to gRPC unchanged: ``host:port``, ``dns:///host:port`` (every address the name resolves to is
    used, round robin) or ``ipv4:10.0.0.1:50052,10.0.0.2:50052``. With `tls` the server certificate is checked against
    `root_certificates` (PEM; None means the system roots). A `token` is sent as ``authorization: Bearer <token>`` on
    every call. `options` are extra gRPC channel arguments and override the defaults. `load_balancing` None leaves
    gRPC's default (pick_first).

    Example::

        >>> channel = connect_channel("dns:///inference.internal:50052", tls=True, token=os.environ["MLSIGNAL_TOKEN"])
        ... # doctest: +SKIP
        >>> stub = inference_pb2_grpc.InferenceServiceStub(channel)        # doctest: +SKIP
    """
    if not isinstance(target, str) or not target.strip():
        raise ValueError(f"target must be an address like 127.0.0.1:50052 or dns:///host:port, got {target!r}")
    if token is not None and (not isinstance(token, str) or not token or "\n" in token or "\r" in token):
        raise ValueError("token must be a non-empty string without line breaks")
    if root_certificates is not None and not tls:
        raise ValueError("root_certificates only apply with tls=True")
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
    }
    if load_balancing:
        opts["grpc.lb_policy_name"] = load_balancing
    opts.update(dict(options))
    channel_options = list(opts.items())
    if tls:
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
        if token is not None:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        return grpc.secure_channel(target, creds, options=channel_options)
    channel = grpc.insecure_channel(target, options=channel_options)
    if token is not None:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor([("authorization", f"Bearer {token}")]))
    return channel


# ----------------------------------------------------------------------------------------------------------------------
# times


def to_epoch_ms(value: Any, what: str = "time") -> int:
    """UTC epoch milliseconds from a tz-aware datetime / pandas Timestamp, an ISO-8601 string, or epoch ms (int).

    ISO strings without an offset are read as UTC (``"2018-01-01"`` is midnight UTC). A tz-naive datetime is refused,
    because nothing says which zone it is in; floats are refused, because seconds and milliseconds look alike.

    Example::

        >>> to_epoch_ms("2018-01-01")                                       # doctest: +SKIP
        1514764800000
        >>> to_epoch_ms(pd.Timestamp("2018-01-01", tz="UTC"))              # doctest: +SKIP
        1514764800000
    """
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{what}: expected a datetime, ISO-8601 string or epoch milliseconds, got {value!r}")
    if isinstance(value, (int, np.integer)):
        ms = int(value)
        if ms < _MIN_PLAUSIBLE_MS:
            raise ValueError(f"{what}: {ms} is before 1973 as epoch milliseconds; epoch seconds must be multiplied "
                             "by 1000")
        return ms
    if isinstance(value, str):
        try:
            return parse_time(value)
        except ValueError as exc:
            raise ValueError(f"{what}: {exc}") from None
    if isinstance(value, np.datetime64):
        raise ValueError(f"{what}: numpy datetime64 has no time zone; pass pd.Timestamp(value, tz='UTC')")
    if isinstance(value, datetime):  # includes pd.Timestamp
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"{what}: {value!r} has no time zone; use a tz-aware value such as "
                             "pd.Timestamp(..., tz='UTC') or datetime(..., tzinfo=timezone.utc)")
        ts = pd.Timestamp(value).tz_convert("UTC")
        ns = ts.as_unit("ns").value
        if ns % 1_000_000:
            raise ValueError(f"{what}: {value!r} has sub-millisecond precision; candle times are whole milliseconds")
        return ns // 1_000_000
    raise ValueError(f"{what}: expected a tz-aware datetime, ISO-8601 string or epoch milliseconds (int), "
                     f"got {type(value).__name__}")


def _timestamp_msg(ms: int):
    from google.protobuf.timestamp_pb2 import Timestamp

    t = Timestamp()
    t.FromMilliseconds(ms)
    return t


# ----------------------------------------------------------------------------------------------------------------------
# frames <-> messages


def _index_ms(index: pd.DatetimeIndex, what: str) -> np.ndarray:
    if index.tz is None:
        raise ValueError(f"{what} is tz-naive; candle times must be UTC: use df.tz_localize('UTC') if the times are "
                         "UTC, or tz_convert('UTC') if they carry another zone")
    if index.hasnans:
        raise ValueError(f"{what} has missing (NaT) times")
    ns = index.tz_convert("UTC").as_unit("ns").asi8
    if np.any(ns % 1_000_000):
        raise ValueError(f"{what} has sub-millisecond times; candle times are whole milliseconds")
    return ns // 1_000_000


def frame_times_ms(df: pd.DataFrame) -> np.ndarray:
    """Candle open times of a frame as int64 UTC epoch milliseconds.

    The times come from a tz-aware DatetimeIndex, or else from an ``open_time`` or ``timestamp`` column holding
    tz-aware datetimes or int epoch milliseconds. A tz-naive index or column is refused with ValueError.

    Example::

        >>> frame_times_ms(df)[:2]                                          # doctest: +SKIP
        array([1514764800000, 1514768400000])
    """
    if isinstance(df.index, pd.DatetimeIndex):
        return _index_ms(df.index, "the DatetimeIndex")
    for name in TIME_COLUMNS:
        if name not in df.columns:
            continue
        col = df[name]
        if isinstance(col.dtype, pd.DatetimeTZDtype) or pd.api.types.is_datetime64_any_dtype(col.dtype):
            return _index_ms(pd.DatetimeIndex(col), f"column {name!r}")
        if pd.api.types.is_integer_dtype(col.dtype) and not pd.api.types.is_bool_dtype(col.dtype):
            ms = col.to_numpy(dtype=np.int64)
            if len(ms) and ms.min() < _MIN_PLAUSIBLE_MS:
                raise ValueError(f"column {name!r} holds integers before 1973 as epoch milliseconds; epoch seconds "
                                 "must be multiplied by 1000")
            return ms
        raise ValueError(f"column {name!r} has dtype {col.dtype}; expected tz-aware datetimes or int epoch "
                         f"milliseconds (parse strings with pd.to_datetime(df[{name!r}], utc=True))")
    raise ValueError("no candle times: give the frame a tz-aware DatetimeIndex or an 'open_time' or 'timestamp' column")


def _float_column(df: pd.DataFrame, name: str) -> np.ndarray:
    try:
        return df[name].to_numpy(dtype=np.float64, na_value=np.nan)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"column {name!r} is not numeric ({df[name].dtype}): {exc}") from None


def frame_to_candles(df: pd.DataFrame) -> list[common_pb2.Candle]:
    """Candle messages for the rows of a frame, in row order.

    Needs columns open, high, low, close, volume and times as `frame_times_ms` reads them. Optional funding_rate and
    open_interest columns are sent where they are not NaN; a NaN leaves the field unset (absent, not zero). Values are
    sent as they are; the service validates them and names the bad candle.

    Example::

        >>> candles = frame_to_candles(df)                                  # doctest: +SKIP
        >>> stub.Predict(inference_pb2.PredictRequest(symbol="BTC/USDT", timeframe="1h", candles=candles))
        ... # doctest: +SKIP
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"expected a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"missing column(s) {', '.join(missing)}; a candle frame needs {', '.join(REQUIRED_COLUMNS)}")
    times = frame_times_ms(df).tolist()
    o, h, low, c, v = (_float_column(df, name).tolist() for name in REQUIRED_COLUMNS)
    optional = [name for name in OPTIONAL_COLUMNS if name in df.columns]
    Candle = common_pb2.Candle
    if not optional:
        return [Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f)
                for t, a, b, d, e, f in zip(times, o, h, low, c, v)]
    extra = []
    for name in optional:
        arr = _float_column(df, name)
        obj = arr.astype(object)
        obj[np.isnan(arr)] = None
        extra.append(obj.tolist())
    fr = extra[optional.index("funding_rate")] if "funding_rate" in optional else [None] * len(times)
    oi = extra[optional.index("open_interest")] if "open_interest" in optional else [None] * len(times)
    out = []
    for t, a, b, d, e, f, x, y in zip(times, o, h, low, c, v, fr, oi):
        if x is None and y is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f))
        elif y is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, funding_rate=x))
        elif x is None:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, open_interest=y))
        else:
            out.append(Candle(open_time_ms=t, open=a, high=b, low=d, close=e, volume=f, funding_rate=x,
                              open_interest=y))
    return out


def predictions_to_frame(
    df: pd.DataFrame,
    predictions: Sequence[inference_pb2.Prediction],
    model_id: str | Sequence[str],
) -> pd.DataFrame:
    """A copy of `df` with the ML columns from one Prediction per row (same order, same open times).

    Adds float ML_UP_PROB, ML_DOWN_PROB, ML_RANGE_PROB (NaN wherever ``ready`` is false, whatever the message holds),
    bool ML_READY, bool ML_IN_SAMPLE and str ML_MODEL_ID (one id for all rows, or one per row). A count or time that
    does not match the frame raises ProtocolError rather than misaligning probabilities.

    Example::

        >>> resp = stub.Predict(request)                                    # doctest: +SKIP
        >>> out = predictions_to_frame(df, resp.predictions, resp.model_id)  # doctest: +SKIP
    """
    times = frame_times_ms(df)
    n = len(df)
    if len(predictions) != n:
        raise ProtocolError(None, f"{len(predictions)} predictions for {n} candles; expected one per candle")
    if isinstance(model_id, str):
        ids = [model_id] * n
    else:
        ids = [str(m) for m in model_id]
        if len(ids) != n:
            raise ProtocolError(None, f"{len(ids)} model ids for {n} candles")
    got_times = np.fromiter((p.open_time_ms for p in predictions), dtype=np.int64, count=n)
    bad = np.flatnonzero(got_times != times)
    if len(bad):
        i = int(bad[0])
        raise ProtocolError(None, f"prediction {i} is for open_time_ms {got_times[i]} but row {i} opens at "
                                  f"{times[i]}; predictions must follow the candles in order")
    ready = np.fromiter((p.ready for p in predictions), dtype=bool, count=n)
    in_sample = np.fromiter((p.in_sample for p in predictions), dtype=bool, count=n)
    up = np.fromiter((p.ml_up_prob for p in predictions), dtype=np.float64, count=n)
    down = np.fromiter((p.ml_down_prob for p in predictions), dtype=np.float64, count=n)
    rng = np.fromiter((p.ml_range_prob for p in predictions), dtype=np.float64, count=n)
    for arr in (up, down, rng):
        arr[~ready] = np.nan
    out = df.copy()
    out["ML_UP_PROB"] = up
    out["ML_DOWN_PROB"] = down
    out["ML_RANGE_PROB"] = rng
    out["ML_READY"] = ready
    out["ML_IN_SAMPLE"] = in_sample
    out["ML_MODEL_ID"] = pd.Series(ids, index=out.index, dtype=str)
    return out


@dataclass(frozen=True, slots=True)
class LivePrediction:
    """One candle's prediction from `InferenceClient.stream`; up/down/range are NaN when `ready` is false.

    Example::

        >>> for p in client.stream(candles, "BTC/USDT", "1h"):            # doctest: +SKIP
        ...     if p.ready and not p.in_sample and p.up > 0.6:
        ...         go_long(p.open_time)
    """

    open_time_ms: int
    up: float
    down: float
    range: float
    ready: bool
    in_sample: bool
    model_id: str

    @property
    def open_time(self) -> datetime:
        """The candle's open time as a UTC datetime."""
        return ms_to_datetime(self.open_time_ms)


def _candle_from_item(item: Any) -> common_pb2.Candle:
    """A Candle from a Candle message, a mapping, a pandas Series, an iterrows() pair or an itertuples() row."""
    if isinstance(item, common_pb2.Candle):
        return item
    time_value: Any = None
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], (pd.Series, Mapping)):
        time_value, item = item  # df.iterrows(): (index, row)
    elif isinstance(item, tuple) and hasattr(item, "_asdict"):
        d = item._asdict()  # df.itertuples(): Index is the first field
        time_value = d.pop("Index", None)
        item = d
    if isinstance(item, pd.Series):
        if time_value is None and not any(k in item.index for k in ("open_time_ms", *TIME_COLUMNS)):
            time_value = item.name
        item = item.to_dict()
    if not isinstance(item, Mapping):
        raise ValueError(f"cannot read a candle from {type(item).__name__}; expected a Candle message, a mapping, "
                         "a pandas row, or an (index, row) pair")
    for key in ("open_time_ms", *TIME_COLUMNS):
        if key in item:
            time_value = item[key]
            break
    if time_value is None:
        raise ValueError("candle has no time: expected key open_time_ms, open_time or timestamp, or a row whose "
                         "index is its open time")
    ms = to_epoch_ms(time_value, "candle open time")
    fields: dict[str, Any] = {"open_time_ms": ms}
    for name in REQUIRED_COLUMNS:
        if name not in item:
            raise ValueError(f"candle at {ms} has no {name!r}; a candle needs {', '.join(REQUIRED_COLUMNS)}")
        fields[name] = _as_float(item[name], name, ms)
    for name in OPTIONAL_COLUMNS:
        value = item.get(name)
        if value is None:
            continue
        f = _as_float(value, name, ms)
        if not math.isnan(f):
            fields[name] = f
    return common_pb2.Candle(**fields)


def _as_float(value: Any, name: str, ms: int) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ValueError(f"candle at {ms}: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"candle at {ms}: {name} must be a number, got {value!r}") from None


# ----------------------------------------------------------------------------------------------------------------------
# training


def job_state_name(state: int) -> str:
    """Short name of a JobState value: ``"SUCCEEDED"`` for JOB_STATE_SUCCEEDED.

    Example::

        >>> job_state_name(training_pb2.JOB_STATE_FAILED)                  # doctest: +SKIP
        'FAILED'
    """
    try:
        return training_pb2.JobState.Name(state).removeprefix("JOB_STATE_")
    except ValueError:
        return f"STATE_{state}"


def is_final(job: training_pb2.TrainingJob) -> bool:
    """True when the job is SUCCEEDED, FAILED or CANCELLED.

    Example::

        >>> while not is_final(handle.refresh()):                           # doctest: +SKIP
        ...     time.sleep(5)
    """
    return job.state in _FINAL_STATES


class _Client:
    def __init__(self, target: str, *, tls: bool, root_certificates: bytes | None, token: str | None,
                 timeout: float | None, options: Sequence[tuple[str, Any]]):
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        self.target = target
        self.timeout = timeout
        self.channel = connect_channel(target, tls=tls, root_certificates=root_certificates, token=token,
                                       options=options)

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _unary(self, method, request, note: str = ""):
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as err:
            _raise_rpc(err, note)


class TrainingJobHandle:
    """A training job started by `TrainingClient.train`; `state` is the last TrainingJob message seen.

    Example::

        >>> handle = training.train("BTC/USDT", "1h", horizon_bars=24, threshold=0.02)  # doctest: +SKIP
        >>> job = handle.wait(on_progress=lambda j: print(j.stage, f"{j.progress:.0%}"))  # doctest: +SKIP
        >>> job.metrics["log_loss"] < job.metrics["prior_log_loss"]        # doctest: +SKIP
        True
    """

    def __init__(self, client: "TrainingClient", job: training_pb2.TrainingJob):
        self._client = client
        self.job_id: str = job.job_id
        self.state: training_pb2.TrainingJob = job

    def __repr__(self) -> str:
        return (f"TrainingJobHandle(job_id={self.job_id!r}, state={job_state_name(self.state.state)}, "
                f"stage={self.state.stage!r}, progress={self.state.progress:.2f})")

    def refresh(self) -> training_pb2.TrainingJob:
        """Fetch the job now (GetTrainingJob) and return it."""
        self.state = self._client.get_job(self.job_id)
        return self.state

    def watch(self, on_progress: Callable[[training_pb2.TrainingJob], None] | None = None) -> training_pb2.TrainingJob:
        """Follow the job until it reaches a final state and return that final message.

        `on_progress(job)` is called for every change the server reports. The stream has no deadline, so a long
        training run is followed to its end; a stream that closes before a final state raises ProtocolError.
        """
        for job in self._client._watch(self.job_id):
            self.state = job
            if on_progress is not None:
                on_progress(job)
        if not is_final(self.state):
            raise ProtocolError(None, f"the watch of job {self.job_id} ended while the job was "
                                      f"{job_state_name(self.state.state)}; expected a final state")
        return self.state

    def wait(self, on_progress: Callable[[training_pb2.TrainingJob], None] | None = None) -> training_pb2.TrainingJob:
        """`watch`, then return the job if it SUCCEEDED or raise TrainingFailedError if it FAILED or was CANCELLED."""
        job = self.watch(on_progress)
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            raise TrainingFailedError(job)
        return job

    def cancel(self) -> training_pb2.TrainingJob:
        """Cancel the job (FailedPreconditionError if it already finished) and return its new state."""
        self.state = self._client.cancel(self.job_id)
        return self.state


_CLASS_WEIGHTS = {
    None: common_pb2.CLASS_WEIGHT_UNSPECIFIED,
    "none": common_pb2.CLASS_WEIGHT_NONE,
    "balanced": common_pb2.CLASS_WEIGHT_BALANCED,
}


class TrainingClient:
    """Client of the TrainingService: start, follow and cancel training jobs, list jobs and models.

    Zero or None arguments take the service's documented defaults (horizon 24, threshold 0.02, 200 trees, depth 6,
    200 samples per leaf, seed 42); the job's `request` shows the values used. Unary calls get `timeout` seconds
    (None: no deadline); watching a job has no deadline.

    Example::

        >>> with TrainingClient("127.0.0.1:50051") as t:                   # doctest: +SKIP
        ...     job = t.train("BTC/USDT", "1h", "2017-07-01", "2019-01-01", horizon_bars=24, threshold=0.02).wait()
        ...     print(job.model_id, job.metrics["log_loss"], job.metrics["prior_log_loss"])
    """

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = ()):
        self._base = _Client(target, tls=tls, root_certificates=root_certificates, token=token, timeout=timeout,
                             options=options)
        self.target = target
        self.timeout = timeout
        self.channel = self._base.channel
        self._stub = training_pb2_grpc.TrainingServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel."""
        self._base.close()

    def __enter__(self) -> "TrainingClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def train(
        self,
        symbol: str,
        timeframe: str,
        start: Any = None,
        end: Any = None,
        *,
        horizon_bars: int = 0,
        threshold: float = 0.0,
        n_estimators: int = 0,
        max_depth: int = 0,
        min_samples_leaf: int = 0,
        class_weight: str | None = None,
        random_state: int | None = None,
    ) -> TrainingJobHandle:
        """Queue a training job and return its handle at once.

        `start` (inclusive) and `end` (exclusive) bound the candle open times: tz-aware datetime or pandas Timestamp,
        ISO-8601 string (UTC unless it has an offset) or int epoch ms; None means the first / after the last stored
        candle. `max_depth` -1 means unlimited. `class_weight` is None (service default: "none"), "none" or
        "balanced".

        Example::

            >>> h = t.train("ETH/USDT", "4h", start="2018-01-01", end="2020-01-01", n_estimators=300)  # doctest: +SKIP
            >>> h.job_id                                                    # doctest: +SKIP
        """
        if class_weight not in _CLASS_WEIGHTS:
            raise ValueError(f"class_weight must be None, 'none' or 'balanced', got {class_weight!r}")
        params = common_pb2.ModelParams(
            n_estimators=_int_arg(n_estimators, "n_estimators"),
            max_depth=_int_arg(max_depth, "max_depth"),
            min_samples_leaf=_int_arg(min_samples_leaf, "min_samples_leaf"),
            class_weight=_CLASS_WEIGHTS[class_weight],
        )
        if random_state is not None:
            params.random_state = _int_arg(random_state, "random_state")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
            raise ValueError(f"threshold must be a number (a fraction: 0.02 means 2 %), got {threshold!r}")
        request = training_pb2.StartTrainingRequest(
            symbol=symbol,
            timeframe=timeframe,
            label=common_pb2.LabelSpec(horizon_bars=_int_arg(horizon_bars, "horizon_bars"), threshold=float(threshold)),
            params=params,
        )
        if start is not None:
            request.start_time.CopyFrom(_timestamp_msg(to_epoch_ms(start, "start")))
        if end is not None:
            request.end_time.CopyFrom(_timestamp_msg(to_epoch_ms(end, "end")))
        job = self._base._unary(self._stub.StartTraining, request)
        return TrainingJobHandle(self, job)

    def job(self, job_id: str) -> TrainingJobHandle:
        """A handle on an existing job (fetched now), e.g. one started by another process.

        Example::

            >>> t.job("3f2a...").wait()                                     # doctest: +SKIP
        """
        return TrainingJobHandle(self, self.get_job(job_id))

    def get_job(self, job_id: str) -> training_pb2.TrainingJob:
        """The current TrainingJob message; NotFoundError for an unknown id.

        Example::

            >>> t.get_job(job_id).progress                                  # doctest: +SKIP
            0.4
        """
        return self._base._unary(self._stub.GetTrainingJob, training_pb2.GetTrainingJobRequest(job_id=job_id))

    def list_jobs(self, symbol: str = "", timeframe: str = "", limit: int = 0,
                  states: Iterable[int] = ()) -> list[training_pb2.TrainingJob]:
        """Jobs, newest first, optionally filtered; `limit` 0 means the service default (100).

        Example::

            >>> [j.job_id for j in t.list_jobs("BTC/USDT", "1h", limit=5)]  # doctest: +SKIP
        """
        request = training_pb2.ListTrainingJobsRequest(symbol=symbol, timeframe=timeframe,
                                                       limit=_int_arg(limit, "limit"), states=list(states))
        return list(self._base._unary(self._stub.ListTrainingJobs, request).jobs)

    def cancel(self, job_id: str) -> training_pb2.TrainingJob:
        """Cancel a queued or running job; FailedPreconditionError if it already finished.

        Example::

            >>> t.cancel(job_id).state == training_pb2.JOB_STATE_CANCELLED  # doctest: +SKIP
            True
        """
        return self._base._unary(self._stub.CancelTrainingJob, training_pb2.CancelTrainingJobRequest(job_id=job_id))

    def list_models(self, symbol: str = "", timeframe: str = "") -> list[common_pb2.ModelInfo]:
        """Registered models, newest first, optionally filtered by symbol and timeframe.

        Example::

            >>> for m in t.list_models("BTC/USDT", "1h"):                   # doctest: +SKIP
            ...     print(m.model_id, m.metrics["log_loss"], m.metrics["prior_log_loss"])
        """
        request = training_pb2.ListModelsRequest(symbol=symbol, timeframe=timeframe)
        return list(self._base._unary(self._stub.ListModels, request).models)

    def _watch(self, job_id: str) -> Iterator[training_pb2.TrainingJob]:
        call = self._stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id))
        try:
            yield from call
        except grpc.RpcError as err:
            _raise_rpc(err, f"while watching job {job_id}")
        finally:
            call.cancel()


def _int_arg(value: Any, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------------------------------------
# inference


def batch_plan(n: int, max_batch: int, overlap: int) -> list[tuple[int, int, int]]:
    """How `InferenceClient.predict` splits `n` candles: a list of (start, stop, keep_from) row ranges.

    Each request covers rows [start, stop) with at most `max_batch` rows; its predictions for rows [keep_from, stop)
    are kept. Every request after the first starts `overlap` rows before the first row it keeps, so each kept row
    has the same history inside its request as it would have in one request over all rows.

    Example::

        >>> batch_plan(10, 6, 2)
        [(0, 6, 0), (4, 10, 6)]
    """
    if n < 0 or max_batch < 1 or overlap < 0:
        raise ValueError(f"bad batch plan arguments n={n}, max_batch={max_batch}, overlap={overlap}")
    if n <= max_batch:
        return [(0, n, 0)] if n else []
    if overlap >= max_batch:
        raise ValueError(f"max_batch={max_batch} must be larger than the overlap of {overlap} candles the model "
                         "needs as history; raise max_batch")
    plan = [(0, max_batch, 0)]
    keep_from = max_batch
    while keep_from < n:
        start = keep_from - overlap
        stop = min(n, start + max_batch)
        plan.append((start, stop, keep_from))
        keep_from = stop
    return plan


class InferenceClient:
    """Client of the InferenceService: ML_UP_PROB / ML_DOWN_PROB / ML_RANGE_PROB for candle frames and live candles.

    `predict` is for backtests and batch jobs; `stream` for live trading (one message per candle, the server keeps
    the history). Unary calls get `timeout` seconds (None: no deadline); streams have none. A frame longer than
    `max_batch` rows (the service's MLSIGNAL_MAX_BATCH, 10000 by default) is sent in overlapping requests whose
    result equals one Predict over the whole frame.

    Example::

        >>> with InferenceClient("127.0.0.1:50052") as c:                  # doctest: +SKIP
        ...     out = c.predict(df, "BTC/USDT", "1h")
        >>> long = (out.ML_UP_PROB > 0.6) & (rsi < 70)                     # doctest: +SKIP
        >>> short = (out.ML_DOWN_PROB > 0.6) & (rsi > 30)                  # doctest: +SKIP
    """

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT, max_batch: int = 10_000,
                 options: Sequence[tuple[str, Any]] = ()):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        self._base = _Client(target, tls=tls, root_certificates=root_certificates, token=token, timeout=timeout,
                             options=options)
        self.target = target
        self.timeout = timeout
        self.max_batch = max_batch
        self.channel = self._base.channel
        self._stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def close(self) -> None:
        """Close the channel; open streams are cancelled."""
        self._base.close()

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_model(self, symbol: str, timeframe: str) -> common_pb2.ModelInfo:
        """The model serving now for a symbol and timeframe; NotFoundError when there is none.

        Example::

            >>> m = c.get_model("BTC/USDT", "1h")                           # doctest: +SKIP
            >>> m.warmup_bars, m.label.horizon_bars, m.metrics["log_loss"], m.metrics["prior_log_loss"]  # doctest: +SKIP
        """
        return self._base._unary(self._stub.GetModel, inference_pb2.GetModelRequest(symbol=symbol, timeframe=timeframe))

    def predict(self, df: pd.DataFrame, symbol: str, timeframe: str, model_id: str = "") -> pd.DataFrame:
        """A copy of `df` with ML_UP_PROB, ML_DOWN_PROB, ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE and ML_MODEL_ID.

        `df` has a tz-aware DatetimeIndex (or an ``open_time`` / ``timestamp`` column) with strictly increasing
        times, and columns open, high, low, close, volume, optionally funding_rate and open_interest (NaN: absent).
        The first warmup_bars - 1 rows are not ready (NaN probabilities, ML_READY false); rows inside the model's
        training window have ML_IN_SAMPLE true and do not make an honest backtest. `model_id` pins a model; empty
        means the one serving now. Frames longer than `max_batch` use one model for every row.

        Example::

            >>> out = c.predict(df, "BTC/USDT", "1h")                       # doctest: +SKIP
            >>> out.loc[out.ML_READY & ~out.ML_IN_SAMPLE, ["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]]  # doctest: +SKIP
        """
        candles = frame_to_candles(df)
        n = len(candles)
        if n == 0:
            raise ValueError("the frame has no rows; predict needs at least one candle")
        times = np.fromiter((c.open_time_ms for c in candles), dtype=np.int64, count=n)
        steps = np.diff(times)
        if np.any(steps <= 0):
            i = int(np.flatnonzero(steps <= 0)[0]) + 1
            raise ValueError(f"candle times must be strictly increasing: row {i} ({_iso(times[i])}) does not come "
                             f"after row {i - 1} ({_iso(times[i - 1])})")

        if n <= self.max_batch:
            resp = self._predict_call(symbol, timeframe, model_id, candles, 0, n)
            if model_id and resp.model_id != model_id:
                raise ProtocolError(None, f"answered by model {resp.model_id!r}, not the pinned model {model_id!r}")
            return predictions_to_frame(df, resp.predictions, resp.model_id)

        # Several requests: one model for all of them, each kept row with a full warmup of history in its request.
        served = self.get_model(symbol, timeframe)
        pinned = model_id or served.model_id
        if pinned == served.model_id:
            if served.warmup_bars < 1:
                raise ProtocolError(None, f"model {served.model_id} reports warmup_bars={served.warmup_bars}")
            plan = batch_plan(n, self.max_batch, served.warmup_bars)
            first = None
        else:
            # A pinned model that is not the one serving: its warmup is read off the first request, where exactly
            # the leading warmup_bars - 1 candles are not ready.
            first = self._predict_call(symbol, timeframe, pinned, candles, 0, self.max_batch)
            leading = next((i for i, p in enumerate(first.predictions) if p.ready), None)
            if leading is None:
                raise ValueError(f"none of the first {self.max_batch} candles is ready with model {pinned}, so its "
                                 "warmup cannot be covered by overlapping requests; raise max_batch")
            plan = batch_plan(n, self.max_batch, leading + 1)

        predictions: list[inference_pb2.Prediction] = []
        for start, stop, keep_from in plan:
            if start == 0 and first is not None:
                resp = first
            else:
                resp = self._predict_call(symbol, timeframe, pinned, candles, start, stop)
            if resp.model_id != pinned:
                raise ProtocolError(None, f"rows {start}..{stop - 1} were answered by model {resp.model_id!r}, "
                                          f"not the pinned model {pinned!r}")
            predictions.extend(resp.predictions[keep_from - start:])
        return predictions_to_frame(df, predictions, pinned)

    def _predict_call(self, symbol, timeframe, model_id, candles, start, stop) -> inference_pb2.PredictResponse:
        request = inference_pb2.PredictRequest(symbol=symbol, timeframe=timeframe, model_id=model_id,
                                               candles=candles[start:stop])
        note = "" if start == 0 and stop == len(candles) else f"in the request for frame rows {start}..{stop - 1}"
        resp = self._base._unary(self._stub.Predict, request, note)
        if len(resp.predictions) != stop - start:
            raise ProtocolError(None, f"{len(resp.predictions)} predictions for {stop - start} candles", note=note)
        return resp

    def stream(self, candles: Iterable[Any], symbol: str, timeframe: str,
               model_id: str = "") -> Iterator[LivePrediction]:
        """Live predictions: each candle goes to the server as its own StreamPredict message as it arrives.

        `candles` may block between items (e.g. a generator reading an exchange feed). Items are Candle messages,
        mappings with open_time_ms / open_time / timestamp and open, high, low, close, volume (optional funding_rate,
        open_interest; None or NaN means absent), pandas Series (the name is the open time), df.iterrows() pairs or
        df.itertuples() rows. Times must increase; a candle with the same time as the previous one replaces it (a
        still-forming candle). Yields one LivePrediction per candle, in order. Leaving the loop cancels the stream.
        A candle that cannot be read raises ValueError after the predictions for the candles before it.

        Example::

            >>> with InferenceClient("127.0.0.1:50052") as c:              # doctest: +SKIP
            ...     for p in c.stream(feed.closed_candles(), "BTC/USDT", "1h"):
            ...         if p.ready and p.up > 0.6 and rsi.last < 70:
            ...             broker.buy()
        """
        sent: collections.deque[int] = collections.deque()
        failure: list[BaseException] = []

        def requests() -> Iterator[inference_pb2.PredictRequest]:
            # Runs in gRPC's sending thread. An error of the feed or of a candle ends the request stream cleanly and
            # is raised to the caller by the response loop below, instead of turning into a CANCELLED call.
            items = iter(candles)
            while True:
                try:
                    item = next(items)
                except StopIteration:
                    return
                except Exception as exc:
                    failure.append(exc)
                    return
                try:
                    candle = _candle_from_item(item)
                except Exception as exc:
                    failure.append(exc)
                    return
                sent.append(candle.open_time_ms)
                yield inference_pb2.PredictRequest(symbol=symbol, timeframe=timeframe, model_id=model_id,
                                                   candles=[candle])

        call = self._stub.StreamPredict(requests())
        try:
            try:
                for resp in call:
                    if len(resp.predictions) != 1 or not sent:
                        raise ProtocolError(None, f"a stream response carries {len(resp.predictions)} predictions "
                                                  "for one candle")
                    p = resp.predictions[0]
                    expected = sent.popleft()
                    if p.open_time_ms != expected:
                        raise ProtocolError(None, f"prediction for open_time_ms {p.open_time_ms} arrived where "
                                                  f"{expected} was expected")
                    if p.ready:
                        yield LivePrediction(p.open_time_ms, p.ml_up_prob, p.ml_down_prob, p.ml_range_prob, True,
                                             p.in_sample, resp.model_id)
                    else:
                        yield LivePrediction(p.open_time_ms, math.nan, math.nan, math.nan, False, p.in_sample,
                                             resp.model_id)
            except grpc.RpcError as err:
                if failure:
                    raise failure[0] from err
                _raise_rpc(err, "in the prediction stream")
            if failure:
                raise failure[0]
        finally:
            call.cancel()


def _iso(ms: int) -> str:
    return ms_to_datetime(int(ms)).isoformat()
