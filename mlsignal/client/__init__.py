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

Everything public is importable from here; the submodules (errors, channel, frames, jobs, training, inference) are
an implementation layout, not a separate API.
"""

from mlsignal.client.channel import DEFAULT_TIMEOUT, MAX_MESSAGE_BYTES, connect_channel
from mlsignal.client.errors import (
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    MlsignalClientError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
    TrainingFailedError,
    UnauthenticatedError,
    UnavailableError,
    error_from_rpc,
    error_from_status,
)
from mlsignal.client.frames import (
    ML_COLUMNS,
    batch_plan,
    frame_times_ms,
    frame_to_candles,
    frame_to_columns,
    predictions_to_frame,
    to_epoch_ms,
)
from mlsignal.client.inference import InferenceClient, LivePrediction
from mlsignal.client.jobs import is_final, job_state_name
from mlsignal.client.training import TrainingClient, TrainingJobHandle, label_kind_name, model_stage_name

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
    "error_from_status",
    "frame_times_ms",
    "frame_to_candles",
    "frame_to_columns",
    "is_final",
    "job_state_name",
    "label_kind_name",
    "model_stage_name",
    "predictions_to_frame",
    "to_epoch_ms",
]
