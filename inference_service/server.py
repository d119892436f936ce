"""`mlsignal-inference`: the InferenceService gRPC server."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator

import sqlalchemy as sa

from inference_service.journal import Journal
from inference_service.model_store import ModelStore
from inference_service.servicer import InferenceServicer
from inference_service.shadows import Shadows
from mlsignal.v1 import inference_pb2, inference_pb2_grpc
from shared.live_comparison import LiveTestSettings
from shared.server.builder import RunningServer, ServerHandle, observability, server_credentials, start_server
from shared.server.lifecycle import server_main
from shared.server.startup import DatabaseGate
from shared.settings import Settings
from shared.store.db import make_engine
from shared.store.registry import ModelRecord

log = logging.getLogger("mlsignal.inference")
SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name
BYTES_PER_CANDLE = 128  # a Candle message with every field set is under 80 bytes; leave room for framing
#: Health name that reports NOT_SERVING while a serving model is older than MLSIGNAL_MODEL_MAX_AGE.
STALENESS_SERVICE = "mlsignal.staleness"


class StalenessWatch:
    """Health of `mlsignal.staleness`: NOT_SERVING while a serving model in memory is older than the maximum age
    (by its created_at), SERVING otherwise. Inference serves the model all the same; this only tells monitoring
    that it is time to retrain or promote. Checked every `interval` seconds."""

    def __init__(self, store: ModelStore, max_age_ms: int, set_serving: Callable[[bool], None],
                 interval: float = 2.0) -> None:
        self.store, self.max_age_ms, self.set_serving, self.interval = store, max_age_ms, set_serving, interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._serving: bool | None = None

    def stale(self, now_ms: int | None = None) -> list[ModelRecord]:
        """The serving models in memory older than the maximum age."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        return [m.record for role, m in self.store.loaded()
                if role == "serving" and now_ms - m.record.created_at_ms > self.max_age_ms]

    def check(self) -> bool:
        stale = self.stale()
        serving = not stale
        if serving != self._serving:
            self._serving = serving
            self.set_serving(serving)
            if stale:
                log.warning("%d serving model(s) older than MLSIGNAL_MODEL_MAX_AGE, e.g. %s for %s %s; health "
                            "reports %s NOT_SERVING", len(stale), stale[0].model_id, stale[0].symbol,
                            stale[0].timeframe, STALENESS_SERVICE)
        return serving

    def start(self) -> None:
        def loop() -> None:
            while True:
                try:
                    self.check()
                except Exception:  # never let the watch die
                    log.exception("checking the age of the serving models failed")
                if self._stop.wait(self.interval):
                    return

        self._thread = threading.Thread(target=loop, name="model-staleness", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class RunningInference(RunningServer):
    journal: Journal | None = None
    shadows: Shadows | None = None
    staleness: StalenessWatch | None = None

    def __init__(self, handle: ServerHandle, store: ModelStore, engine: sa.Engine, database_gate: DatabaseGate):
        super().__init__(handle, engine)
        self.store = store
        self.database_gate = database_gate


def loaded_models(store: ModelStore) -> Iterator[tuple[str, str, str, str, int]]:
    """(symbol, timeframe, model_id, role, created_at_ms) for every model in memory (for the metrics endpoint)."""
    for role, m in store.loaded():
        rec = m.record
        yield rec.symbol, rec.timeframe, rec.model_id, role, rec.created_at_ms


def start(settings: Settings, address: str | None = None) -> RunningInference:
    """Check the database, start polling the registry for new models and serve. Used by main() and by tests.

    The database must hold the current schema (`mlsignal db upgrade`; the server never creates one): StartupError
    otherwise. When it cannot be reached, the server starts NOT_SERVING and reports SERVING once it answers
    (`shared.server.startup.DatabaseGate`).

    Also serves metrics on MLSIGNAL_METRICS_PORT, requires MLSIGNAL_AUTH_TOKEN and speaks TLS with
    MLSIGNAL_TLS_CERT/KEY when those are set. The server runs on an asyncio event loop in a background thread
    (see `shared.server.builder.ServerLoop`); the returned handle is used from ordinary threads.
    """
    address = address or settings.inference_addr
    credentials = server_credentials(settings.server_tls_pair())
    gate = DatabaseGate(settings.database_url)
    ready = gate.check()
    engine = make_engine(settings.database_url)
    metrics, interceptors = observability(settings, "inference", address)
    store = ModelStore(engine, settings.model_dir, settings.model_cache_size, settings.model_poll_seconds,
                       settings.forest_runtime)
    journal = Journal(engine, flush_seconds=settings.live_flush_seconds, retention_days=settings.live_retention_days,
                      drift_window=settings.drift_window) if settings.live_monitoring else None
    # A market's SHADOW models predict what its serving model answered, for the live test; only with the journal.
    shadows = Shadows(engine, settings.model_dir, journal.record, settings.model_poll_seconds,
                      forest_runtime=settings.forest_runtime) if journal is not None else None
    on_predicted = None
    if metrics is not None:
        from shared.server.metrics import inference_metrics, live_metrics

        on_predicted = inference_metrics(metrics, lambda: loaded_models(store))
        if journal is not None:
            live_metrics(metrics, lambda: serving_models(store), _summary_of(journal), lambda: journal.dropped,
                         _drift_of(journal, store))
    store.start_polling()
    if journal is not None:
        journal.start()
    if shadows is not None:
        shadows.start()
    max_bytes = max(4 * 1024 * 1024, settings.max_batch * BYTES_PER_CANDLE + 1024 * 1024)
    try:
        handle = start_server(
            address,
            lambda server: inference_pb2_grpc.add_InferenceServiceServicer_to_server(
                InferenceServicer(store, settings.max_batch, on_predicted, settings.max_streams,
                                  on_served=journal.record if journal is not None else None,
                                  shadows=shadows,
                                  live_test=LiveTestSettings(settings.shadow_min_scored, settings.shadow_max_scored,
                                                             settings.shadow_alpha),
                                  drift=journal.drift if journal is not None else None), server),
            [SERVICE_NAME],
            max_bytes,
            interceptors=interceptors,
            credentials=credentials,
            metrics=metrics,
            serving=ready,
        )
    except BaseException:
        store.stop()
        if shadows is not None:
            shadows.stop()
        if journal is not None:
            journal.stop()
        if metrics is not None:
            metrics.close()
        raise
    handle.on_stop(gate.stop)
    handle.on_stop(lambda grace: store.stop())
    if shadows is not None:
        handle.on_stopped(shadows.stop)  # before the journal stops: it journals what the shadows predict
    if journal is not None:
        handle.on_stopped(journal.stop)  # every call has finished: write what they served
    staleness = _watch_staleness(settings, store, handle)
    if metrics is not None:
        handle.on_stopped(metrics.close)
    if not ready:
        def on_database_ready() -> None:
            for name in ("", SERVICE_NAME):
                handle.set_serving(name, True)

        gate.wait_in_background(on_database_ready)
    running = RunningInference(handle, store, engine, gate)
    running.journal, running.staleness, running.shadows = journal, staleness, shadows
    return running


def serving_models(store: ModelStore) -> Iterator[tuple[str, str, str]]:
    """(symbol, timeframe, model_id) of every serving model in memory."""
    for role, m in store.loaded():
        if role == "serving":
            yield m.record.symbol, m.record.timeframe, m.record.model_id


def _summary_of(journal: Journal) -> Callable[[str], tuple[int, float, float, float]]:
    def summary(model_id: str) -> tuple[int, float, float, float]:
        s = journal.summary(model_id)
        return s.scored, s.loss_sum, s.prior_loss_sum, s.entropy_sum

    return summary


def _drift_of(journal: Journal, store: ModelStore) -> Callable[[str], tuple[int, list[tuple[str, float]], float]]:
    def drift(model_id: str) -> tuple[int, list[tuple[str, float]], float]:
        view = journal.drift.view(model_id)
        names = next((m.record.feature_spec.feature_names for _, m in store.loaded() if m.model_id == model_id), ())
        psis = list(zip(names, view.psi.tolist(), strict=True)) if view.psi is not None and names else []
        return view.candles, psis, view.ood_rate

    return drift


def _watch_staleness(settings: Settings, store: ModelStore, handle: ServerHandle) -> StalenessWatch | None:
    """With MLSIGNAL_MODEL_MAX_AGE set, watch the serving models' age as the health name `mlsignal.staleness`.

    Unset, the name is not registered (a Check of it is NOT_FOUND): a SERVING there would claim a watch that no one
    configured."""
    max_age_ms = settings.model_max_age_ms()
    if max_age_ms is None:
        return None
    watch = StalenessWatch(store, max_age_ms, lambda serving: handle.set_serving(STALENESS_SERVICE, serving),
                           interval=min(settings.model_poll_seconds, 60.0))
    watch.start()
    handle.on_stop(lambda grace: watch.stop())
    return watch


def _describe(settings: Settings, running: RunningInference) -> str:
    return (f"inference service listening on port {running.port}{' (TLS)' if settings.tls else ''}, models in "
            f"{settings.model_dir}{', bearer token required' if settings.auth_token else ''}")


def main(argv: list[str] | None = None) -> int:
    return server_main("mlsignal-inference", start, _describe)


if __name__ == "__main__":
    sys.exit(main())
