"""gRPC TrainingService: converts messages and maps errors; the logic is in service.py."""

from __future__ import annotations

from mlsignal.v1 import training_pb2, training_pb2_grpc
from shared.converters import model_info
from shared.errors import InvalidArgument
from shared.server.status import maps_errors
from training_service import converters
from training_service.service import TrainingService


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, service: TrainingService):
        self.service = service

    @maps_errors
    def StartTraining(self, request, context):
        return converters.job_message(self.service.start(converters.training_request(request)))

    @maps_errors
    def GetTrainingJob(self, request, context):
        return converters.job_message(self.service.get(request.job_id))

    @maps_errors
    def WatchTrainingJob(self, request, context):
        for job in self.service.watch(request.job_id, context.is_active):
            yield converters.job_message(job)

    @maps_errors
    def CancelTrainingJob(self, request, context):
        return converters.job_message(self.service.cancel(request.job_id))

    @maps_errors
    def ListTrainingJobs(self, request, context):
        states = []
        for s in request.states:
            if s not in converters.PROTO_TO_STATE:
                raise InvalidArgument(f"states: unknown job state {s}", field="states")
            states.append(converters.PROTO_TO_STATE[s])
        if request.limit < 0:
            raise InvalidArgument("limit: must be >= 0", field="limit")
        limit = min(request.limit or 100, 10_000)
        jobs = self.service.list_jobs(request.symbol, request.timeframe, tuple(states), limit)
        return training_pb2.ListTrainingJobsResponse(jobs=[converters.job_message(j) for j in jobs])

    @maps_errors
    def ListModels(self, request, context):
        models = self.service.list_models(request.symbol, request.timeframe)
        return training_pb2.ListModelsResponse(models=[model_info(m) for m in models])
