"""The training service's logic behind the gRPC layer: validation against stored data, jobs and the registry."""

from __future__ import annotations

from collections.abc import Callable

from shared.artifacts import ArtifactError, read_verified
from shared.errors import FailedPrecondition, InvalidArgument, NotFound
from shared.features import TRAINING_SPECS
from shared.store import policies, registry
from shared.store.marketdata import count_candles
from shared.timeframes import ms_to_iso
from training_service.candle_import import CandleImport
from training_service.jobs import Job, JobStore, TrainingRequest, now_ms
from training_service.pipeline import min_candles_needed
from training_service.scheduler import Scheduler


class TrainingService:
    def __init__(self, store: JobStore, scheduler: Scheduler, clock: Callable[[], int] = now_ms):
        self.store = store
        self.scheduler = scheduler
        self.engine = store.engine
        self.clock = clock  # epoch ms: when a new retrain policy is due, which imported candles have closed

    def start(self, req: TrainingRequest) -> Job:
        """Check the stored candles can support the request, then queue it."""
        n = count_candles(self.engine, req.symbol, req.timeframe, req.start_ms, req.end_ms)
        span = (
            f"[{ms_to_iso(req.start_ms) if req.start_ms is not None else 'first candle'}, "
            f"{ms_to_iso(req.end_ms) if req.end_ms is not None else 'last candle'})"
        )
        if n == 0:
            raise FailedPrecondition(
                f"no candles stored for {req.symbol} {req.timeframe} in {span}; import data first "
                "(mlsignal data import) or check symbol, timeframe, start_time and end_time",
                field="start_time",
            )
        needed = min_candles_needed(TRAINING_SPECS[req.feature_set], req.label)
        if n < needed:
            raise FailedPrecondition(
                f"{n} candles stored for {req.symbol} {req.timeframe} in {span}, but training with "
                f"label.horizon_bars={req.label.horizon_bars} needs at least {needed}",
                field="start_time",
            )
        return self.scheduler.submit(req)

    def get(self, job_id: str) -> Job:
        job = self.store.get(job_id) if job_id else None
        if job is None:
            raise NotFound(f"no training job with job_id {job_id!r}", field="job_id")
        return job

    def watch(self, job_id: str, is_active=lambda: True):
        """Yield the job each time it changes, ending after a final state."""
        last = None
        while is_active():
            job = self.get(job_id)
            key = (job.state, job.stage, round(job.progress, 4), job.error, job.model_id)
            if key != last:
                last = key
                yield job
            if job.final:
                return
            self.store.wait_for_change(0.5)

    def cancel(self, job_id: str) -> Job:
        return self.scheduler.cancel(job_id)

    def list_jobs(self, symbol: str, timeframe: str, states: tuple[str, ...], limit: int) -> list[Job]:
        return self.store.list(symbol, timeframe, states, limit)

    def list_models(self, symbol: str, timeframe: str) -> list[registry.ModelRecord]:
        return registry.list_models(self.engine, symbol, timeframe)

    def promote(self, model_id: str, reason: str) -> registry.ModelRecord:
        """Make a model of any stage the SERVING one of its market; NotFound for an unknown id, FailedPrecondition
        when its ONNX file is missing from the model directory or does not match its sha256 (nothing changes)."""
        if not model_id:
            raise NotFound("model_id: no model id given", field="model_id")
        return registry.promote(self.engine, model_id, reason, verify=self.verify_artifact)

    def stage_changes(self, symbol: str, timeframe: str, model_id: str, limit: int) -> list[registry.StageChange]:
        """Stage changes of a market's models (or one model's), oldest first; the newest `limit` when > 0."""
        if limit < 0:
            raise InvalidArgument(f"limit: must be 0 (all) or positive, got {limit}", field="limit")
        return registry.stage_history(self.engine, symbol, timeframe, model_id, limit=limit or None)

    def rollback(self, symbol: str, timeframe: str, reason: str) -> registry.ModelRecord:
        """Bring back the model that served before the serving one (rollbacks walk back through the promotions);
        FailedPrecondition when there is none, or when its ONNX file is missing or does not match its sha256."""
        return registry.rollback(self.engine, symbol, timeframe, reason, verify=self.verify_artifact)

    def verify_artifact(self, model_id: str, artifact: str, sha256: str) -> None:
        """Refuse (FailedPrecondition) a model whose ONNX file is not in the model directory with its sha256.

        The registry calls it inside the promote or rollback transaction, under the market's lock and just before
        the stage changes, so only the commit itself separates the check from the change. Research retention, the
        one thing that deletes registered models' files, chooses them under the same lock and marks them first, and
        the registry refuses those models outright."""
        try:
            read_verified(self.scheduler.model_dir, artifact, sha256)
        except ArtifactError as exc:
            raise FailedPrecondition(f"model_id: model {model_id} cannot serve: {exc}", field="model_id") from None
        except OSError as exc:
            raise FailedPrecondition(f"model_id: model {model_id} cannot serve: cannot read its model file "
                                     f"{artifact}: {exc}", field="model_id") from None

    # -- retrain policies (run by training_service.policies.PolicyRunner) ----------------------------------------
    def set_policy(self, policy: policies.RetrainPolicy) -> policies.RetrainPolicy:
        """Create or replace a market's retrain policy (validated); a new one is due now."""
        return policies.put(self.engine, policy, self.clock())

    def list_policies(self, symbol: str, timeframe: str) -> list[policies.RetrainPolicy]:
        return policies.list_policies(self.engine, symbol, timeframe)

    def delete_policy(self, symbol: str, timeframe: str) -> policies.RetrainPolicy:
        """Delete a market's retrain policy and return it; NotFound when it has none."""
        deleted = policies.delete(self.engine, symbol, timeframe)
        if deleted is None:
            raise NotFound(f"no retrain policy for {symbol} {timeframe}", field="symbol")
        return deleted

    # -- candles pushed over gRPC (training_service.candle_import) ----------------------------------------------
    def candle_import(self) -> CandleImport:
        """A new ImportCandles call: it stores closed candles by the service's clock."""
        return CandleImport(self.engine, self.clock)
