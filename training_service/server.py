"""`mlsignal-training`: the TrainingService gRPC server."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import sqlalchemy as sa

from mlsignal.v1 import training_pb2, training_pb2_grpc
from shared.db import make_engine
from shared.grpcserver import ServerHandle, configure_logging, run_until_signalled, start_server
from shared.migrate import upgrade
from shared.settings import Settings
from training_service.jobs import JobStore
from training_service.scheduler import Scheduler
from training_service.service import TrainingService
from training_service.servicer import TrainingServicer

log = logging.getLogger("mlsignal.training")
SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass
class RunningTraining:
    handle: ServerHandle
    scheduler: Scheduler
    engine: sa.Engine

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self, grace: float = 1.0) -> None:
        self.handle.stop(grace)
        self.engine.dispose()


def start(settings: Settings, address: str | None = None) -> RunningTraining:
    """Migrate the database, recover jobs, start the workers and the server. Used by main() and by tests."""
    upgrade(settings.database_url)
    engine = make_engine(settings.database_url)
    store = JobStore(engine)
    scheduler = Scheduler(
        store,
        settings.database_url,
        settings.model_dir,
        workers=settings.training_workers,
        queue_size=settings.training_queue_size,
        fit_jobs=settings.training_fit_jobs,
    )
    scheduler.start()
    service = TrainingService(store, scheduler)
    handle = start_server(
        address or settings.training_addr,
        lambda server: training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(service), server),
        [SERVICE_NAME],
        MAX_MESSAGE_BYTES,
    )
    handle.on_stop(scheduler.stop)
    return RunningTraining(handle, scheduler, engine)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"mlsignal-training: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        running = start(settings)
    except sa.exc.OperationalError as exc:
        print(f"mlsignal-training: cannot use the database: {exc.orig}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mlsignal-training: {exc}", file=sys.stderr)
        return 1
    log.info("training service listening on port %d (database %s, models in %s)", running.port,
             sa.engine.make_url(settings.database_url).render_as_string(hide_password=True), settings.model_dir)
    print(f"mlsignal-training listening on port {running.port}", flush=True)
    run_until_signalled(running.handle, settings.grace_seconds)
    running.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
