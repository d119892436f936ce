"""`mlsignal-inference`: the InferenceService gRPC server."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

import sqlalchemy as sa

from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.db import make_engine
from shared.grpcserver import ServerHandle, configure_logging, run_until_signalled, start_server
from shared.settings import Settings
from inference_service.models import ModelStore
from inference_service.servicer import InferenceServicer

log = logging.getLogger("mlsignal.inference")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
BYTES_PER_CANDLE = 128  # a Candle message with every field set is under 80 bytes; leave room for framing


@dataclass
class RunningInference:
    handle: ServerHandle
    store: ModelStore
    engine: sa.Engine

    @property
    def port(self) -> int:
        return self.handle.port

    def stop(self, grace: float = 1.0) -> None:
        self.handle.stop(grace)
        self.engine.dispose()


def start(settings: Settings, address: str | None = None) -> RunningInference:
    """Connect to the registry, start polling for new models and serve. Used by main() and by tests."""
    engine = make_engine(settings.database_url)
    with engine.connect() as conn:  # fail fast when the database is unreachable
        conn.execute(sa.text("SELECT 1"))
    store = ModelStore(engine, settings.model_dir, settings.model_cache_size, settings.model_poll_seconds)
    store.start_polling()
    max_bytes = max(4 * 1024 * 1024, settings.max_batch * BYTES_PER_CANDLE + 1024 * 1024)
    handle = start_server(
        address or settings.inference_addr,
        lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
            InferenceServicer(store, settings.max_batch), server),
        [SERVICE_NAME],
        max_bytes,
    )
    handle.on_stop(lambda grace: store.stop())
    return RunningInference(handle, store, engine)


def main(argv: list[str] | None = None) -> int:
    try:
        settings = Settings.from_env()
    except ValueError as exc:
        print(f"mlsignal-inference: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        running = start(settings)
    except sa.exc.OperationalError as exc:
        print(f"mlsignal-inference: cannot use the database: {exc.orig}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"mlsignal-inference: {exc}", file=sys.stderr)
        return 1
    log.info("inference service listening on port %d (models in %s)", running.port, settings.model_dir)
    print(f"mlsignal-inference listening on port {running.port}", flush=True)
    run_until_signalled(running.handle, settings.grace_seconds)
    running.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
