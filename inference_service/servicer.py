"""gRPC InferenceService: converts messages and maps errors; the logic is in service.py and stream_session.py.

The server runs on asyncio. Predictions are short CPU work, so a small request whose model is already in memory is
answered inline on the event loop, with the very model found there (`ModelStore.in_memory`: no gap between the check
and the use in which an eviction or a swap could make the loop load a model). A large batch (more than
`INLINE_CANDLES` candles), or one whose model must first be read from the registry and disk, runs in a worker thread
so the loop keeps serving every other call meanwhile. Nothing that can reach the database, the disk or a model load
runs on the loop.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, nullcontext

import grpc

from inference_service import converters
from inference_service.comparisons import compare_live, prior_comparison
from inference_service.drift_window import DriftWindows
from inference_service.live_scores import LivePerformance, live_performance
from inference_service.model_store import ModelStore, Resolved
from inference_service.service import InferenceService, OnAnswered, OnPredicted, OnServed
from inference_service.shadows import Shadows
from inference_service.stream_session import StreamSession
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from shared.converters import model_info
from shared.errors import MlsignalError
from shared.live_comparison import DEFAULT_TEST, PROMOTE, LiveTestSettings
from shared.sequential_test import Comparison
from shared.server.limits import StreamLimit
from shared.server.status import maps_errors, status_proto
from shared.store import registry

#: Requests with more candles than this are predicted in a worker thread rather than on the event loop.
INLINE_CANDLES = 256


def candle_count(request: inference_pb2.PredictRequest) -> int:
    """How many candles a request carries, as rows or as columns."""
    return len(request.candles) + len(request.columns.open_time_ms)


class Answers:
    """One response per request, the same for both servicers: the service calls and the message conversions."""

    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 on_served: OnServed | None = None, on_answered: OnAnswered | None = None,
                 live_test: LiveTestSettings = DEFAULT_TEST, drift: DriftWindows | None = None) -> None:
        self.store = store
        self.service = InferenceService(store, max_batch, on_predicted, on_served, on_answered)
        self.live_test = live_test
        self.drift = drift

    def predict(self, request: inference_pb2.PredictRequest,
                found: Resolved | None = None) -> inference_pb2.PredictResponse:
        candles = converters.batch_from_request(request, self.service.max_batch)
        model, predictions = self.service.predict(request.symbol, request.timeframe, request.model_id, candles,
                                                  found)
        return converters.response_for(request, model.model_id, predictions)

    def stream_step(self, session: StreamSession, request: inference_pb2.PredictRequest,
                    found: Resolved | None = None) -> inference_pb2.PredictResponse:
        """Answer one stream message. A domain error answers that message with `error` set and no predictions, and
        the stream goes on (see `StreamSession.step` for what it keeps). Only unexpected errors (bugs) propagate."""
        try:
            candles = converters.batch_from_request(request, self.service.max_batch)
            model, predictions = session.step(request.symbol, request.timeframe, request.model_id, candles, found)
        except MlsignalError as exc:
            return inference_pb2.PredictResponse(error=status_proto(exc))
        return converters.response_for(request, model.model_id, predictions)

    def get_model(self, request: inference_pb2.GetModelRequest,
                  found: Resolved | None = None) -> common_pb2.ModelInfo:
        return model_info(self.service.serving_model(request.symbol, request.timeframe, found))

    def get_live_performance(self, request: inference_pb2.GetLivePerformanceRequest) -> inference_pb2.LivePerformance:
        perf = live_performance(self.store, request.symbol, request.timeframe, request.model_id)
        message = live_performance_message(perf)
        record = registry.get_model(self.store.engine, perf.model_id)
        if self.drift is not None:
            view = self.drift.view(perf.model_id)
            # NaN when the candles served carry no score (a model registered before it); 0 with no candle at all
            message.drift_candles, message.ood_rate = view.candles, view.ood_rate if view.candles else 0.0
            if view.psi is not None and record is not None:
                names = record.feature_spec.feature_names
                message.drift.extend(inference_pb2.FeatureDrift(feature=name, psi=float(v))
                                     for name, v in sorted(zip(names, view.psi, strict=True),
                                                           key=lambda item: -item[1] if math.isfinite(item[1])
                                                           else math.inf))
        if record is not None:
            against_prior = prior_comparison(self.store.engine, record, self.live_test)
            message.prior_comparison.CopyFrom(comparison_message("", perf.model_id, against_prior))
            message.worse_than_prior = against_prior.decision == PROMOTE
        return message

    def compare_live_performance(
            self, request: inference_pb2.CompareLivePerformanceRequest) -> inference_pb2.LiveComparison:
        found = compare_live(self.store.engine, request.symbol, request.timeframe, request.model_id,
                             request.baseline_model_id, self.live_test)
        return comparison_message(found.model_id, found.baseline_model_id, found.result)

    def in_memory(self, symbol: str, timeframe: str, model_id: str) -> Resolved | None:
        """The model that would answer, when it is in memory (answering then needs neither database nor disk).
        A malformed pin (a model of another market) found in memory raises InvalidArgument."""
        try:
            return self.store.in_memory(symbol, timeframe, model_id)
        except MlsignalError:
            return None  # the worker thread answers with the error, in the one place errors are answered


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The asyncio InferenceService. At most `max_streams` StreamPredict calls are open at once."""

    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 max_streams: int = 10_000, on_served: OnServed | None = None,
                 shadows: Shadows | None = None, live_test: LiveTestSettings = DEFAULT_TEST,
                 drift: DriftWindows | None = None) -> None:
        self.answers = Answers(store, max_batch, on_predicted, on_served,
                               shadows.submit if shadows is not None else None, live_test, drift)
        self.shadows = shadows
        self.streams = StreamLimit(max_streams, "StreamPredict")

    def _inline(self, request: inference_pb2.PredictRequest, symbol: str, timeframe: str,
                model_id: str) -> Resolved | None:
        """The model to answer with on the event loop, or None: answer in a worker thread."""
        if candle_count(request) > INLINE_CANDLES:
            return None
        return self.answers.in_memory(symbol, timeframe, model_id)

    @maps_errors
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        found = self._inline(request, request.symbol, request.timeframe, request.model_id)
        if found is not None:
            return self.answers.predict(request, found)
        return await asyncio.to_thread(self.answers.predict, request)

    @maps_errors
    async def StreamPredict(
        self, request_iterator: AsyncIterator[inference_pb2.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        """One response per message, in order. A message that fails (a bad candle, an unknown model, the database
        unreachable while a model loads) is answered with `error` and the stream goes on with its state
        unchanged; the call itself ends only when the client closes it, at its deadline, when the stream is past
        MLSIGNAL_MAX_STREAMS (refused at once, RESOURCE_EXHAUSTED), at server shutdown, or INTERNAL on a bug."""
        shadows = self.shadows
        with self.streams.slot():
            session = StreamSession(self.answers.service)
            async for request in request_iterator:
                symbol = session.symbol or request.symbol
                timeframe = session.timeframe or request.timeframe
                model_id = request.model_id or session.model_id
                found = self._inline(request, symbol, timeframe, model_id)
                deferring: AbstractContextManager[list] = shadows.deferring() if shadows is not None \
                    else nullcontext([])
                with deferring as jobs:
                    if found is not None:
                        response = self.answers.stream_step(session, request, found)
                    else:
                        response = await asyncio.to_thread(self.answers.stream_step, session, request)
                yield response
                if jobs and shadows is not None:  # the response is sent: the shadows predict its candles now
                    if candle_count(request) <= INLINE_CANDLES:
                        shadows.run(jobs)
                    else:  # as large a job as the answer, which was not computed on the event loop either
                        shadows.enqueue(jobs)

    @maps_errors
    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        found = self.answers.in_memory(request.symbol, request.timeframe, "")
        if found is not None:
            return self.answers.get_model(request, found)
        return await asyncio.to_thread(self.answers.get_model, request)

    @maps_errors
    async def GetLivePerformance(
        self, request: inference_pb2.GetLivePerformanceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LivePerformance:
        """Reads the scores from the database, so it always runs in a worker thread."""
        return await asyncio.to_thread(self.answers.get_live_performance, request)

    @maps_errors
    async def CompareLivePerformance(
        self, request: inference_pb2.CompareLivePerformanceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LiveComparison:
        """Reads the scores from the database, so it always runs in a worker thread."""
        return await asyncio.to_thread(self.answers.compare_live_performance, request)


def live_performance_message(perf: LivePerformance) -> inference_pb2.LivePerformance:
    return inference_pb2.LivePerformance(
        model_id=perf.model_id, scored=perf.scored, log_loss=perf.log_loss, prior_log_loss=perf.prior_log_loss,
        brier=perf.brier, first_open_time_ms=perf.first_open_time_ms, last_open_time_ms=perf.last_open_time_ms,
        expected_log_loss=perf.expected_log_loss,
        reliability=[inference_pb2.ReliabilityBin(class_name=b.class_name, lower=b.lower, upper=b.upper,
                                                  count=b.count, mean_predicted=b.mean_predicted,
                                                  observed_frequency=b.observed_frequency)
                     for b in perf.reliability],
    )


def comparison_message(model_id: str, baseline_model_id: str, result: Comparison) -> inference_pb2.LiveComparison:
    return inference_pb2.LiveComparison(
        model_id=model_id, baseline_model_id=baseline_model_id, paired=result.paired,
        mean_log_loss_difference=result.mean_log_loss_difference, standard_error=result.standard_error,
        statistic=result.statistic, decision=result.decision, reason=result.reason,
    )
