"""gRPC InferenceService: converts messages and maps errors; the logic is in service.py and stream_session.py."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from inference_service import converters
from inference_service.model_store import ModelStore
from inference_service.service import InferenceService, OnPredicted
from inference_service.stream_session import StreamSession
from mlsignal.v1 import common_pb2, inference_pb2, inference_pb2_grpc
from shared.converters import model_info
from shared.server.status import maps_errors


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, store: ModelStore, max_batch: int, on_predicted: OnPredicted | None = None) -> None:
        self.service = InferenceService(store, max_batch, on_predicted)

    @maps_errors
    def Predict(
        self, request: inference_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> inference_pb2.PredictResponse:
        model, predictions = self.service.predict(request.symbol, request.timeframe, request.model_id,
                                                  converters.request_candles(request))
        return converters.predict_response(model.model_id, predictions)

    @maps_errors
    def StreamPredict(
        self, request_iterator: Iterator[inference_pb2.PredictRequest], context: grpc.ServicerContext
    ) -> Iterator[inference_pb2.PredictResponse]:
        session = StreamSession(self.service)
        for request in request_iterator:
            model, predictions = session.step(request.symbol, request.timeframe, request.model_id,
                                              converters.request_candles(request))
            yield converters.predict_response(model.model_id, predictions)

    @maps_errors
    def GetModel(self, request: inference_pb2.GetModelRequest, context: grpc.ServicerContext) -> common_pb2.ModelInfo:
        return model_info(self.service.serving_model(request.symbol, request.timeframe))
