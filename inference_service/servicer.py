"""gRPC InferenceService: converts messages and maps errors; the logic is in streams.py and predictor.py."""

from __future__ import annotations

from mlsignal.v1 import inference_pb2_grpc
from shared.converters import model_info
from shared.server.builder import maps_errors
from inference_service.converters import response
from inference_service.models import ModelStore
from inference_service.streams import StreamSession, predict_batch, resolve_key


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, store: ModelStore, max_batch: int, on_predicted=None):
        self.store = store
        self.max_batch = max_batch
        self.on_predicted = on_predicted  # metrics hook: on_predicted(model, n_candles)

    @maps_errors
    def Predict(self, request, context):
        model, result = predict_batch(self.store, request, self.max_batch)
        if self.on_predicted is not None:
            self.on_predicted(model, len(request.candles))
        return response(model.model_id, result)

    @maps_errors
    def StreamPredict(self, request_iterator, context):
        session = StreamSession(self.store, self.max_batch)
        for request in request_iterator:
            model, result = session.step(request)
            if self.on_predicted is not None:
                self.on_predicted(model, len(request.candles))
            yield response(model.model_id, result)

    @maps_errors
    def GetModel(self, request, context):
        resolve_key(request.symbol, request.timeframe)
        return model_info(self.store.current(request.symbol, request.timeframe).record)
