"""`mlsignal-inference`: the InferenceService gRPC server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator

import sqlalchemy as sa

from inference_service.model_store import ModelStore
from inference_service.servicer import InferenceServicer
from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.server.builder import RunningServer, ServerHandle, observability, server_credentials, start_server
from shared.server.lifecycle import server_main
from shared.settings import Settings
from shared.store.db import make_engine

log = logging.getLogger("mlsignal.inference")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
BYTES_PER_CANDLE = 128  # a Candle message with every field set is under 80 bytes; leave room for framing


class RunningInference(RunningServer):
    def __init__(self, handle: ServerHandle, store: ModelStore, engine: sa.Engine):
        super().__init__(handle, engine)
        self.store = store


def loaded_models(store: ModelStore) -> Iterator[tuple[str, str, str, str, int]]:
    """(symbol, timeframe, model_id, role, created_at_ms) for every model in memory (for the metrics endpoint)."""
    for role, m in store.loaded():
        rec = m.record
        yield rec.symbol, rec.timeframe, rec.model_id, role, rec.created_at_ms


def start(settings: Settings, address: str | None = None) -> RunningInference:
    """Connect to the registry, start polling for new models and serve. Used by main() and by tests.

    Also serves metrics on MLSIGNAL_METRICS_PORT, requires MLSIGNAL_AUTH_TOKEN and speaks TLS with
    MLSIGNAL_TLS_CERT/KEY when those are set. The server runs on an asyncio event loop in a background thread
    (see `shared.server.builder.ServerLoop`); the returned handle is used from ordinary threads.
    """
    address = address or settings.inference_addr
    credentials = server_credentials(settings.server_tls_pair())
    engine = make_engine(settings.database_url)
    with engine.connect() as conn:  # fail fast when the database is unreachable
        conn.execute(sa.text("SELECT 1"))
    metrics, interceptors = observability(settings, "inference", address)
    store = ModelStore(engine, settings.model_dir, settings.model_cache_size, settings.model_poll_seconds)
    on_predicted = None
    if metrics is not None:
        from shared.server.metrics import inference_metrics

        on_predicted = inference_metrics(metrics, lambda: loaded_models(store))
    store.start_polling()
    max_bytes = max(4 * 1024 * 1024, settings.max_batch * BYTES_PER_CANDLE + 1024 * 1024)
    try:
        handle = start_server(
            address,
            lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
                InferenceServicer(store, settings.max_batch, on_predicted, settings.max_streams), server),
            [SERVICE_NAME],
            max_bytes,
            interceptors=interceptors,
            credentials=credentials,
            metrics=metrics,
        )
    except BaseException:
        store.stop()
        if metrics is not None:
            metrics.close()
        raise
    handle.on_stop(lambda grace: store.stop())
    if metrics is not None:
        handle.on_stopped(metrics.close)
    return RunningInference(handle, store, engine)


def _describe(settings: Settings, running: RunningInference) -> str:
    return (f"inference service listening on port {running.port}{' (TLS)' if settings.tls else ''}, models in "
            f"{settings.model_dir}{', bearer token required' if settings.auth_token else ''}")


def main(argv: list[str] | None = None) -> int:
    return server_main("mlsignal-inference", start, _describe)


if __name__ == "__main__":
    sys.exit(main())
