"""The inference client: ML_UP_PROB / ML_DOWN_PROB / ML_RANGE_PROB for candle frames (backtests) and live feeds.

`predict` turns a frame into columns the way a strategy adds any other indicator; `stream` keeps the history on the
server so a live strategy sends only the newest candle.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc
import numpy as np
import pandas as pd

from mlsignal.client.channel import DEFAULT_TIMEOUT, ServiceClient
from mlsignal.client.errors import (
    MlsignalClientError,
    ProtocolError,
    called_service,
    error_from_rpc,
    error_from_status,
    is_method_not_found,
    wrong_service_note,
)
from mlsignal.client.frames import batch_plan, candle_from_item, frame_to_candles, predictions_to_frame
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from shared.timeframes import ms_to_datetime, ms_to_iso

__all__ = ["InferenceClient", "LivePrediction"]


@dataclass(frozen=True, slots=True)
class LivePrediction:
    """One candle's prediction from `InferenceClient.stream`; up/down/range are NaN when `ready` is false.

    `ood_score` is the candle's out-of-distribution score (NaN when the model has none or the candle is not ready)
    and `ood` whether it is above the model's threshold.

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
    ood_score: float = math.nan
    ood: bool = False

    @property
    def open_time(self) -> datetime:
        """The candle's open time as a UTC datetime."""
        return ms_to_datetime(self.open_time_ms)


class InferenceClient(ServiceClient):
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
                 options: Sequence[tuple[str, Any]] = (), allow_insecure_token: bool = False):
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer, got {max_batch!r}")
        super().__init__(target, tls=tls, root_certificates=root_certificates, token=token, timeout=timeout,
                         options=options, allow_insecure_token=allow_insecure_token)
        self.max_batch = max_batch
        self._stub = inference_pb2_grpc.InferenceServiceStub(self.channel)

    def get_model(self, symbol: str, timeframe: str) -> common_pb2.ModelInfo:
        """The model serving now for a symbol and timeframe; NotFoundError when there is none.

        Example::

            >>> m = c.get_model("BTC/USDT", "1h")                           # doctest: +SKIP
            >>> m.warmup_bars, m.label.horizon_bars, m.metrics["log_loss"]  # doctest: +SKIP
        """
        info: common_pb2.ModelInfo = self._unary(self._stub.GetModel,
                                                 inference_pb2.GetModelRequest(symbol=symbol, timeframe=timeframe))
        return info

    def live_performance(self, symbol: str, timeframe: str, model_id: str = "") -> inference_pb2.LivePerformance:
        """How the model's served predictions scored on the outcomes realised since: `scored` candles, live
        `log_loss` next to the training prior's `prior_log_loss` on the same candles, multiclass `brier`, and
        `reliability` bins per class. `model_id` empty: the model serving now. NotFoundError for an unknown model.

        Example::

            >>> live = c.live_performance("BTC/USDT", "1h")                  # doctest: +SKIP
            >>> live.scored, live.log_loss / live.prior_log_loss               # doctest: +SKIP
        """
        perf: inference_pb2.LivePerformance = self._unary(
            self._stub.GetLivePerformance,
            inference_pb2.GetLivePerformanceRequest(symbol=symbol, timeframe=timeframe, model_id=model_id))
        return perf

    def compare(self, symbol: str, timeframe: str, model_id: str = "",
                baseline_model_id: str = "") -> inference_pb2.LiveComparison:
        """The live test of `model_id` against `baseline_model_id` on the candles both have scored: `paired`
        candles, the mean per-candle log-loss gain of the model (`mean_log_loss_difference`, baseline minus model)
        with its `standard_error` (long-run variance at lag horizon_bars - 1, the larger of the Newey-West and
        Hansen-Hodrick estimates: overlapping labels make neighbouring candles dependent), and the sequential
        test's `decision` (promote, reject or undecided). An empty model_id is the baseline's class prior; an empty
        baseline_model_id the serving model.

        Example::

            >>> c.compare("BTC/USDT", "1h", shadow_id).decision                 # doctest: +SKIP
            'undecided'
        """
        found: inference_pb2.LiveComparison = self._unary(
            self._stub.CompareLivePerformance,
            inference_pb2.CompareLivePerformanceRequest(symbol=symbol, timeframe=timeframe, model_id=model_id,
                                                        baseline_model_id=baseline_model_id))
        return found

    def predict(self, df: pd.DataFrame, symbol: str, timeframe: str, model_id: str = "") -> pd.DataFrame:
        """A copy of `df` with ML_UP_PROB, ML_DOWN_PROB, ML_RANGE_PROB, ML_READY, ML_IN_SAMPLE and ML_MODEL_ID.

        `df` has a tz-aware DatetimeIndex (or an ``open_time_ms`` / ``open_time`` / ``timestamp`` column) with
        strictly increasing times, and columns open, high, low, close, volume, optionally funding_rate and
        open_interest (NaN: absent). The first warmup_bars - 1 rows are not ready (NaN probabilities, ML_READY false);
        rows inside the model's training window have ML_IN_SAMPLE true and do not make an honest backtest. `model_id`
        pins a model; empty means the one serving now. Frames longer than `max_batch` use one model for every row.

        Example::

            >>> out = c.predict(df, "BTC/USDT", "1h")                       # doctest: +SKIP
            >>> honest = out[out.ML_READY & ~out.ML_IN_SAMPLE]               # doctest: +SKIP
            >>> honest[["ML_UP_PROB", "ML_DOWN_PROB", "ML_RANGE_PROB"]]      # doctest: +SKIP
        """
        candles = frame_to_candles(df)
        n = len(candles)
        if n == 0:
            raise ValueError("the frame has no rows; predict needs at least one candle")
        times = np.fromiter((c.open_time_ms for c in candles), dtype=np.int64, count=n)
        steps = np.diff(times)
        if np.any(steps <= 0):
            i = int(np.flatnonzero(steps <= 0)[0]) + 1
            raise ValueError(f"candle times must be strictly increasing: row {i} ({ms_to_iso(int(times[i]))}) does "
                             f"not come after row {i - 1} ({ms_to_iso(int(times[i - 1]))})")

        if n <= self.max_batch:
            resp = self._predict_call(symbol, timeframe, model_id, candles, 0, n)
            if model_id and resp.model_id != model_id:
                raise ProtocolError(None, f"answered by model {resp.model_id!r}, not the pinned model {model_id!r}")
            return predictions_to_frame(df, resp.predictions, resp.model_id)

        # Several requests: one model for all of them, each kept row with a full warmup of history in its request.
        served = self.get_model(symbol, timeframe)
        pinned = model_id or served.model_id
        first: inference_pb2.PredictResponse | None
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

    def _predict_call(self, symbol: str, timeframe: str, model_id: str, candles: list[common_pb2.Candle],
                      start: int, stop: int) -> inference_pb2.PredictResponse:
        request = inference_pb2.PredictRequest(symbol=symbol, timeframe=timeframe, model_id=model_id,
                                               candles=candles[start:stop])
        note = "" if start == 0 and stop == len(candles) else f"in the request for frame rows {start}..{stop - 1}"
        resp: inference_pb2.PredictResponse = self._unary(self._stub.Predict, request, note)
        if len(resp.predictions) != stop - start:
            raise ProtocolError(None, f"{len(resp.predictions)} predictions for {stop - start} candles", note=note)
        return resp

    def stream(self, candles: Iterable[Any], symbol: str, timeframe: str, model_id: str = "",
               on_error: Callable[[MlsignalClientError], None] | None = None) -> Iterator[LivePrediction]:
        """Live predictions: each candle goes to the server as its own StreamPredict message as it arrives.

        `candles` may block between items (e.g. a generator reading an exchange feed). Items are Candle messages,
        mappings with open_time_ms / open_time / timestamp and open, high, low, close, volume (optional funding_rate,
        open_interest; None or NaN means absent), pandas Series (the name is the open time), df.iterrows() pairs or
        df.itertuples() rows. Times must increase; a candle with the same time as the previous one replaces it (a
        still-forming candle). Yields one LivePrediction per candle, in order. Leaving the loop cancels the stream.
        A candle that cannot be read raises ValueError after the predictions for the candles before it.

        A candle the server refuses (a bad value, no model yet) raises its typed error (InvalidArgumentError,
        NotFoundError, ... with the field in `.field`). With `on_error`, the error is passed to it instead and the
        stream goes on: the server keeps the stream open and its state as if the candle had not been sent.

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
                    candle = candle_from_item(item)
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
                    if resp.HasField("error"):
                        refused = sent.popleft() if sent else None
                        exc = error_from_status(resp.error, f"candle {refused} in the prediction stream")
                        if on_error is None:
                            raise exc
                        on_error(exc)
                        continue
                    yield self._live(resp, sent)
            except grpc.RpcError as err:
                if failure:
                    raise failure[0] from err
                note = "in the prediction stream"
                if is_method_not_found(err):
                    wrong = wrong_service_note(self.channel, called_service(self._stub.StreamPredict), self.target)
                    note = f"{note}; {wrong}" if wrong else note
                raise error_from_rpc(err, note) from err
            if failure:
                raise failure[0]
        finally:
            call.cancel()

    @staticmethod
    def _live(resp: inference_pb2.PredictResponse, sent: collections.deque[int]) -> LivePrediction:
        """The prediction for the oldest candle still waiting for one; ProtocolError if it answers another candle."""
        if len(resp.predictions) != 1 or not sent:
            raise ProtocolError(None, f"a stream response carries {len(resp.predictions)} predictions for one candle")
        p = resp.predictions[0]
        expected = sent.popleft()
        if p.open_time_ms != expected:
            raise ProtocolError(None, f"prediction for open_time_ms {p.open_time_ms} arrived where {expected} was "
                                      "expected")
        score = p.ood_score if p.HasField("ood_score") else math.nan
        if p.ready:
            return LivePrediction(p.open_time_ms, p.ml_up_prob, p.ml_down_prob, p.ml_range_prob, True, p.in_sample,
                                  resp.model_id, score, p.ood)
        return LivePrediction(p.open_time_ms, math.nan, math.nan, math.nan, False, p.in_sample, resp.model_id, score,
                              p.ood)
