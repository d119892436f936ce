"""Which model serves each (symbol, timeframe): loaded on first use, verified, cached, and hot-swapped.

A loaded model is immutable. Swapping replaces a reference under a lock, so a call that already holds the old
model finishes on it, and no call can see a half-loaded one. Files are read only from the model directory, only
when their sha256 matches the registry, and only as ONNX (never unpickled).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from shared.artifacts import ArtifactError, read_verified
from shared.calibration import shrink_to_prior
from shared.errors import DataLoss, InvalidArgument, NotFound
from shared.onnxmodel import OnnxForest
from shared.store import registry
from shared.store.registry import ModelRecord

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    forest: OnnxForest
    prior: np.ndarray
    weight: float

    @property
    def model_id(self) -> str:
        return self.record.model_id

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Served probabilities (n, 3) in CLASSES order: the forest shrunk toward the prior, as in training."""
        return shrink_to_prior(self.forest.predict_proba(X), self.prior, self.weight)


def load_model(record: ModelRecord, model_dir: Path) -> LoadedModel:
    """Verify and load one model; DataLoss if its file is missing or does not match the registry."""
    try:
        data = read_verified(model_dir, record.artifact, record.sha256)
    except ArtifactError as exc:
        raise DataLoss(f"model {record.model_id} refused: {exc}") from None
    forest = OnnxForest(data)
    if forest.n_features != len(record.feature_spec.feature_names):
        raise DataLoss(
            f"model {record.model_id} refused: its ONNX graph takes {forest.n_features} features, "
            f"its feature spec defines {len(record.feature_spec.feature_names)}"
        )
    return LoadedModel(record, forest, np.asarray(record.prior, dtype=np.float64), float(record.shrink_weight))


class ModelStore:
    def __init__(self, engine: sa.Engine, model_dir: Path, cache_size: int = 32, poll_seconds: float = 2.0) -> None:
        self.engine = engine
        self.model_dir = Path(model_dir)
        self.cache_size = cache_size
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._serving: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()  # LRU over keys
        self._pinned: OrderedDict[str, LoadedModel] = OrderedDict()
        self._refused: set[str] = set()  # model ids whose files failed verification
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- serving -----------------------------------------------------------------------------------------
    def current(self, symbol: str, timeframe: str) -> LoadedModel:
        """The newest verifiable model for a key (loads it on first use)."""
        key = (symbol, timeframe)
        with self._lock:
            model = self._serving.get(key)
            if model is not None:
                self._serving.move_to_end(key)
                return model
        model = self._load_newest(symbol, timeframe)
        with self._lock:
            existing = self._serving.get(key)
            if existing is not None and existing.record.created_at_ms >= model.record.created_at_ms:
                model = existing  # another call loaded it meanwhile
            self._serving[key] = model
            self._serving.move_to_end(key)
            while len(self._serving) > self.cache_size:
                self._serving.popitem(last=False)
        return model

    def pinned(self, model_id: str, symbol: str, timeframe: str) -> LoadedModel:
        """A specific model by id; it must belong to the requested symbol and timeframe."""
        with self._lock:
            model = self._pinned.get(model_id)
            if model is not None:
                self._pinned.move_to_end(model_id)
        if model is None:
            with self._lock:
                serving = next((m for m in self._serving.values() if m.model_id == model_id), None)
            if serving is not None:
                model = serving
            else:
                record = registry.get_model(self.engine, model_id)
                if record is None:
                    raise NotFound(f"model_id: no model {model_id!r} in the registry", field="model_id")
                model = load_model(record, self.model_dir)
            with self._lock:
                self._pinned[model_id] = model
                while len(self._pinned) > self.cache_size:
                    self._pinned.popitem(last=False)
        rec = model.record
        if (rec.symbol, rec.timeframe) != (symbol, timeframe):
            raise InvalidArgument(
                f"model_id: model {model_id} is for {rec.symbol} {rec.timeframe}, not {symbol} {timeframe}",
                field="model_id",
            )
        return model

    def _load_newest(self, symbol: str, timeframe: str) -> LoadedModel:
        records = registry.list_models(self.engine, symbol, timeframe)
        if not records:
            raise NotFound(
                f"no model registered for {symbol} {timeframe}; train one first (mlsignal train)", field="symbol"
            )
        errors: list[str] = []
        for rec in records:
            if rec.model_id in self._refused:
                continue
            try:
                return load_model(rec, self.model_dir)
            except DataLoss as exc:
                log.error("%s", exc)
                self._refused.add(rec.model_id)
                errors.append(str(exc))
        raise DataLoss(f"no verifiable model for {symbol} {timeframe}: " + "; ".join(errors[:3]))

    def loaded(self) -> list[tuple[str, LoadedModel]]:
        """("serving" or "pinned", model) for every model in memory."""
        with self._lock:
            return [("serving", m) for m in self._serving.values()] + [("pinned", m) for m in self._pinned.values()]

    # -- hot reload --------------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Swap in newer models for every key being served; returns the ids swapped in."""
        with self._lock:
            serving = dict(self._serving)
        swapped: list[str] = []
        for (symbol, timeframe), model in serving.items():
            newest = registry.newest_model_id(self.engine, symbol, timeframe)
            if newest is None or newest == model.model_id or newest in self._refused:
                continue
            record = registry.get_model(self.engine, newest)
            if record is None or record.created_at_ms < model.record.created_at_ms:
                continue
            try:
                fresh = load_model(record, self.model_dir)
            except DataLoss as exc:
                log.error("%s; %s keeps serving", exc, model.model_id)
                self._refused.add(newest)
                continue
            with self._lock:
                if (symbol, timeframe) in self._serving:
                    self._serving[(symbol, timeframe)] = fresh
            log.info("now serving model %s for %s %s (was %s)", fresh.model_id, symbol, timeframe, model.model_id)
            swapped.append(fresh.model_id)
        return swapped

    def start_polling(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # the registry may be briefly unreachable; keep serving what is loaded
                    log.exception("checking the registry for newer models failed")

        self._thread = threading.Thread(target=loop, name="model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
