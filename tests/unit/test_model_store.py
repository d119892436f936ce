"""The model store called directly: a real SQLite registry and real tiny ONNX forests (five shallow trees).

Covers refusal of unusable models (an unreadable registry row, a file ONNX Runtime rejects, a file that fails its
sha256 check): the previous model keeps serving, other markets still hot-reload, each refusal is logged once, and a
fixed row or restored file is picked up without a restart. Also the cache under many markets, pinned models, and
the largest warm-up a stream must keep.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from sklearn.ensemble import RandomForestClassifier

from inference_service.model_store import ModelStore
from shared.artifacts import sha256_bytes, write_atomic
from shared.errors import DataLoss, InvalidArgument, NotFound
from shared.features import FeatureSpec
from shared.labels import CLASSES, LabelSpec
from shared.params import ForestParams
from shared.store.db import make_engine
from shared.store.db import models as models_table
from shared.store.migrate import upgrade
from shared.store.registry import CANDIDATE, SERVING, ModelRecord, insert_model
from training_service.pipeline import export_onnx

H = 3_600_000
T0 = 1_704_067_200_000  # 2024-01-01T00:00:00Z
BTC, ETH, SOL = "BTC/USDT", "ETH/USDT", "SOL/USDT"
LOGGER = "inference_service.model_store"
LONG_SPEC = FeatureSpec(sma_windows=(10, 20, 50, 200))  # as many features as the default, a longer warm-up


@functools.cache
def tiny_onnx(seed: int = 0) -> bytes:
    """A five-tree forest on random features, exported to ONNX (any spec with the default feature count fits)."""
    rng = np.random.default_rng(seed)
    n = len(FeatureSpec().feature_names)
    X, y = rng.normal(size=(300, n)), rng.integers(0, 3, 300)
    forest = RandomForestClassifier(n_estimators=5, max_depth=3, random_state=seed).fit(X, y)
    return export_onnx(forest, n)


@dataclass
class Registry:
    engine: sa.Engine
    model_dir: Path
    created_ms: int = 1_000

    def register(self, symbol: str = BTC, timeframe: str = "1h", seed: int = 0, spec: FeatureSpec | None = None,
                 data: bytes | None = None, stage: str = SERVING) -> ModelRecord:
        """Register a model as the newest of its market, SERVING unless `stage` says otherwise; `data` replaces its
        ONNX bytes (sha256 kept consistent)."""
        self.created_ms += 1
        model_id = f"{symbol.replace('/', '-')}_{timeframe}_{self.created_ms}"
        payload = tiny_onnx(seed) if data is None else data
        sha = write_atomic(self.model_dir / f"{model_id}.onnx", payload)
        record = ModelRecord(
            model_id=model_id, symbol=symbol, timeframe=timeframe, created_at_ms=self.created_ms,
            train_start_ms=T0, train_end_ms=T0 + 100 * H, label=LabelSpec(), feature_spec=spec or FeatureSpec(),
            params=ForestParams(n_estimators=5, max_depth=3), classes=CLASSES, prior=(0.3, 0.4, 0.3),
            shrink_weight=0.6, metrics={}, artifact=f"{model_id}.onnx", sha256=sha,
            stage=stage,
        )
        with self.engine.begin() as conn:
            insert_model(conn, record)
        return record

    def update(self, model_id: str, **values) -> None:
        with self.engine.begin() as conn:
            conn.execute(models_table.update().where(models_table.c.model_id == model_id).values(**values))

    def manifest(self, model_id: str) -> dict:
        with self.engine.connect() as conn:
            q = sa.select(models_table.c.manifest).where(models_table.c.model_id == model_id)
            text = conn.execute(q).scalar_one()
        return json.loads(text)

    def make_unreadable(self, model_id: str) -> dict:
        """Give the row a params key this version does not know (as a newer version could write); returns the
        original manifest."""
        original = self.manifest(model_id)
        changed = dict(original, params={**original["params"], "a_future_knob": 3})
        self.update(model_id, manifest=json.dumps(changed, sort_keys=True))
        return original


@pytest.fixture
def registry(tmp_path):
    url = f"sqlite:///{tmp_path}/registry.db"
    upgrade(url)
    engine = make_engine(url)
    yield Registry(engine, tmp_path / "models")
    engine.dispose()


@pytest.fixture
def store(registry):
    return ModelStore(registry.engine, registry.model_dir)


def refusals(caplog, model_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER and r.levelno >= logging.ERROR and f"model {model_id} refused" in r.getMessage()]


def serving(store: ModelStore) -> dict[tuple[str, str], str]:
    return {(m.record.symbol, m.record.timeframe): m.model_id for role, m in store.loaded() if role == "serving"}


# --------------------------------------------------------------------------------------------------------------------
# refusals


def test_an_unreadable_row_and_a_rejected_file_do_not_stop_hot_reload(registry, store, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    btc_a, eth_a, sol_a = registry.register(BTC), registry.register(ETH), registry.register(SOL)
    for symbol in (BTC, ETH, SOL):
        store.current(symbol, "1h")
    btc_b = registry.register(BTC, seed=1)
    original_manifest = registry.make_unreadable(btc_b.model_id)
    eth_b = registry.register(ETH, data=b"these bytes are not an ONNX graph" * 8)  # sha256 matches the garbage
    sol_b = registry.register(SOL, seed=2)

    # the markets after the bad ones still hot-reload, the bad ones keep their previous model, pass after pass
    assert store.refresh() == [sol_b.model_id]
    for _ in range(3):
        assert store.refresh() == []
    assert serving(store) == {(BTC, "1h"): btc_a.model_id, (ETH, "1h"): eth_a.model_id, (SOL, "1h"): sol_b.model_id}
    # each refusal is logged once, with its reason and the model that keeps serving
    [row_refusal] = refusals(caplog, btc_b.model_id)
    assert "registry row cannot be read" in row_refusal and "a_future_knob" in row_refusal
    assert f"{btc_a.model_id} keeps serving" in row_refusal
    [file_refusal] = refusals(caplog, eth_b.model_id)
    assert "cannot be loaded" in file_refusal and f"{eth_a.model_id} keeps serving" in file_refusal

    # a cold load (a new process) serves only the SERVING model: a refused one is DATA_LOSS, never an older model
    cold = ModelStore(registry.engine, registry.model_dir)
    for symbol in (BTC, ETH):
        with pytest.raises(DataLoss):
            cold.current(symbol, "1h")
    assert cold.current(SOL, "1h").model_id == sol_b.model_id

    # fixed: the row is readable again, the file is replaced by a good one -> picked up without a restart
    registry.update(btc_b.model_id, manifest=json.dumps(original_manifest, sort_keys=True))
    good = tiny_onnx(3)
    write_atomic(registry.model_dir / eth_b.artifact, good)
    registry.update(eth_b.model_id, sha256=sha256_bytes(good))
    assert sorted(store.refresh()) == sorted([btc_b.model_id, eth_b.model_id])
    assert serving(store) == {(BTC, "1h"): btc_b.model_id, (ETH, "1h"): eth_b.model_id, (SOL, "1h"): sol_b.model_id}
    # once per store (the cold one logged its own), never again once fixed
    assert len(refusals(caplog, btc_b.model_id)) == 2 and len(refusals(caplog, eth_b.model_id)) == 2
    assert sol_a.model_id not in serving(store).values()


def test_a_corrupted_file_restored_is_served_again_without_a_restart(registry, store, caplog):
    old = registry.register(seed=0)
    assert store.current(BTC, "1h").model_id == old.model_id
    new = registry.register(seed=1)
    path = registry.model_dir / new.artifact
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a half-written copy
    for _ in range(3):
        assert store.refresh() == []
    assert store.current(BTC, "1h").model_id == old.model_id
    [refusal] = refusals(caplog, new.model_id)
    assert "sha256" in refusal
    write_atomic(path, good)  # restored
    assert store.refresh() == [new.model_id]
    assert store.current(BTC, "1h").model_id == new.model_id


def test_the_only_model_refused_is_data_loss_until_its_file_is_restored(registry, store):
    only = registry.register()
    path = registry.model_dir / only.artifact
    good = path.read_bytes()
    path.write_bytes(b"\0" * 64)
    for _ in range(2):
        with pytest.raises(DataLoss, match=f"no verifiable model for {BTC} 1h: model {only.model_id} refused"):
            store.current(BTC, "1h")
    write_atomic(path, good)
    assert store.current(BTC, "1h").model_id == only.model_id


# --------------------------------------------------------------------------------------------------------------------
# cache


def test_a_hundred_markets_in_round_robin_load_each_model_once(registry):
    markets = [(f"C{i:03d}/USDT", "1h") for i in range(100)]
    for symbol, timeframe in markets:
        registry.register(symbol, timeframe)
    store = ModelStore(registry.engine, registry.model_dir)  # the default cache size
    for _ in range(4):
        for symbol, timeframe in markets:
            assert store.current(symbol, timeframe).record.symbol == symbol
    assert store.loads == 100
    assert store.refresh() == []
    for symbol, timeframe in markets:
        store.current(symbol, timeframe)
    assert store.loads == 100
    assert len(store.loaded()) == 100


def test_a_small_cache_drops_the_least_recently_used(registry):
    for i in range(3):
        registry.register(f"C{i}/USDT")
    store = ModelStore(registry.engine, registry.model_dir, cache_size=2)
    for i in (0, 1, 2, 0):
        store.current(f"C{i}/USDT", "1h")
    assert store.loads == 4
    assert sorted(s for s, _ in serving(store)) == ["C0/USDT", "C2/USDT"]


# --------------------------------------------------------------------------------------------------------------------
# pinned models


def test_a_pinned_model_of_another_market_is_refused_before_it_is_loaded(registry, store, caplog):
    registry.register(BTC)
    eth = registry.register(ETH, data=b"not a model")
    btc_4h = registry.register(BTC, "4h", data=b"not a model either")
    with pytest.raises(InvalidArgument, match=f"model_id: model {eth.model_id} is for {ETH} 1h, not {BTC} 1h"):
        store.pinned(eth.model_id, BTC, "1h")
    with pytest.raises(InvalidArgument, match=f"model_id: model {btc_4h.model_id} is for {BTC} 4h, not {BTC} 1h"):
        store.pinned(btc_4h.model_id, BTC, "1h")
    with pytest.raises(NotFound, match="model_id: no model 'nope' in the registry"):
        store.pinned("nope", BTC, "1h")
    assert store.loads == 0 and store.loaded() == []
    assert not refusals(caplog, eth.model_id) and not refusals(caplog, btc_4h.model_id)


def test_a_pinned_refused_model_is_data_loss_without_the_server_path(registry, store, caplog):
    good = registry.register(seed=0)
    bad = registry.register(seed=1, stage=CANDIDATE)
    registry.update(bad.model_id, sha256="0" * 64)
    assert store.current(BTC, "1h").model_id == good.model_id  # the SERVING one, not the newest
    for _ in range(2):
        with pytest.raises(DataLoss, match=f"model {bad.model_id} refused") as err:
            store.pinned(bad.model_id, BTC, "1h")
        text = str(err.value)
        assert "sha256" in text and bad.artifact in text
        assert str(registry.model_dir.resolve()) not in text and str(registry.model_dir) not in text
    [logged] = refusals(caplog, bad.model_id)
    assert str(registry.model_dir.resolve()) in logged  # the server's log keeps the path
    assert store.pinned(good.model_id, BTC, "1h").model_id == good.model_id
    # the row is corrected: the pinned model loads
    registry.update(bad.model_id, sha256=bad.sha256)
    assert store.pinned(bad.model_id, BTC, "1h").model_id == bad.model_id


# --------------------------------------------------------------------------------------------------------------------
# warm-up


def test_max_warmup_bars_covers_every_registered_model_and_needs_no_query_when_cached(registry, store):
    serving_model = registry.register(seed=0)
    longer = registry.register(seed=1, spec=LONG_SPEC, data=b"refused, but it could serve once fixed",
                               stage=CANDIDATE)
    assert store.current(BTC, "1h").model_id == serving_model.model_id
    queries: list[str] = []
    sa.event.listen(registry.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    assert store.max_warmup_bars(BTC, "1h") == LONG_SPEC.warmup_bars > serving_model.warmup_bars
    assert queries == []
    registry.update(longer.model_id, warmup_bars=FeatureSpec().warmup_bars)
    store.refresh()  # the poll refreshes it
    assert store.max_warmup_bars(BTC, "1h") == FeatureSpec().warmup_bars
    # a market that is only pinned is read once, then cached
    eth = registry.register(ETH, spec=LONG_SPEC)
    store.pinned(eth.model_id, ETH, "1h")
    assert store.max_warmup_bars(ETH, "1h") == LONG_SPEC.warmup_bars
    before = len(queries)
    assert store.max_warmup_bars(ETH, "1h") == LONG_SPEC.warmup_bars
    assert len(queries) == before
    assert store.max_warmup_bars("XRP/USDT", "1h") == 0  # no models


# --------------------------------------------------------------------------------------------------------------------
# watching the registry


def test_an_idle_poll_is_one_query_whatever_the_number_of_markets(registry):
    for i in range(50):
        registry.register(f"C{i:03d}/USDT")
    store = ModelStore(registry.engine, registry.model_dir)
    for i in range(50):
        store.current(f"C{i:03d}/USDT", "1h")
    store.refresh()
    queries: list[str] = []
    sa.event.listen(registry.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    assert store.refresh() == []
    assert len(queries) == 1 and "registry_version" in queries[0]
    queries.clear()
    new = registry.register("C007/USDT", seed=1)
    queries.clear()
    assert store.refresh() == [new.model_id]
    assert len(queries) <= 6, queries  # the version, the changed markets, then that market alone


def test_a_change_committed_while_a_model_loads_is_not_missed_by_a_poll_meanwhile(registry):
    """A poll that runs between a cold load's read of the registry and its entry into the cache does not see the
    market yet; the next poll must still look at the changes made after that read."""
    old = registry.register(seed=0)
    store = ModelStore(registry.engine, registry.model_dir)
    store.refresh()  # the first poll: from now on only changes are read
    state: dict[str, object] = {}

    def meanwhile(conn, cursor, text, *args) -> None:
        if "new" not in state and "models.stage = " in text:  # the cold load reads the SERVING row
            state["new"] = "pending"
        elif state.get("new") == "pending" and "max(models.warmup_bars)" in text:  # ... and goes on loading
            state["new"] = "registering"
            state["new"] = registry.register(seed=1)  # a promotion committed after the load read the row
            state["swapped"] = store.refresh()  # a poll before the load has cached its model

    sa.event.listen(registry.engine, "before_cursor_execute", meanwhile)
    assert store.current(BTC, "1h").model_id == old.model_id  # the row read before the change
    sa.event.remove(registry.engine, "before_cursor_execute", meanwhile)
    new = state["new"]
    assert isinstance(new, ModelRecord) and state["swapped"] == []
    assert store.refresh() == [new.model_id]
    assert store.current(BTC, "1h").model_id == new.model_id


def test_in_memory_never_reads_the_database_or_the_disk(registry, store):
    btc = registry.register(BTC)
    eth = registry.register(ETH, seed=1)
    assert store.in_memory(BTC, "1h") is None  # nothing loaded yet: the caller goes to a thread
    store.current(BTC, "1h")
    store.pinned(eth.model_id, ETH, "1h")
    queries: list[str] = []
    sa.event.listen(registry.engine, "before_cursor_execute", lambda *args: queries.append(args[2]))
    serving = store.in_memory(BTC, "1h")
    assert serving is not None and serving.model.model_id == btc.model_id and serving.keep == btc.warmup_bars
    pinned = store.in_memory(ETH, "1h", eth.model_id)  # pinned() filled the market's warm-up
    assert pinned is not None and pinned.model.model_id == eth.model_id
    assert store.in_memory(SOL, "1h") is None and store.in_memory(ETH, "1h") is None
    with pytest.raises(InvalidArgument, match="model_id"):
        store.in_memory(BTC, "1h", eth.model_id)
    assert queries == []


def test_the_default_cache_keeps_every_market_and_an_eviction_only_drops_the_reference(registry):
    assert ModelStore(registry.engine, registry.model_dir).cache_size == 0
    for i in range(3):
        registry.register(f"C{i}/USDT")
    store = ModelStore(registry.engine, registry.model_dir, cache_size=1)
    found = None
    for i in range(3):
        store.current(f"C{i}/USDT", "1h")
        if i == 0:
            found = store.in_memory("C0/USDT", "1h")
    assert store.in_memory("C0/USDT", "1h") is None  # dropped: the next request loads it in a thread
    assert found is not None and found.model.predict_proba(np.zeros((1, found.model.forest.n_features))).shape == (1, 3)
