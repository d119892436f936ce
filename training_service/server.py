"""`mlsignal-training`: the TrainingService gRPC server."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import sqlalchemy as sa

from mlsignal.v1 import training_pb2, training_pb2_grpc
from shared.server.builder import RunningServer, ServerHandle, observability, server_credentials, start_server
from shared.server.lifecycle import server_main
from shared.server.startup import DatabaseGate
from shared.settings import Settings
from shared.store.db import make_engine, training_jobs
from training_service.executors import DaskExecutor, Executor, LocalProcessExecutor
from training_service.jobs import JobStore, now_ms
from training_service.policies import PolicyRunner
from training_service.promotion import LiveTestSettings, PromotionRunner
from training_service.scheduler import Scheduler
from training_service.service import TrainingService
from training_service.servicer import TrainingServicer

log = logging.getLogger("mlsignal.training")
SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class RunningTraining(RunningServer):
    def __init__(self, handle: ServerHandle, scheduler: Scheduler, engine: sa.Engine, database_gate: DatabaseGate,
                 policies: PolicyRunner | None = None, promotion: PromotionRunner | None = None):
        super().__init__(handle, engine)
        self.scheduler = scheduler
        self.database_gate = database_gate
        self.policies = policies  # the retrain policy runner; tests call its tick()
        self.promotion = promotion  # the live promotion test; tests call its tick()


def job_counts(engine: sa.Engine) -> dict[str, int]:
    """Training jobs per state, read from the database (for the metrics endpoint)."""
    query = sa.select(training_jobs.c.state, sa.func.count()).group_by(training_jobs.c.state)
    with engine.connect() as conn:
        return {state: int(n) for state, n in conn.execute(query)}


def make_executor(settings: Settings) -> Executor:
    """Where jobs run: one task per job on the Dask cluster at MLSIGNAL_DASK_SCHEDULER, else a pool of
    MLSIGNAL_TRAINING_WORKERS warm local worker processes."""
    if settings.dask_scheduler:
        return DaskExecutor(settings.dask_scheduler, settings.database_url, settings.training_fit_jobs,
                            settings.dask_spread_fit, tls_files=settings.dask_tls_files(),
                            allow_plaintext=settings.dask_allow_plaintext)
    return LocalProcessExecutor(settings.database_url, settings.training_fit_jobs,
                                settings.training_workers)


def start(settings: Settings, address: str | None = None, clock: Callable[[], int] | None = None) -> RunningTraining:
    """Check the database, recover jobs, start the workers and the server. Used by main() and by tests.

    The database must hold the current schema (`mlsignal db upgrade` creates or migrates it; the server never does):
    StartupError otherwise. When it cannot be reached, the server starts NOT_SERVING and recovers jobs and starts the
    workers once it answers (`shared.server.startup.DatabaseGate`).

    Also serves metrics on MLSIGNAL_METRICS_PORT, requires MLSIGNAL_AUTH_TOKEN and speaks TLS with
    MLSIGNAL_TLS_CERT/KEY when those are set, and runs jobs on the Dask cluster at MLSIGNAL_DASK_SCHEDULER.

    Retrain policies run every MLSIGNAL_POLICY_INTERVAL_SECONDS once the scheduler has started; `clock` (epoch ms,
    default the wall clock) is the time they and SetRetrainPolicy go by.
    """
    address = address or settings.training_addr
    credentials = server_credentials(settings.server_tls_pair())
    gate = DatabaseGate(settings.database_url)
    ready = gate.check()
    metrics, interceptors = observability(settings, "training", address)
    try:
        engine = make_engine(settings.database_url)
        store = JobStore(engine)
        scheduler = Scheduler(
            store,
            settings.database_url,
            settings.model_dir,
            workers=settings.training_workers,
            queue_size=settings.training_queue_size,
            fit_jobs=settings.training_fit_jobs,
            executor=make_executor(settings),
            promotion=settings.promotion,
            promotion_tolerance=settings.promotion_tolerance,
            research_keep=settings.research_keep,
        )
        if metrics is not None:
            from shared.server.metrics import training_metrics

            scheduler.on_job_finished = training_metrics(metrics, lambda: job_counts(engine))
        time_ms = clock or now_ms
        runner = PolicyRunner(engine, scheduler, clock=time_ms, interval=settings.policy_interval_seconds)
        if metrics is not None:
            from shared.server.metrics import policy_metrics
            from shared.store import policies, registry

            runner.on_outcome = policy_metrics(metrics, lambda: policies.due_count(engine, time_ms()),
                                               lambda: registry.serving_models(engine), now_ms)
        promotion = PromotionRunner(
            engine, LiveTestSettings(settings.shadow_min_scored, settings.shadow_max_scored, settings.shadow_alpha),
            settings.demote_worse_than_prior, settings.policy_interval_seconds)
        if metrics is not None:
            from shared.server.metrics import promotion_metrics

            promotion.on_decision = promotion_metrics(metrics, promotion.worse_than_prior)
        service = TrainingService(store, scheduler, time_ms)
        promotion.verify = service.verify_artifact
        try:
            handle = start_server(
                address,
                lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(
                    TrainingServicer(service, settings.max_streams), server),
                [SERVICE_NAME],
                MAX_MESSAGE_BYTES,
                interceptors=interceptors,
                credentials=credentials,
                metrics=metrics,
                serving=False,  # until the scheduler has started (bound first: a taken port changes no job)
            )
        except BaseException:
            scheduler.stop(0)
            raise
    except BaseException:
        if metrics is not None:
            metrics.close()
        raise
    def scheduler_health(healthy: bool) -> None:
        # While the scheduler cannot record jobs (the database refuses writes), the service is not serving.
        for service in ("", SERVICE_NAME):
            handle.set_serving(service, healthy)

    def on_database_ready() -> None:
        scheduler.start()
        runner.start()
        promotion.start()
        scheduler.on_health_change = scheduler_health
        scheduler_health(scheduler.healthy)
        handle.runner.run(asyncio.sleep(0), 10)  # the health status is set once this returns

    handle.on_stop(gate.stop)
    handle.on_stop(runner.stop)
    handle.on_stop(promotion.stop)
    handle.on_stop(scheduler.stop)
    if metrics is not None:
        handle.on_stopped(metrics.close)
    if not ready:
        gate.wait_in_background(on_database_ready)
    else:
        try:
            on_database_ready()
        except BaseException:
            handle.stop(0)
            if metrics is not None:
                metrics.close()
            raise
    return RunningTraining(handle, scheduler, engine, gate, runner, promotion)


def _describe(settings: Settings, running: RunningTraining) -> str:
    return (f"training service listening on port {running.port}{' (TLS)' if settings.tls else ''}, database "
            f"{sa.engine.make_url(settings.database_url).render_as_string(hide_password=True)}, models in "
            f"{settings.model_dir}{', bearer token required' if settings.auth_token else ''}, jobs run on "
            f"{running.scheduler.executor.description}")


def main(argv: list[str] | None = None) -> int:
    return server_main("mlsignal-training", start, _describe)


if __name__ == "__main__":
    sys.exit(main())
