"""gRPC TrainingService (asyncio): converts messages and maps errors; the logic is in service.py.

Every call that reads or writes the database or talks to the scheduler runs in a worker thread, so the event loop
only converts messages; WatchTrainingJob streams share one poller per job (`training_service.watches`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from mlsignal.v1 import common_pb2, training_pb2, training_pb2_grpc
from shared.converters import model_info
from shared.errors import InvalidArgument
from shared.server.limits import StreamLimit
from shared.server.status import maps_errors
from training_service import converters
from training_service.candle_import import CandleImport
from training_service.service import TrainingService
from training_service.watches import JobWatches


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    """At most `max_streams` WatchTrainingJob calls are open at once; the next is refused RESOURCE_EXHAUSTED."""

    def __init__(self, service: TrainingService, max_streams: int = 10_000) -> None:
        self.service = service
        self.streams = StreamLimit(max_streams, "WatchTrainingJob")
        self.watches = JobWatches(service.get)

    @maps_errors
    async def StartTraining(self, request: training_pb2.StartTrainingRequest,
                            context: grpc.aio.ServicerContext) -> training_pb2.TrainingJob:
        job = await asyncio.to_thread(self.service.start, converters.training_request(request))
        return converters.job_message(job)

    @maps_errors
    async def GetTrainingJob(self, request: training_pb2.GetTrainingJobRequest,
                             context: grpc.aio.ServicerContext) -> training_pb2.TrainingJob:
        return converters.job_message(await asyncio.to_thread(self.service.get, request.job_id))

    @maps_errors
    async def WatchTrainingJob(self, request: training_pb2.GetTrainingJobRequest,
                               context: grpc.aio.ServicerContext) -> AsyncIterator[training_pb2.TrainingJob]:
        """The job now and after each change, ending after a final state. An unknown job is NOT_FOUND; losing the
        database ends the watch UNAVAILABLE (watch again to resume)."""
        with self.streams.slot():
            async for job in self.watches.watch(request.job_id):
                yield converters.job_message(job)

    @maps_errors
    async def CancelTrainingJob(self, request: training_pb2.CancelTrainingJobRequest,
                                context: grpc.aio.ServicerContext) -> training_pb2.TrainingJob:
        return converters.job_message(await asyncio.to_thread(self.service.cancel, request.job_id))

    @maps_errors
    async def ListTrainingJobs(self, request: training_pb2.ListTrainingJobsRequest,
                               context: grpc.aio.ServicerContext) -> training_pb2.ListTrainingJobsResponse:
        states = []
        for s in request.states:
            if s not in converters.PROTO_TO_STATE:
                raise InvalidArgument(f"states: unknown job state {s}", field="states")
            states.append(converters.PROTO_TO_STATE[s])
        if request.limit < 0:
            raise InvalidArgument("limit: must be >= 0", field="limit")
        limit = min(request.limit or 100, 10_000)
        jobs = await asyncio.to_thread(self.service.list_jobs, request.symbol, request.timeframe, tuple(states), limit)
        return training_pb2.ListTrainingJobsResponse(jobs=[converters.job_message(j) for j in jobs])

    @maps_errors
    async def ListModels(self, request: training_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> training_pb2.ListModelsResponse:
        models = await asyncio.to_thread(self.service.list_models, request.symbol, request.timeframe)
        return training_pb2.ListModelsResponse(models=[model_info(m) for m in models])

    @maps_errors
    async def PromoteModel(self, request: training_pb2.PromoteModelRequest,
                           context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        """The model, now SERVING; NOT_FOUND for an unknown id, FAILED_PRECONDITION when its model file is missing
        or does not match its sha256."""
        record = await asyncio.to_thread(self.service.promote, request.model_id, request.reason)
        return model_info(record)

    @maps_errors
    async def RollbackModel(self, request: training_pb2.RollbackModelRequest,
                            context: grpc.aio.ServicerContext) -> common_pb2.ModelInfo:
        """The model SERVING again (rollbacks walk back); FAILED_PRECONDITION when nothing serves, nothing served
        before, or the model file of the one it would bring back is missing or does not match its sha256."""
        symbol, timeframe = converters.market(request.symbol, request.timeframe)
        record = await asyncio.to_thread(self.service.rollback, symbol, timeframe, request.reason)
        return model_info(record)

    @maps_errors
    async def ListModelStageChanges(self, request: training_pb2.ListModelStageChangesRequest,
                                    context: grpc.aio.ServicerContext) -> training_pb2.ListModelStageChangesResponse:
        symbol, timeframe = converters.market(request.symbol, request.timeframe)
        changes = await asyncio.to_thread(self.service.stage_changes, symbol, timeframe, request.model_id,
                                          request.limit)
        return converters.stage_changes_response(changes)

    @maps_errors
    async def SetRetrainPolicy(self, request: training_pb2.RetrainPolicy,
                               context: grpc.aio.ServicerContext) -> training_pb2.RetrainPolicy:
        """Create or replace a market's retrain policy; returns it as stored, with its next due time."""
        policy = converters.retrain_policy(request)
        return converters.policy_message(await asyncio.to_thread(self.service.set_policy, policy))

    @maps_errors
    async def ListRetrainPolicies(self, request: training_pb2.ListRetrainPoliciesRequest,
                                  context: grpc.aio.ServicerContext) -> training_pb2.ListRetrainPoliciesResponse:
        found = await asyncio.to_thread(self.service.list_policies, request.symbol, request.timeframe)
        return training_pb2.ListRetrainPoliciesResponse(policies=[converters.policy_message(p) for p in found])

    @maps_errors
    async def DeleteRetrainPolicy(self, request: training_pb2.DeleteRetrainPolicyRequest,
                                  context: grpc.aio.ServicerContext) -> training_pb2.RetrainPolicy:
        """The deleted policy; NOT_FOUND when the market has none."""
        symbol, timeframe = converters.market(request.symbol, request.timeframe)
        return converters.policy_message(await asyncio.to_thread(self.service.delete_policy, symbol, timeframe))

    @maps_errors
    async def ImportCandles(self, request_iterator: AsyncIterator[training_pb2.ImportCandlesRequest],
                            context: grpc.aio.ServicerContext) -> training_pb2.ImportCandlesResponse:
        """Stores each message's closed candles in one transaction, in a worker thread, and answers the counts once
        the client closes the stream. A refused message ends the call INVALID_ARGUMENT naming the message and the
        field; the messages before it stay stored."""
        session = self.service.candle_import()
        async for request in request_iterator:
            await asyncio.to_thread(_import_message, session, request)
        return converters.import_response(session.result())


def _import_message(session: CandleImport, request: training_pb2.ImportCandlesRequest) -> None:
    """Convert and store one ImportCandles message (in a worker thread: converting rows costs Python time too)."""
    session.add(converters.import_batch(request))
