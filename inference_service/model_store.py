"""Which model serves each (symbol, timeframe): loaded on first use, verified, cached, and hot-swapped.

The model that serves a market is the one the registry has in stage SERVING (not simply the newest); a market
without one answers NOT_FOUND. The poll picks up a change of the SERVING model (a promotion, a rollback, a new
model that passed the gate) without a restart; a request pinned by model_id may use any verified model of its
market, whatever its stage.

A loaded model is immutable. Swapping replaces a reference under a lock, so a call that already holds the old
model finishes on it, and no call can see a half-loaded one. Files are read only from the model directory, only
when their sha256 matches the registry, and never unpickled: the ONNX graph, and for the native forest runtime
(MLSIGNAL_FOREST_RUNTIME) the scikit-learn file read as plain arrays by `shared.forest_runtime.read_forest`.

A model that cannot be used (its registry row cannot be read, its file is missing or fails its sha256 check, or
ONNX Runtime rejects it) is refused: the reason is logged once, the model that served before keeps serving, and
every other market goes on as before (a SERVING model refused on a cold load answers DATA_LOSS). A refused model
is tried again when its registry row or its file changes (a restored file is served again without a restart).

Watching the registry costs one read per poll whatever the size of the fleet: the registry keeps a version that
every change bumps (`registry.version`), and only the markets changed since the last poll are read again. A refused
model is the exception: its row and file are looked at on every poll, so a fix is noticed (there are few of them).

Cache: by default (`cache_size` 0) every market asked for keeps its serving model in memory; a positive size keeps
that many markets (the least recently used is dropped, and reloaded and re-verified in a worker thread on its next
use). Pinned models are kept up to `cache_size`, or `PINNED_CACHE` when the serving cache is unbounded.

Nothing here is called on the event loop except `in_memory`, which never touches the database or the disk.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from shared.artifacts import ArtifactError, read_verified, resolve_in
from shared.calibration import shrink_to_prior
from shared.errors import DataLoss, InvalidArgument, NotFound, Unavailable, one_line
from shared.forest_runtime import ForestArtifactError, NativeForest, NativeUnavailable, native_library, read_forest
from shared.onnxmodel import OnnxForest
from shared.settings import FOREST_RUNTIMES, Settings
from shared.store import registry
from shared.store.registry import ModelRecord, ModelRow

log = logging.getLogger(__name__)

# Cold loads of different markets run in parallel; two loads of one market never do (they share a lock stripe).
_LOAD_STRIPES = 64
# At most one warning per this many seconds that the cache is evicting models still in use.
_EVICTION_WARNING_SECONDS = 60.0
_REASON_CHARS = 300
#: Pinned models kept in memory when the serving cache is unbounded.
PINNED_CACHE = 1024


@dataclass(frozen=True)
class LoadedModel:
    record: ModelRecord
    forest: OnnxForest | NativeForest
    prior: np.ndarray
    weight: float

    @property
    def model_id(self) -> str:
        return self.record.model_id

    @property
    def runtime(self) -> str:
        """"native" (scikit-learn's trees in the native forest runtime) or "onnx" (ONNX Runtime)."""
        return "native" if isinstance(self.forest, NativeForest) else "onnx"

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """Served probabilities (n, 3) in CLASSES order: the forest shrunk toward the prior, as in training."""
        return shrink_to_prior(self.forest.predict_proba(X), self.prior, self.weight)


_fallback_logged = False


def _prepare_native() -> None:
    """Build the native kernel ahead of the first model load; why it cannot be built is logged when a model loads."""
    with contextlib.suppress(NativeUnavailable):
        native_library()


class _NoSklearnArtifact(ForestArtifactError):
    pass


# Native forests by the sha256 of their scikit-learn file, while a loaded model uses them: models registered from the
# same file (copies, re-registrations) share one forest instead of building their own.
_native_forests: weakref.WeakValueDictionary[str, NativeForest] = weakref.WeakValueDictionary()
_native_forests_lock = threading.Lock()


def _native_forest(record: ModelRecord, model_dir: Path) -> NativeForest:
    """The model's scikit-learn forest in the native runtime. NativeUnavailable when this machine cannot build the
    kernel; ForestArtifactError (or ArtifactError) when the model's scikit-learn file is missing, fails its sha256
    check or is not a forest the runtime serves. The file is read and verified every time; a forest already built
    from the same bytes is shared."""
    if not record.sklearn_artifact or not record.sklearn_sha256:
        raise _NoSklearnArtifact("it has no scikit-learn artifact in the registry")
    data = read_verified(model_dir, record.sklearn_artifact, record.sklearn_sha256)
    with _native_forests_lock:
        forest = _native_forests.get(record.sklearn_sha256)
    if forest is None:
        forest = NativeForest(read_forest(data))
        with _native_forests_lock:
            forest = _native_forests.setdefault(record.sklearn_sha256, forest)
    n_classes = len(record.classes)
    if forest.n_features != len(record.feature_spec.feature_names):
        raise ForestArtifactError(f"its scikit-learn forest takes {forest.n_features} features, its feature spec "
                                  f"defines {len(record.feature_spec.feature_names)}")
    if not np.array_equal(forest.classes, np.arange(n_classes)):
        raise ForestArtifactError(f"its scikit-learn forest has classes {forest.classes.tolist()}, expected "
                                  f"{list(range(n_classes))}")
    return forest


def load_model(record: ModelRecord, model_dir: Path, runtime: str | None = None) -> LoadedModel:
    """Verify and load one model; DataLoss if its file is missing or does not match the registry.

    `runtime` (default: MLSIGNAL_FOREST_RUNTIME) picks what executes the forest: "native" the model's scikit-learn
    trees in the native runtime (`shared.forest_runtime`; refused with DataLoss when that is impossible), "onnx"
    ONNX Runtime on the ONNX graph, "auto" native when possible, else ONNX Runtime with a log line saying why.
    The message may name the file's path: log it, and give clients `client_reason` instead.
    """
    global _fallback_logged
    runtime = Settings.from_env().forest_runtime if runtime is None else runtime
    if runtime not in FOREST_RUNTIMES:
        raise ValueError(f"runtime: expected one of {FOREST_RUNTIMES}, got {runtime!r}")
    try:
        data = read_verified(model_dir, record.artifact, record.sha256)
    except ArtifactError as exc:
        raise DataLoss(f"model {record.model_id} refused: {exc}") from None
    prior, weight = np.asarray(record.prior, dtype=np.float64), float(record.shrink_weight)
    if runtime != "onnx":
        try:
            return LoadedModel(record, _native_forest(record, model_dir), prior, weight)
        except NativeUnavailable as exc:
            if runtime == "native":
                raise DataLoss(f"model {record.model_id} refused: MLSIGNAL_FOREST_RUNTIME=native, but {exc}") from None
            if not _fallback_logged:
                _fallback_logged = True
                log.warning("forest runtime: %s; models are served through ONNX Runtime", exc)
        except (ArtifactError, ForestArtifactError) as exc:
            if runtime == "native":
                raise DataLoss(f"model {record.model_id} refused: MLSIGNAL_FOREST_RUNTIME=native, but the native "
                               f"forest runtime cannot serve it: {exc}") from None
            log.log(logging.INFO if isinstance(exc, _NoSklearnArtifact) else logging.WARNING,
                    "model %s is served through ONNX Runtime, not the native forest runtime: %s", record.model_id, exc)
    forest = OnnxForest(data)
    if forest.n_features != len(record.feature_spec.feature_names):
        raise DataLoss(
            f"model {record.model_id} refused: its ONNX graph takes {forest.n_features} features, "
            f"its feature spec defines {len(record.feature_spec.feature_names)}"
        )
    return LoadedModel(record, forest, prior, weight)


def client_reason(text: str, model_dir: Path) -> str:
    """A refusal reason fit for a client: the server's directories removed, one line, bounded length."""
    text = " ".join(text.split())
    for base in sorted({str(Path(model_dir).resolve()), str(model_dir)}, key=len, reverse=True):
        text = text.replace(base + os.sep, "").replace(base, "the model directory")
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 3] + "..."


@dataclass(frozen=True)
class Resolved:
    """The model that answers a request and the candles of history a stream of its market keeps."""

    model: LoadedModel
    keep: int


@dataclass(frozen=True)
class _Refusal:
    row: str  # the registry row's fingerprint when the model was refused
    file: tuple[int, int, int] | None  # (inode, size, mtime_ns) of its file then; None when it was not there
    reason: str  # for clients: no server paths
    market: tuple[str, str]


class ModelStore:
    def __init__(self, engine: sa.Engine, model_dir: Path, cache_size: int = 0, poll_seconds: float = 2.0,
                 forest_runtime: str | None = None) -> None:
        self.engine = engine
        # what executes the forests (see load_model); MLSIGNAL_FOREST_RUNTIME unless given
        self.forest_runtime = Settings.from_env().forest_runtime if forest_runtime is None else forest_runtime
        if self.forest_runtime not in FOREST_RUNTIMES:
            raise ValueError(f"forest_runtime: expected one of {FOREST_RUNTIMES}, got {self.forest_runtime!r}")
        if self.forest_runtime != "onnx":  # build the kernel now, not during the first request's model load
            threading.Thread(target=_prepare_native, name="forest-kernel-build", daemon=True).start()
        self.model_dir = Path(model_dir)
        self.cache_size = cache_size  # 0: unbounded
        self.pinned_cache_size = cache_size or PINNED_CACHE
        self.poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._serving: OrderedDict[tuple[str, str], LoadedModel] = OrderedDict()  # LRU over keys
        self._last_used: dict[tuple[str, str], float] = {}
        self._pinned: OrderedDict[str, LoadedModel] = OrderedDict()
        self._refused: dict[str, _Refusal] = {}  # model id -> why, and the row and file it was refused for
        self._warmup: dict[tuple[str, str], int] = {}  # markets with models -> the largest warm-up registered
        self._load_locks = [threading.Lock() for _ in range(_LOAD_STRIPES)]
        self._loads = 0
        self._evicted_warning_at = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Registry versions: every change up to `_seen` has been applied to what is cached; `_floor` is the oldest
        # version a model cached since the last poll was read at (changes after it must be looked at again).
        self._seen: int | None = None
        self._floor: int | None = None

    # -- serving -----------------------------------------------------------------------------------------
    def current(self, symbol: str, timeframe: str) -> LoadedModel:
        """The SERVING model of a key (loads it on first use)."""
        key = (symbol, timeframe)
        model = self._cached(key)
        if model is not None:
            return model
        with self._load_locks[hash(key) % _LOAD_STRIPES]:
            model = self._cached(key)  # another call may have loaded it while this one waited
            if model is not None:
                return model
            as_of = registry.version(self.engine)  # read before the row: the poll looks again at changes after it
            model = self._load_serving(symbol, timeframe)
            self._note_read_at(as_of)
            return self._keep_serving(key, model)

    def _note_read_at(self, as_of: int) -> None:
        with self._lock:
            self._floor = as_of if self._floor is None else min(self._floor, as_of)

    def _cached(self, key: tuple[str, str]) -> LoadedModel | None:
        with self._lock:
            model = self._serving.get(key)
            if model is not None:
                self._serving.move_to_end(key)
                self._last_used[key] = time.monotonic()
            return model

    def _keep_serving(self, key: tuple[str, str], model: LoadedModel) -> LoadedModel:
        """Cache a freshly loaded model as the key's serving one (unless the poll put one there meanwhile: it read
        the registry as recently); returns the one cached."""
        now = time.monotonic()
        with self._lock:
            existing = self._serving.get(key)
            if existing is not None:
                model = existing
            self._serving[key] = model
            self._serving.move_to_end(key)
            self._last_used[key] = now
            self._warmup[key] = max(self._warmup.get(key, 0), model.record.warmup_bars)
            evicted_in_use = 0
            while self.cache_size and len(self._serving) > self.cache_size:
                old_key, _ = self._serving.popitem(last=False)
                if now - self._last_used.pop(old_key, 0.0) < self.poll_seconds * 5:
                    evicted_in_use += 1
            warn = evicted_in_use and now - self._evicted_warning_at > _EVICTION_WARNING_SECONDS
            if warn:
                self._evicted_warning_at = now
        if warn:
            log.warning("the model cache (MLSIGNAL_MODEL_CACHE_SIZE=%d) is smaller than the markets in use: models "
                        "are dropped and reloaded; raise it above the number of markets clients follow",
                        self.cache_size)
        return model

    def pinned(self, model_id: str, symbol: str, timeframe: str) -> LoadedModel:
        """A specific model by id; it must belong to the requested symbol and timeframe.

        The registry row's symbol and timeframe are checked before anything is loaded, and a refused model stays
        refused (DATA_LOSS) until its row or file changes.
        """
        with self._lock:
            model = self._pinned.get(model_id)
            if model is not None:
                self._pinned.move_to_end(model_id)
            else:
                model = self._serving.get((symbol, timeframe))
                if model is not None and model.model_id != model_id:
                    model = None
        if model is not None:
            self._check_key(model_id, model.record.symbol, model.record.timeframe, symbol, timeframe)
            return model
        row = registry.model_row(self.engine, model_id)
        if row is None:
            raise NotFound(f"model_id: no model {model_id!r} in the registry", field="model_id")
        self._check_key(model_id, row.symbol, row.timeframe, symbol, timeframe)
        refusal = self._still_refused(row)
        if refusal is not None:
            raise DataLoss(refusal.reason, field="model_id")
        as_of = registry.version(self.engine)
        self._warmup_of(symbol, timeframe)  # a stream pinned to this model then keeps its history without a query
        model = self._load_row(row)
        self._note_read_at(as_of)
        with self._lock:
            self._warmup[(symbol, timeframe)] = max(self._warmup.get((symbol, timeframe), 0), model.record.warmup_bars)
            self._pinned[model_id] = model
            self._pinned.move_to_end(model_id)
            while len(self._pinned) > self.pinned_cache_size:
                self._pinned.popitem(last=False)
        return model

    @staticmethod
    def _check_key(model_id: str, model_symbol: str, model_timeframe: str, symbol: str, timeframe: str) -> None:
        if (model_symbol, model_timeframe) != (symbol, timeframe):
            raise InvalidArgument(
                f"model_id: model {model_id} is for {model_symbol} {model_timeframe}, not {symbol} {timeframe}",
                field="model_id",
            )

    def max_warmup_bars(self, symbol: str, timeframe: str) -> int:
        """The longest warm-up of any model registered for a market (at least the serving model's).

        Cached and refreshed by the poll, so a stream can keep enough history for whichever model serves next; only
        the first call for a market that has no serving model loaded reads the registry.
        """
        key = (symbol, timeframe)
        with self._lock:
            cached = self._warmup.get(key)
        if cached is not None:
            return cached
        return self._warmup_of(symbol, timeframe)

    def _warmup_of(self, symbol: str, timeframe: str) -> int:
        """Read and remember a market's largest warm-up (a market without models is not remembered)."""
        key = (symbol, timeframe)
        found = registry.market_models(self.engine, symbol, timeframe, limit=0).max_warmup_bars
        with self._lock:
            model = self._serving.get(key)
            value = max(found, model.record.warmup_bars if model is not None else 0)
            if value > 0:  # a market without models is not remembered
                self._warmup[key] = max(self._warmup.get(key, 0), value)
        return value

    def loaded(self) -> list[tuple[str, LoadedModel]]:
        """("serving" or "pinned", model) for every model in memory."""
        with self._lock:
            return [("serving", m) for m in self._serving.values()] + [("pinned", m) for m in self._pinned.values()]

    def in_memory(self, symbol: str, timeframe: str, model_id: str = "") -> Resolved | None:
        """The model that would answer (pinned by `model_id`, else the serving one) and the history a stream keeps,
        when both are in memory; else None. Never touches the database or the disk, so the event loop may call it;
        the model returned stays usable even if the cache drops it right after."""
        key = (symbol, timeframe)
        with self._lock:
            keep = self._warmup.get(key)
            if keep is None:
                return None
            if model_id:
                model = self._pinned.get(model_id)
                if model is not None:
                    self._pinned.move_to_end(model_id)
                else:
                    model = self._serving.get(key)
                    if model is not None and model.model_id != model_id:
                        model = None
            else:
                model = self._serving.get(key)
                if model is not None:
                    self._serving.move_to_end(key)
                    self._last_used[key] = time.monotonic()
        if model is None:
            return None
        if model_id:
            self._check_key(model_id, model.record.symbol, model.record.timeframe, symbol, timeframe)
        return Resolved(model, max(keep, model.record.warmup_bars, 1))

    def resolve(self, symbol: str, timeframe: str, model_id: str = "") -> Resolved:
        """Like `in_memory`, but loads what is missing (may read the database and the disk: call it in a thread)."""
        model = self.pinned(model_id, symbol, timeframe) if model_id else self.current(symbol, timeframe)
        return Resolved(model, max(self.max_warmup_bars(symbol, timeframe), model.record.warmup_bars, 1))

    @property
    def loads(self) -> int:
        """How many models this store has loaded (verified and built a forest runtime for) since it started."""
        with self._lock:
            return self._loads

    # -- loading and refusing ----------------------------------------------------------------------------
    def _load_serving(self, symbol: str, timeframe: str) -> LoadedModel:
        row = registry.serving_row(self.engine, symbol, timeframe)
        warmup = registry.market_models(self.engine, symbol, timeframe, limit=0).max_warmup_bars
        if warmup:
            with self._lock:
                self._warmup[(symbol, timeframe)] = warmup
        if row is None:
            if not warmup:
                raise NotFound(
                    f"no model registered for {symbol} {timeframe}; train one first (mlsignal train)", field="symbol"
                )
            raise NotFound(
                f"no model is serving {symbol} {timeframe}: none of its models is SERVING; promote one "
                "(mlsignal models promote MODEL_ID) or pin one by model_id", field="symbol",
            )
        refusal = self._still_refused(row)
        if refusal is not None:
            raise DataLoss(f"no verifiable model for {symbol} {timeframe}: {refusal.reason}", field="model_id")
        try:
            return self._load_row(row)
        except DataLoss as exc:
            raise DataLoss(f"no verifiable model for {symbol} {timeframe}: {exc}", field="model_id") from None

    def _load_row(self, row: ModelRow, serving: LoadedModel | None = None) -> LoadedModel:
        """Parse, verify and load one registry row; a failure of any kind refuses the model (DataLoss)."""
        file = self._file_signature(row.artifact)
        try:
            record = row.record()
        except Exception as exc:  # e.g. a manifest written by a newer version
            detail = f"model {row.model_id} refused: its registry row cannot be read: {one_line(exc, with_type=True)}"
            raise self._refuse(row, file, detail, serving) from None
        try:
            model = load_model(record, self.model_dir, self.forest_runtime)
        except DataLoss as exc:
            raise self._refuse(row, file, str(exc), serving) from None
        except Exception as exc:  # ONNX Runtime rejects the graph, the file cannot be read, ...
            detail = f"model {row.model_id} refused: its file cannot be loaded: {one_line(exc, with_type=True)}"
            raise self._refuse(row, file, detail, serving) from None
        with self._lock:
            self._loads += 1
            retried = self._refused.pop(row.model_id, None)
        if retried is not None:
            log.info("model %s is usable again and is no longer refused", row.model_id)
        return model

    def _refuse(self, row: ModelRow, file: tuple[int, int, int] | None, detail: str,
                serving: LoadedModel | None) -> DataLoss:
        """Remember and log (once) why a model is refused; the DataLoss to raise, without server paths."""
        refusal = _Refusal(row.fingerprint, file, client_reason(detail, self.model_dir), (row.symbol, row.timeframe))
        with self._lock:
            self._refused[row.model_id] = refusal
        keeps = f"; {serving.model_id} keeps serving" if serving is not None else ""
        log.error("%s%s (tried again when its registry row or file changes)", detail, keeps)
        return DataLoss(refusal.reason, field="model_id")

    def _still_refused(self, row: ModelRow) -> _Refusal | None:
        """The refusal of a model whose row and file are unchanged since it was refused, else None."""
        with self._lock:
            refusal = self._refused.get(row.model_id)
        if refusal is None:
            return None
        if refusal.row != row.fingerprint or refusal.file != self._file_signature(row.artifact):
            return None
        return refusal

    def _file_signature(self, artifact: str) -> tuple[int, int, int] | None:
        try:
            st = resolve_in(self.model_dir, artifact).stat()
        except (ArtifactError, OSError):
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- hot reload --------------------------------------------------------------------------------------
    def refresh(self) -> list[str]:
        """Swap in the SERVING model of every cached market where it changed; returns the ids swapped in.

        One read of the registry's version when nothing changed; otherwise only the markets changed since the last
        poll (and those of refused models whose row or file changed) are read again. A model that cannot be used is
        refused (logged once) and the one serving keeps serving; the other markets are checked all the same. Also
        refreshes the largest warm-up of the markets it remembers.
        """
        with self._lock:
            floor, self._floor = self._floor, None
        try:
            now = registry.version(self.engine)
            with self._lock:
                serving = dict(self._serving)
                known = set(serving) | set(self._warmup)
            if self._seen is None:
                due = known
            else:
                after = self._seen if floor is None else min(self._seen, floor)
                due = registry.changed_markets(self.engine, after, now) & known if now > after else set()
            due |= self._markets_of_changed_refusals() & known
            swapped = self._refresh_markets(due, serving)
            self._seen = now
        except (Unavailable, sa.exc.SQLAlchemyError) as exc:  # keep serving what is loaded; the next poll retries
            with self._lock:
                if floor is not None:
                    self._floor = floor if self._floor is None else min(floor, self._floor)
            log.warning("checking the registry for newer models failed: %s", one_line(exc))
            return []
        return swapped

    def _refresh_markets(self, keys: set[tuple[str, str]], serving: dict[tuple[str, str], LoadedModel]) -> list[str]:
        swapped: list[str] = []
        for key in sorted(keys):
            model = serving.get(key)
            if model is None:  # remembered for its warm-up only
                found = registry.market_models(self.engine, *key, limit=0).max_warmup_bars
                with self._lock:
                    if found:
                        self._warmup[key] = found
                    else:
                        self._warmup.pop(key, None)
                continue
            try:
                fresh = self._refresh_key(key, model)
            except (Unavailable, sa.exc.SQLAlchemyError):
                raise
            except Exception:  # an unexpected fault in one market must not stop the others
                log.exception("checking the registry for the serving %s %s model failed", *key)
                continue
            if fresh is not None:
                swapped.append(fresh.model_id)
        return swapped

    def _markets_of_changed_refusals(self) -> set[tuple[str, str]]:
        """Markets of refused models whose registry row or file changed since the refusal (one read by primary key
        and one stat per refused model)."""
        with self._lock:
            refused = dict(self._refused)
        markets = set()
        for model_id, refusal in refused.items():
            row = registry.model_row(self.engine, model_id)
            if row is None or row.fingerprint != refusal.row or self._file_signature(row.artifact) != refusal.file:
                markets.add(refusal.market)
        return markets

    def _refresh_key(self, key: tuple[str, str], model: LoadedModel) -> LoadedModel | None:
        symbol, timeframe = key
        row = registry.serving_row(self.engine, symbol, timeframe)
        warmup = registry.market_models(self.engine, symbol, timeframe, limit=0).max_warmup_bars
        with self._lock:
            self._warmup[key] = max(warmup, model.record.warmup_bars)
        if row is None:  # nothing serves the market any more: its next request is NOT_FOUND
            with self._lock:
                if self._serving.get(key) is model:
                    del self._serving[key]
                    self._last_used.pop(key, None)
            log.info("no model serves %s %s any more (was %s)", symbol, timeframe, model.model_id)
            return None
        if row.model_id == model.model_id or self._still_refused(row) is not None:
            return None
        try:
            fresh = self._load_row(row, serving=model)
        except DataLoss:
            return None  # refused and logged; the model loaded keeps serving
        with self._lock:
            if self._serving.get(key) is not model:
                return None  # dropped from the cache or swapped meanwhile; the next poll looks again
            self._serving[key] = fresh
        log.info("now serving model %s for %s %s (was %s)", fresh.model_id, symbol, timeframe, model.model_id)
        return fresh

    def start_polling(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.refresh()
                except Exception:  # never let the poll thread die
                    log.exception("checking the registry for newer models failed")

        self._thread = threading.Thread(target=loop, name="model-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)

