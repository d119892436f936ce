"""The training client: start, follow and cancel training jobs, list jobs and models, set retrain policies and
import candles.

A job outlives the call that started it, so `train` returns a `TrainingJobHandle` at once and the caller decides
whether to wait, watch progress, or come back later with `TrainingClient.job`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from typing import Any

import grpc
import numpy as np
import pandas as pd
from google.protobuf import duration_pb2

from mlsignal.client.channel import DEFAULT_TIMEOUT, ServiceClient
from mlsignal.client.errors import ProtocolError, TrainingFailedError, error_from_rpc
from mlsignal.client.frames import columns_message, frame_columns, to_epoch_ms
from mlsignal.client.jobs import is_final, job_state_name
from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from shared.labels import FIXED_HORIZON, TRIPLE_BARRIER
from shared.timeframes import ms_to_timestamp, parse_duration

__all__ = ["TrainingClient", "TrainingJobHandle", "label_kind_name", "model_stage_name"]

_CLASS_WEIGHTS = {
    None: common_pb2.CLASS_WEIGHT_UNSPECIFIED,
    "none": common_pb2.CLASS_WEIGHT_NONE,
    "balanced": common_pb2.CLASS_WEIGHT_BALANCED,
}
_LABEL_KINDS = {
    None: common_pb2.LABEL_KIND_UNSPECIFIED,
    FIXED_HORIZON: common_pb2.LABEL_KIND_FIXED_HORIZON,
    TRIPLE_BARRIER: common_pb2.LABEL_KIND_TRIPLE_BARRIER,
}

_PURPOSES = {
    "production": training_pb2.TRAINING_PURPOSE_PRODUCTION,
    "research": training_pb2.TRAINING_PURPOSE_RESEARCH,
}

ProgressCallback = Callable[[training_pb2.TrainingJob], None]


def label_kind_name(kind: int) -> str:
    """The `shared.labels` name of a LabelKind value: ``"triple_barrier"``, else ``"fixed_horizon"`` (UNSPECIFIED
    means the training default, the fixed horizon)."""
    return TRIPLE_BARRIER if kind == common_pb2.LABEL_KIND_TRIPLE_BARRIER else FIXED_HORIZON


def model_stage_name(stage: int) -> str:
    """Short name of a ModelStage value: ``"SERVING"`` for MODEL_STAGE_SERVING (CANDIDATE, SERVING, REJECTED,
    RETIRED, RESEARCH); ``"-"`` for UNSPECIFIED (a server that does not report stages), ``STAGE_<n>`` for a value this
    client does not know (from a newer server).

    Example::

        >>> model_stage_name(common_pb2.MODEL_STAGE_CANDIDATE)
        'CANDIDATE'
    """
    if stage == common_pb2.MODEL_STAGE_UNSPECIFIED:
        return "-"
    try:
        return common_pb2.ModelStage.Name(stage).removeprefix("MODEL_STAGE_")
    except ValueError:
        return f"STAGE_{stage}"


class TrainingJobHandle:
    """A training job started by `TrainingClient.train`; `state` is the last TrainingJob message seen.

    Example::

        >>> handle = training.train("BTC/USDT", "1h", horizon_bars=24, threshold=0.02)  # doctest: +SKIP
        >>> job = handle.wait(on_progress=lambda j: print(j.stage, f"{j.progress:.0%}"))  # doctest: +SKIP
        >>> job.metrics["log_loss"] < job.metrics["prior_log_loss"]        # doctest: +SKIP
        True
    """

    def __init__(self, client: TrainingClient, job: training_pb2.TrainingJob):
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

    def watch(self, on_progress: ProgressCallback | None = None,
              timeout: float | None = None) -> training_pb2.TrainingJob:
        """Follow the job until it reaches a final state and return that final message.

        `on_progress(job)` is called for every change the server reports. Without `timeout` the stream has no
        deadline, so a long training run is followed to its end; with it, DeadlineExceededError is raised after
        `timeout` seconds (the job keeps running on the service). A stream that closes before a final state raises
        ProtocolError.
        """
        for job in self._client._watch(self.job_id, timeout):
            self.state = job
            if on_progress is not None:
                on_progress(job)
        if not is_final(self.state):
            raise ProtocolError(None, f"the watch of job {self.job_id} ended while the job was "
                                      f"{job_state_name(self.state.state)}; expected a final state")
        return self.state

    def wait(self, on_progress: ProgressCallback | None = None,
             timeout: float | None = None) -> training_pb2.TrainingJob:
        """`watch`, then return the job if it SUCCEEDED or raise TrainingFailedError if it FAILED or was CANCELLED."""
        job = self.watch(on_progress, timeout)
        if job.state != training_pb2.JOB_STATE_SUCCEEDED:
            raise TrainingFailedError(job)
        return job

    def cancel(self) -> training_pb2.TrainingJob:
        """Cancel the job (FailedPreconditionError if it already finished) and return its new state."""
        self.state = self._client.cancel(self.job_id)
        return self.state


class TrainingClient(ServiceClient):
    """Client of the TrainingService: start, follow and cancel training jobs, list jobs and models.

    Zero or None arguments take the service's documented defaults (horizon 24, threshold 0.02, 200 trees, depth 6,
    25 samples per leaf, uniqueness-sized bootstraps, seed 42); the job's `request` shows the values used. Unary
    calls get `timeout` seconds (None: no deadline); watching a job has no deadline unless `wait`/`watch` get one.

    Example::

        >>> with TrainingClient("127.0.0.1:50051") as t:                   # doctest: +SKIP
        ...     job = t.train("BTC/USDT", "1h", "2017-07-01", "2019-01-01", horizon_bars=24, threshold=0.02).wait()
        ...     print(job.model_id, job.metrics["log_loss"], job.metrics["prior_log_loss"])
    """

    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
                 options: Sequence[tuple[str, Any]] = (), allow_insecure_token: bool = False):
        super().__init__(target, tls=tls, root_certificates=root_certificates, token=token, timeout=timeout,
                         options=options, allow_insecure_token=allow_insecure_token)
        self._stub = training_pb2_grpc.TrainingServiceStub(self.channel)

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
        purpose: str = "production",
        label_kind: str | None = None,
        volatility_bars: int = 0,
        volatility_multiple: float = 0.0,
        feature_set: str = "",
    ) -> TrainingJobHandle:
        """Queue a training job and return its handle at once.

        `start` (inclusive) and `end` (exclusive) bound the candle open times: tz-aware datetime or pandas Timestamp,
        ISO-8601 string (UTC unless it has an offset) or int epoch ms; None means the first / after the last stored
        candle. `max_depth` -1 means unlimited. `class_weight` is None (service default: "none"), "none" or
        "balanced". `purpose` "production" (the default) registers the model through the promotion gate, so it may
        serve; "research" registers it as RESEARCH, which never serves unless a request pins it by model_id.
        `label_kind` is None (service default: fixed horizon), "fixed_horizon" or "triple_barrier" (hyphens work too).
        `volatility_bars` and `volatility_multiple` (both or neither; research models only) replace the fixed threshold
        by a volatility-scaled barrier: `volatility_multiple` x the standard deviation of the last `volatility_bars`
        1-bar returns x sqrt(horizon_bars). `feature_set` "" (the service default, "ohlcv-v1") or "ohlcv-v2" (context
        over 168 and 720 candles: predictions then need 720 candles of history).

        Example::

            >>> h = t.train("ETH/USDT", "4h", start="2018-01-01", end="2020-01-01", n_estimators=300)  # doctest: +SKIP
            >>> h.job_id                                                    # doctest: +SKIP
        """
        request = training_pb2.StartTrainingRequest(
            symbol=symbol,
            timeframe=timeframe,
            label=_label_message(horizon_bars, threshold, label_kind, volatility_bars, volatility_multiple),
            params=_params_message(n_estimators, max_depth, min_samples_leaf, class_weight, random_state),
        )
        if not isinstance(feature_set, str):
            raise ValueError(f"feature_set must be a string such as 'ohlcv-v2', got {feature_set!r}")
        request.feature_set = feature_set
        if purpose not in _PURPOSES:
            raise ValueError(f"purpose must be 'production' or 'research', got {purpose!r}")
        request.purpose = _PURPOSES[purpose]
        if start is not None:
            request.start_time.CopyFrom(ms_to_timestamp(to_epoch_ms(start, "start")))
        if end is not None:
            request.end_time.CopyFrom(ms_to_timestamp(to_epoch_ms(end, "end")))
        job = self._unary(self._stub.StartTraining, request)
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
        job: training_pb2.TrainingJob = self._unary(self._stub.GetTrainingJob,
                                                    training_pb2.GetTrainingJobRequest(job_id=job_id))
        return job

    def list_jobs(self, symbol: str = "", timeframe: str = "", limit: int = 0,
                  states: Iterable[training_pb2.JobState] = ()) -> list[training_pb2.TrainingJob]:
        """Jobs, newest first, optionally filtered; `limit` 0 means the service default (100).

        Example::

            >>> [j.job_id for j in t.list_jobs("BTC/USDT", "1h", limit=5)]  # doctest: +SKIP
        """
        request = training_pb2.ListTrainingJobsRequest(symbol=symbol, timeframe=timeframe,
                                                       limit=_int_arg(limit, "limit"), states=list(states))
        return list(self._unary(self._stub.ListTrainingJobs, request).jobs)

    def cancel(self, job_id: str) -> training_pb2.TrainingJob:
        """Cancel a queued or running job; FailedPreconditionError if it already finished.

        Example::

            >>> t.cancel(job_id).state == training_pb2.JOB_STATE_CANCELLED  # doctest: +SKIP
            True
        """
        job: training_pb2.TrainingJob = self._unary(self._stub.CancelTrainingJob,
                                                    training_pb2.CancelTrainingJobRequest(job_id=job_id))
        return job

    def list_models(self, symbol: str = "", timeframe: str = "") -> list[common_pb2.ModelInfo]:
        """Registered models, newest first, optionally filtered by symbol and timeframe.

        Example::

            >>> for m in t.list_models("BTC/USDT", "1h"):                   # doctest: +SKIP
            ...     print(m.model_id, m.metrics["log_loss"], m.metrics["prior_log_loss"])
        """
        request = training_pb2.ListModelsRequest(symbol=symbol, timeframe=timeframe)
        return list(self._unary(self._stub.ListModels, request).models)

    def promote(self, model_id: str, reason: str = "") -> common_pb2.ModelInfo:
        """Make a model of any stage the one serving its symbol and timeframe (the one serving before is retired);
        returns its ModelInfo, now SERVING. NotFoundError for an unknown id. An empty reason is recorded as
        "promoted by operator".

        Example::

            >>> t.promote(model_id, reason="beats the prior on 2024").stage_reason  # doctest: +SKIP
            'beats the prior on 2024'
        """
        info: common_pb2.ModelInfo = self._unary(
            self._stub.PromoteModel, training_pb2.PromoteModelRequest(model_id=model_id, reason=reason))
        return info

    def rollback(self, symbol: str, timeframe: str, reason: str = "") -> common_pb2.ModelInfo:
        """Retire the serving model of a market and bring back the one that served before it; returns its ModelInfo,
        SERVING again. FailedPreconditionError when there is none. An empty reason is recorded as "rolled back by
        operator".

        Example::

            >>> t.rollback("BTC/USDT", "1h", reason="live log loss worse than the prior").model_id  # doctest: +SKIP
        """
        info: common_pb2.ModelInfo = self._unary(
            self._stub.RollbackModel,
            training_pb2.RollbackModelRequest(symbol=symbol, timeframe=timeframe, reason=reason))
        return info

    def stage_changes(self, symbol: str, timeframe: str, model_id: str = "",
                      limit: int = 0) -> list[training_pb2.ModelStageChange]:
        """Every stage change of a market's models (or of one model), oldest first, with its time and reason; the
        newest `limit` when > 0."""
        resp: training_pb2.ListModelStageChangesResponse = self._unary(
            self._stub.ListModelStageChanges,
            training_pb2.ListModelStageChangesRequest(symbol=symbol, timeframe=timeframe, model_id=model_id,
                                                      limit=_int_arg(limit, "limit")))
        return list(resp.changes)

    def set_policy(
        self,
        symbol: str,
        timeframe: str,
        every: timedelta | str,
        window: timedelta | str,
        *,
        horizon_bars: int = 0,
        threshold: float = 0.0,
        label_kind: str | None = None,
        n_estimators: int = 0,
        max_depth: int = 0,
        min_samples_leaf: int = 0,
        class_weight: str | None = None,
        random_state: int | None = None,
        paused: bool = False,
        cross_validate: bool = False,
    ) -> training_pb2.RetrainPolicy:
        """Create or replace the retrain policy of a market: every `every` the service trains a production model on
        the last `window` of closed candles (with the label and forest arguments as `train` takes them) unless no
        candle arrived since the market's last model. Returns the policy as stored, with `next_run_at` (a new policy
        is due at once). `every` and `window` are timedeltas or text like 30m, 12h, 1d, 365d. A paused policy is kept
        but never due. `cross_validate` also runs the purged k-fold cross-validation on every retrain (five more forest
        fits; the gate decides on the held-back test slice either way). InvalidArgumentError names the field the
        service refused (`every` under one candle, `window` too short for the label and the feature warm-up, ...).

        Example::

            >>> t.set_policy("BTC/USDT", "1h", every="1d", window="365d", horizon_bars=24).next_run_at  # doctest: +SKIP
        """
        request = training_pb2.RetrainPolicy(
            symbol=symbol, timeframe=timeframe, every=_duration_arg(every, "every"),
            window=_duration_arg(window, "window"), label=_label_message(horizon_bars, threshold, label_kind),
            params=_params_message(n_estimators, max_depth, min_samples_leaf, class_weight, random_state),
            paused=bool(paused), cross_validate=bool(cross_validate),
        )
        policy: training_pb2.RetrainPolicy = self._unary(self._stub.SetRetrainPolicy, request)
        return policy

    def list_policies(self, symbol: str = "", timeframe: str = "") -> list[training_pb2.RetrainPolicy]:
        """Retrain policies (of one symbol and/or timeframe when given), with their next due time and what happened
        the last time each was due (`last_job_id`, `last_outcome`).

        Example::

            >>> for p in t.list_policies():                                 # doctest: +SKIP
            ...     print(p.symbol, p.timeframe, p.next_run_at.ToJsonString(), p.last_outcome)
        """
        request = training_pb2.ListRetrainPoliciesRequest(symbol=symbol, timeframe=timeframe)
        return list(self._unary(self._stub.ListRetrainPolicies, request).policies)

    def delete_policy(self, symbol: str, timeframe: str) -> training_pb2.RetrainPolicy:
        """Delete the retrain policy of a market and return it; NotFoundError when it has none. A job the policy
        started keeps running."""
        policy: training_pb2.RetrainPolicy = self._unary(
            self._stub.DeleteRetrainPolicy, training_pb2.DeleteRetrainPolicyRequest(symbol=symbol, timeframe=timeframe))
        return policy

    def serving_model(self, symbol: str, timeframe: str) -> common_pb2.ModelInfo | None:
        """The market's SERVING model as the training service lists it, or None."""
        for m in self.list_models(symbol, timeframe):
            if m.stage == common_pb2.MODEL_STAGE_SERVING:
                return m
        return None

    def import_candles(
        self,
        symbol: str,
        timeframe: str,
        candles: pd.DataFrame | Iterable[pd.DataFrame],
        *,
        batch_size: int = 10_000,
        timeout: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> training_pb2.ImportCandlesResponse:
        """Store closed candles in the training service's database (ImportCandles) and return the counts:
        `inserted`, `unchanged` (re-sent with the stored values), `conflicting` (re-sent with other values; the
        stored ones are kept) and `last_open_time_ms`.

        `candles` is a frame (as `frame_to_candles` takes it, optionally with funding_rate and open_interest) or an
        iterable of frames, e.g. a collector's batches; each is sent as columns in messages of at most `batch_size`
        candles, and `on_batch(n)` is called after each message is handed to gRPC. The service stores each message
        whole or not at all: a refused message (a still-forming or inconsistent candle) raises
        InvalidArgumentError naming the field, and the messages before it stay stored, so sending the same candles
        again is safe. A frame's columns are checked (ValueError) before anything is sent, and so is an empty frame;
        empty frames in an iterable are skipped (ValueError when all are). Without `timeout` the call has no
        deadline.

        Example::

            >>> r = t.import_candles("BTC/USDT", "1h", closed_candles)      # doctest: +SKIP
            >>> r.inserted, r.unchanged, r.conflicting                      # doctest: +SKIP
            (24, 0, 0)
        """
        size = _int_arg(batch_size, "batch_size")
        if size < 1:
            raise ValueError(f"batch_size must be at least 1, got {size}")
        if isinstance(candles, pd.DataFrame):
            checked = frame_columns(candles)  # a bad frame fails here, before the call
            if not len(candles):
                raise ValueError("no candles to import: the frame is empty")
            frames: Iterable[Any] = [checked]
        else:
            frames = candles
        failure: list[BaseException] = []

        def requests() -> Iterator[training_pb2.ImportCandlesRequest]:
            first = True
            try:
                for frame in frames:
                    columns = frame if isinstance(frame, dict) else frame_columns(frame)
                    n = len(columns["open_time_ms"])
                    for start in range(0, n, size):
                        request = training_pb2.ImportCandlesRequest(
                            columns=columns_message(columns, start, start + size))
                        if first:
                            request.symbol, request.timeframe, first = symbol, timeframe, False
                        yield request
                        if on_batch is not None:
                            on_batch(min(size, n - start))
                if first:
                    raise ValueError("no candles to import: every frame is empty")
            except Exception as exc:  # a bad frame from the iterable: the call is cancelled, the error raised below
                failure.append(exc)
                raise

        try:
            response: training_pb2.ImportCandlesResponse = self._stub.ImportCandles(requests(), timeout=timeout)
        except grpc.RpcError as err:
            if failure:
                raise failure[0] from None
            raise error_from_rpc(err, f"while importing {symbol} {timeframe} candles") from err
        return response

    def _watch(self, job_id: str, timeout: float | None = None) -> Iterator[training_pb2.TrainingJob]:
        call = self._stub.WatchTrainingJob(training_pb2.GetTrainingJobRequest(job_id=job_id), timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as err:
            raise error_from_rpc(err, f"while watching job {job_id}") from err
        finally:
            call.cancel()


def _params_message(n_estimators: int, max_depth: int, min_samples_leaf: int, class_weight: str | None,
                    random_state: int | None) -> common_pb2.ModelParams:
    """ModelParams from the keyword arguments of `train` and `set_policy` (zero or None: the service default)."""
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
    return params


def _label_message(horizon_bars: int, threshold: float, label_kind: str | None, volatility_bars: int = 0,
                   volatility_multiple: float = 0.0) -> common_pb2.LabelSpec:
    """LabelSpec from the keyword arguments of `train` and `set_policy` (zero or None: the service default)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating, np.integer)):
        raise ValueError(f"threshold must be a number (a fraction: 0.02 means 2 %), got {threshold!r}")
    if isinstance(volatility_multiple, bool) or not isinstance(volatility_multiple,
                                                                (int, float, np.floating, np.integer)):
        raise ValueError(f"volatility_multiple must be a number, got {volatility_multiple!r}")
    kind = label_kind.replace("-", "_") if isinstance(label_kind, str) else label_kind
    if kind not in _LABEL_KINDS:
        raise ValueError(f"label_kind must be None, 'fixed_horizon' or 'triple_barrier', got {label_kind!r}")
    return common_pb2.LabelSpec(horizon_bars=_int_arg(horizon_bars, "horizon_bars"), threshold=float(threshold),
                                kind=_LABEL_KINDS[kind], volatility_bars=_int_arg(volatility_bars, "volatility_bars"),
                                volatility_multiple=float(volatility_multiple))


def _duration_arg(value: Any, name: str) -> duration_pb2.Duration:
    """A Duration from a timedelta (pandas Timedelta too) or text like 30m, 12h, 1d, 2w."""
    if isinstance(value, str):
        try:
            ms = parse_duration(value)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    elif isinstance(value, timedelta):
        ms, rest = divmod(value, timedelta(milliseconds=1))
        if rest or ms <= 0:
            raise ValueError(f"{name} must be a positive whole number of milliseconds, got {value!r}")
    else:
        raise ValueError(f"{name} must be a timedelta or text like 1d or 12h, got {value!r}")
    d = duration_pb2.Duration()
    d.FromMilliseconds(int(ms))
    return d


def _int_arg(value: Any, name: str) -> int:
    """Refuse floats and bools where the message wants an integer, instead of truncating them silently."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)
