"""gRPC InferenceService: converts messages and maps errors; the logic is in service.py and stream_session.py.

`InferenceServicer` is what the server runs (asyncio). Predictions are short CPU work, so a small request whose
model is already in memory is answered inline on the event loop; a large batch (more than `INLINE_CANDLES`
candles), or one whose model must first be read from the registry and disk, runs in a worker thread so the loop
keeps serving every other call meanwhile. `BlockingInferenceServicer` answers the same way for a thread-pool
`grpc.server`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc

from inference_service import converters
from inference_service.live_scores import LivePerformance, live_performance
from inference_service.model_store import ModelStore
from inference_service.service import InferenceService, OnPredicted, OnServed
from inference_service.stream_session import StreamSession
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from shared.converters import model_info
from shared.errors import MlsignalError
from shared.server.limits import StreamLimit
from shared.server.status import maps_errors, status_proto

#: Requests with more candles than this are predicted in a worker thread rather than on the event loop.
INLINE_CANDLES = 256


def candle_count(request: inference_pb2.PredictRequest) -> int:
    """How many candles a request carries, as rows or as columns."""
    return len(request.candles) + len(request.columns.open_time_ms)


class Answers:
    """One response per request, the same for both servicers: the service calls and the message conversions."""

    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 on_served: OnServed | None = None) -> None:
        self.store = store
        self.service = InferenceService(store, max_batch, on_predicted, on_served)

    def predict(self, request: inference_pb2.PredictRequest) -> inference_pb2.PredictResponse:
        candles = converters.batch_from_request(request, self.service.max_batch)
        model, predictions = self.service.predict(request.symbol, request.timeframe, request.model_id, candles)
        return converters.response_for(request, model.model_id, predictions)

    def stream_step(self, session: StreamSession,
                    request: inference_pb2.PredictRequest) -> inference_pb2.PredictResponse:
        """Answer one stream message. A domain error answers that message with `error` set and no predictions; the
        session is left as it was, so the stream goes on. Only unexpected errors (bugs) propagate."""
        try:
            candles = converters.batch_from_request(request, self.service.max_batch)
            model, predictions = session.step(request.symbol, request.timeframe, request.model_id, candles)
        except MlsignalError as exc:
            return inference_pb2.PredictResponse(error=status_proto(exc))
        return converters.response_for(request, model.model_id, predictions)

    def get_model(self, request: inference_pb2.GetModelRequest) -> common_pb2.ModelInfo:
        return model_info(self.service.serving_model(request.symbol, request.timeframe))

    def get_live_performance(self, request: inference_pb2.GetLivePerformanceRequest) -> inference_pb2.LivePerformance:
        perf = live_performance(self.store, request.symbol, request.timeframe, request.model_id)
        return live_performance_message(perf)

    def in_memory(self, symbol: str, timeframe: str, model_id: str) -> bool:
        """Whether the model that would answer is loaded already, so answering needs neither database nor disk."""
        return self.store.is_loaded(symbol, timeframe, model_id)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The asyncio InferenceService. At most `max_streams` StreamPredict calls are open at once."""

    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 max_streams: int = 10_000, on_served: OnServed | None = None) -> None:
        self.answers = Answers(store, max_batch, on_predicted, on_served)
        self.streams = StreamLimit(max_streams, "StreamPredict")

    def _inline(self, request: inference_pb2.PredictRequest, symbol: str, timeframe: str, model_id: str) -> bool:
        return candle_count(request) <= INLINE_CANDLES and self.answers.in_memory(symbol, timeframe, model_id)

    @maps_errors
    async def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.PredictResponse:
        if self._inline(request, request.symbol, request.timeframe, request.model_id):
            return self.answers.predict(request)
        return await asyncio.to_thread(self.answers.predict, request)

    @maps_errors
    async def StreamPredict(
        self, request_iterator: AsyncIterator[inference_pb2.PredictRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[inference_pb2.PredictResponse]:
        """One response per message, in order. A message that fails (a bad candle, an unknown model, the database
        unreachable while a model loads) is answered with `error` and the stream goes on with its state
        unchanged; the call itself ends only when the client closes it, at its deadline, when the stream is past
        MLSIGNAL_MAX_STREAMS (refused at once, RESOURCE_EXHAUSTED), at server shutdown, or INTERNAL on a bug."""
        with self.streams.slot():
            session = StreamSession(self.answers.service)
            async for request in request_iterator:
                symbol = session.symbol or request.symbol
                timeframe = session.timeframe or request.timeframe
                model_id = request.model_id or session.model_id
                if self._inline(request, symbol, timeframe, model_id):
                    yield self.answers.stream_step(session, request)
                else:
                    yield await asyncio.to_thread(self.answers.stream_step, session, request)

    @maps_errors
    async def GetModel(
        self, request: inference_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.ModelInfo:
        if self.answers.in_memory(request.symbol, request.timeframe, ""):
            return self.answers.get_model(request)
        return await asyncio.to_thread(self.answers.get_model, request)

    @maps_errors
    async def GetLivePerformance(
        self, request: inference_pb2.GetLivePerformanceRequest, context: grpc.aio.ServicerContext
    ) -> inference_pb2.LivePerformance:
        """Reads the scores from the database, so it always runs in a worker thread."""
        return await asyncio.to_thread(self.answers.get_live_performance, request)


class BlockingInferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """The same InferenceService for a thread-pool `grpc.server` (each open stream holds one of its threads)."""

    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None,
                 on_served: OnServed | None = None) -> None:
        self.answers = Answers(store, max_batch, on_predicted, on_served)

    @maps_errors
    def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> inference_pb2.PredictResponse:
        return self.answers.predict(request)

    @maps_errors
    def StreamPredict(
        self, request_iterator: Iterator[inference_pb2.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.PredictResponse]:
        session = StreamSession(self.answers.service)
        for request in request_iterator:
            yield self.answers.stream_step(session, request)

    @maps_errors
    def GetModel(self, request: inference_pb2.GetModelRequest, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        return self.answers.get_model(request)

    @maps_errors
    def GetLivePerformance(self, request: inference_pb2.GetLivePerformanceRequest,
                           context: grpc.ServicerContext) -> inference_pb2.LivePerformance:
        return self.answers.get_live_performance(request)


def live_performance_message(perf: LivePerformance) -> inference_pb2.LivePerformance:
    return inference_pb2.LivePerformance(
        model_id=perf.model_id, scored=perf.scored, log_loss=perf.log_loss, prior_log_loss=perf.prior_log_loss,
        brier=perf.brier, first_open_time_ms=perf.first_open_time_ms, last_open_time_ms=perf.last_open_time_ms,
        reliability=[inference_pb2.ReliabilityBin(class_name=b.class_name, lower=b.lower, upper=b.upper,
                                                  count=b.count, mean_predicted=b.mean_predicted,
                                                  observed_frequency=b.observed_frequency)
                     for b in perf.reliability],
    )
